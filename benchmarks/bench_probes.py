"""Overhead of live probes: build_trainer with ``probes=[fibonacci_probe()]`` at its default settings (an evaluation
every tenth of the run, the probe's first 32 items, 8 new tokens, batch 32) vs the same trainer without probes.

    python benchmarks/bench_probes.py [--steps 60] [--repeats 2]

Runs alternate (plain, probed, plain, probed, ...) on the tiny offline model and print the ratio of median wall times
and the share of the probed run spent probing (``eval_probe_runtime`` summed over evaluations / ``train_runtime``).
On the tiny model a training step is far cheaper than on a 3B model on a T4 while a generated token is not, so the
share printed here is an upper bound of what a real run pays.
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmft  # noqa: E402  (Unsloth first)
from llmft import testing  # noqa: E402
from llmft.log import quiet_libraries  # noqa: E402


def make(out, steps, probed):
    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir()), max_seq_length=128, lora_r=8, seed=0)
    chats = llmft.sharegpt_to_messages(testing.tiny_finetome(96), verbose=False)
    extra = {"probes": [llmft.probes.fibonacci_probe()]} if probed else {}
    trainer = llmft.build_trainer(model, tokenizer, chats.select(range(80)), chats.select(range(80, 96)),
                                  output_dir=out, max_steps=steps, verbose=False, disable_tqdm=True, **extra)
    return llmft.callbacks.quiet_console(trainer, progress=False)  # the numbers, not a dict per logging step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    times = {"plain": [], "probed": []}
    shares, evaluations, steps_done = [], 0, set()
    for _ in range(args.repeats):
        for kind in ("plain", "probed"):
            with tempfile.TemporaryDirectory() as out, quiet_libraries():
                trainer = make(out, args.steps, kind == "probed")
                start = time.perf_counter()
                trainer.train()
                times[kind].append(time.perf_counter() - start)
                steps_done.add(trainer.state.global_step)
                if kind == "probed":
                    history = trainer.state.log_history
                    probing = [h["eval_probe_runtime"] for h in history if "eval_probe_runtime" in h]
                    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
                    shares.append(sum(probing) / runtime)
                    evaluations = len(probing)
    assert len(steps_done) == 1, f"runs stopped at different steps {steps_done}: the comparison is not like for like"
    plain, probed = statistics.median(times["plain"]), statistics.median(times["probed"])
    print(f"{steps_done.pop()} steps (batch 2 x 4), {evaluations} evaluations, fibonacci probe: 32 items x 8 new "
          f"tokens, {args.repeats} alternating repeats")
    print(f"without probes median {plain:.2f} s, with probes median {probed:.2f} s")
    print(f"ratio probed/plain = {probed / plain:.3f}")
    print(f"probe time / training time (eval_probe_runtime / train_runtime, median): {statistics.median(shares):.1%}")


if __name__ == "__main__":
    main()
