"""Batched generation vs the per-prompt loop of the NTUA lab report: same prompts, outputs compared, speed ratio.

    python benchmarks/bench_generation.py [--prompts 64] [--batch-size 16] [--new-tokens 32]

Runs offline on the tiny model from llmft.testing; prints the ratio measured side by side in one run (absolute times
on a shared 2-core machine are noise, the ratio is the result).
"""
import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmft  # noqa: E402  (Unsloth first)
from llmft import models, testing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir()), max_seq_length=256, lora_r=8)
    questions = [m["messages"][0]["content"] for m in llmft.sharegpt_to_messages(
        testing.tiny_finetome(args.prompts), verbose=False)]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    llmft.generate_batch(model, tokenizer, prompts[:2], max_new_tokens=4, progress=False)  # warm up

    start = time.perf_counter()
    looped = [llmft.generate_response(model, tokenizer, p, do_sample=False, max_new_tokens=args.new_tokens)
              for p in prompts]
    t_loop = time.perf_counter() - start
    start = time.perf_counter()
    batched = llmft.generate_batch(model, tokenizer, prompts, batch_size=args.batch_size,
                                   max_new_tokens=args.new_tokens, progress=False)
    t_batch = time.perf_counter() - start

    same = sum(a == b for a, b in zip(looped, batched))
    print(f"{args.prompts} prompts, {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"compute dtype {models.cpu_compute_dtype()}")
    print(f"per-prompt loop {t_loop:.2f} s, batched {t_batch:.2f} s -> batched is {t_loop / t_batch:.1f}x faster")
    # Padding changes the order of float sums: identical in fp32 here (64/64); in bf16 (or fp16 on a T4) a random
    # tiny model's near-ties flip some greedy tokens (46/64 measured on a bf16 CPU). A trained model has margins.
    print(f"identical greedy outputs: {same}/{len(prompts)} ({models.cpu_compute_dtype()}; near-ties of a random "
          "tiny model may flip in bf16/fp16)")


if __name__ == "__main__":
    main()
