"""Overhead of llmft on a real model: ``llmft.build_trainer`` + ``llmft.train`` vs plain Unsloth + TRL
``SFTTrainer`` (``FastLanguageModel.from_pretrained`` + ``get_peft_model`` + ``SFTTrainer`` +
``train_on_responses_only``) on SmolLM2-135M-Instruct in 4-bit (``llmft.testing.real_model_dir``), the same
ShareGPT rows, the same LoRA, batch, learning rate and number of steps; no evaluation, no checkpoints, no probes.

    python benchmarks/bench_real_model.py [--steps 12] [--repeats 2] [--batch 4]

Runs alternate (plain, llmft, plain, llmft, ...) in one process; each builds its model from scratch. Per run: the
median step time (steps after the first two, from on_step_begin to on_step_end) and the peak memory during
``train`` (CUDA: torch.cuda.max_memory_allocated; CPU: the process's resident memory above its level before
training, sampled every 20 ms). Prints the ratio llmft/plain of the median step times (target <= 1.05).
"""
import argparse
import os
import statistics
import tempfile
import threading
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
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)

        self.times, self.start, self.callback = [], 0.0, _Callback()


class PeakMemory:
    """Peak memory while a block runs: CUDA allocations on a GPU, else resident memory above the starting level."""

    def __enter__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.process.memory_info().rss)
                time.sleep(0.02)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.above_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak_mb, self.above_mb = self.peak / 2**20, (self.peak - self.base) / 2**20


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    step_times, peaks, walls = {"plain": [], "llmft": []}, {"plain": [], "llmft": []}, {"plain": [], "llmft": []}
    for _ in range(args.repeats):
        for kind in ("plain", "llmft"):
            with tempfile.TemporaryDirectory() as out:
                timer = StepTimer()
                trainer, run = make(kind, out, args.steps, args.batch, timer)
                start = time.perf_counter()
                with PeakMemory() as memory:
                    run()
                walls[kind].append(time.perf_counter() - start)
                assert trainer.state.global_step == args.steps, (kind, trainer.state.global_step)
                step_times[kind].append(statistics.median(timer.times[2:] or timer.times))
                peaks[kind].append(memory.above_mb)
                print(f"{kind:5s}: median step {step_times[kind][-1]:.3f} s, train() {walls[kind][-1]:.1f} s, "
                      f"peak memory +{memory.above_mb:.0f} MiB ({memory.peak_mb:.0f} MiB)", flush=True)
                del trainer, run
    plain, ours = statistics.median(step_times["plain"]), statistics.median(step_times["llmft"])
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.steps} steps at batch {args.batch}, {args.repeats} alternating repeats, {device}")
    print(f"median step: plain Unsloth+TRL {plain:.3f} s, llmft {ours:.3f} s; ratio llmft/plain = {ours / plain:.3f} "
          "(target <= 1.05)")
    print(f"peak memory above the pre-training level (median): plain {statistics.median(peaks['plain']):.0f} MiB, "
          f"llmft {statistics.median(peaks['llmft']):.0f} MiB")


if __name__ == "__main__":
    main()
