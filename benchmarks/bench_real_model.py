"""Overhead of llmft on a real model: ``llmft.build_trainer`` + ``llmft.train`` vs plain Unsloth + TRL
``SFTTrainer`` (``FastLanguageModel.from_pretrained`` + ``get_peft_model`` + ``SFTTrainer`` +
``train_on_responses_only``) on SmolLM2-135M-Instruct in 4-bit (``llmft.testing.real_model_dir``), the same
ShareGPT rows, the same LoRA, batch, learning rate and number of steps; no evaluation, no checkpoints, no probes.

    python benchmarks/bench_real_model.py [--steps 12] [--repeats 2] [--batch 4]

Runs alternate (plain, llmft, plain, llmft, ...), each in a fresh subprocess that builds its model from scratch, so
one run's memory cannot hide in another's. Per run: the median step time (steps after the first two, from
on_step_begin to on_step_end; wall time, and the process's CPU time, which other jobs on the machine disturb far
less) and the peak memory (CUDA: torch.cuda.max_memory_allocated during ``train``; CPU: the
process's peak resident memory, ``ru_maxrss``, loading included). Prints the ratio llmft/plain of the median step
times (target <= 1.05).
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmft  # noqa: E402  (Unsloth first)
from llmft import testing  # noqa: E402

MAX_SEQ_LENGTH, LORA_R, LR, SEED = 256, 16, 1e-3, 0


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start, timer.cpu_start = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)
                timer.cpu_times.append(time.process_time() - timer.cpu_start)

        self.times, self.cpu_times, self.start, self.cpu_start, self.callback = [], [], 0.0, 0.0, _Callback()


def rows():
    from datasets import Dataset

    return llmft.sharegpt_to_messages(Dataset.from_list(testing.finetome_rows(64, seed=1)), verbose=False)


def make(kind, out, steps, batch, timer):
    common = dict(max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                  learning_rate=LR, warmup_steps=2, logging_steps=1, save_strategy="no", seed=SEED,
                  disable_tqdm=True, report_to="none")
    if kind == "llmft":
        model, tokenizer = llmft.load_model(str(testing.real_model_dir()), max_seq_length=MAX_SEQ_LENGTH,
                                            lora_r=LORA_R, seed=SEED)
        trainer = llmft.build_trainer(model, tokenizer, rows(), output_dir=out, verbose=False,
                                      early_stopping_patience=None, callbacks=[timer.callback], **common)
        return trainer, lambda: llmft.train(trainer, resume=False)
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel
    from unsloth.chat_templates import train_on_responses_only

    model, tokenizer = FastLanguageModel.from_pretrained(str(testing.real_model_dir()),
                                                         max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, bias="none", use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        random_state=SEED)
    args = SFTConfig(output_dir=out, max_length=MAX_SEQ_LENGTH, weight_decay=0.01, max_grad_norm=1.0,
                     lr_scheduler_type="linear", **common)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows(), args=args,
                         callbacks=[timer.callback])
    trainer = train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                      response_part="<|im_start|>assistant\n")
    return trainer, trainer.train


def one_run(kind: str, steps: int, batch: int) -> dict:
    """One run of ``kind`` in this process: its median step time and peak memory (MiB)."""
    import resource

    import torch

    with tempfile.TemporaryDirectory() as out:
        timer = StepTimer()
        trainer, run = make(kind, out, steps, batch, timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        assert trainer.state.global_step == steps, (kind, trainer.state.global_step)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return {"step": statistics.median(timer.times[2:] or timer.times),
            "cpu_step": statistics.median(timer.cpu_times[2:] or timer.cpu_times), "wall": wall, "peak_mb": peak}


def main() -> None:
    import json
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", choices=("plain", "llmft"), help=argparse.SUPPRESS)  # a single run (subprocess)
    args = parser.parse_args()
    if args.one:
        print("RESULT=" + json.dumps(one_run(args.one, args.steps, args.batch)), flush=True)
        return

    results = {"plain": [], "llmft": []}
    for _ in range(args.repeats):
        for kind in ("plain", "llmft"):
            done = subprocess.run([sys.executable, __file__, "--one", kind, "--steps", str(args.steps), "--batch",
                                   str(args.batch)], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.rsplit("RESULT=", 1)[1])
            results[kind].append(result)
            print(f"{kind:5s}: median step {result['step']:.3f} s ({result['cpu_step']:.3f} s of CPU), train() "
                  f"{result['wall']:.1f} s, peak memory {result['peak_mb']:.0f} MiB", flush=True)
    plain = statistics.median(r["step"] for r in results["plain"])
    ours = statistics.median(r["step"] for r in results["llmft"])
    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU, {os.environ.get('OMP_NUM_THREADS') or os.cpu_count()} threads")
    print(f"{args.steps} steps at batch {args.batch}, {args.repeats} alternating repeats, {device}")
    print(f"median step: plain Unsloth+TRL {plain:.3f} s, llmft {ours:.3f} s; ratio llmft/plain = {ours / plain:.3f} "
          "(target <= 1.05)")
    plain_cpu = statistics.median(r["cpu_step"] for r in results["plain"])
    ours_cpu = statistics.median(r["cpu_step"] for r in results["llmft"])
    print(f"median CPU time per step (the work, steadier than wall time when other jobs share the machine): plain "
          f"{plain_cpu:.3f} s, llmft {ours_cpu:.3f} s; ratio {ours_cpu / plain_cpu:.3f}")
    print("peak memory (median): plain {:.0f} MiB, llmft {:.0f} MiB".format(
        statistics.median(r["peak_mb"] for r in results["plain"]),
        statistics.median(r["peak_mb"] for r in results["llmft"])))


if __name__ == "__main__":
    main()
