"""Overhead of llmft's training control: build_trainer with every default callback (metrics CSV, best checkpoint,
early stopping, NaN guard) vs a bare TRL SFTTrainer with the same arguments, same steps and same evaluations.

    python benchmarks/bench_callbacks.py [--steps 60] [--eval-every 10] [--repeats 3]

Runs alternate (bare, llmft, bare, llmft, ...) on the tiny offline model and prints the ratio of median wall times
(target <= 1.05). Early stopping is given a patience it cannot reach, so both runs do the same number of steps.
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmft  # noqa: E402  (Unsloth first)
from llmft import testing  # noqa: E402


def make(kind, out, steps, eval_every):
    from trl import SFTTrainer
    from unsloth.chat_templates import train_on_responses_only

    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir()), max_seq_length=128, lora_r=8, seed=0)
    chats = llmft.sharegpt_to_messages(testing.tiny_finetome(96), verbose=False)
    train, held_out = chats.select(range(80)), chats.select(range(80, 96))
    trainer = llmft.build_trainer(model, tokenizer, train, held_out, output_dir=out, max_steps=steps,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                                  eval_steps=eval_every, early_stopping_patience=10_000, verbose=False,
                                  disable_tqdm=True, save_strategy="no")
    if kind == "llmft":
        return trainer
    bare = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, eval_dataset=held_out,
                      args=trainer.args)
    return train_on_responses_only(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    times = {"bare": [], "llmft": []}
    in_callbacks = []  # time spent inside callback events in the llmft runs: the overhead, measured directly
    for _ in range(args.repeats):
        for kind in ("bare", "llmft"):
            with tempfile.TemporaryDirectory() as out:
                trainer = make(kind, out, args.steps, args.eval_every)
                handler, spent = trainer.callback_handler, [0.0]
                call_event = handler.call_event

                def timed(event, *a, _call=call_event, _spent=spent, **k):
                    t0 = time.perf_counter()
                    try:
                        return _call(event, *a, **k)
                    finally:
                        _spent[0] += time.perf_counter() - t0

                handler.call_event = timed
                start = time.perf_counter()
                trainer.train()
                times[kind].append(time.perf_counter() - start)
                if kind == "llmft":
                    in_callbacks.append(spent[0] / times[kind][-1])
                assert trainer.state.global_step == args.steps
    bare, ours = statistics.median(times["bare"]), statistics.median(times["llmft"])
    print(f"{args.steps} steps, eval every {args.eval_every}, {args.repeats} alternating repeats")
    print(f"bare SFTTrainer median {bare:.2f} s, build_trainer with callbacks median {ours:.2f} s")
    print(f"ratio llmft/bare = {ours / bare:.3f} (target <= 1.05)")
    print(f"share of the llmft run spent inside callbacks (median): {statistics.median(in_callbacks):.1%}")


if __name__ == "__main__":
    main()
