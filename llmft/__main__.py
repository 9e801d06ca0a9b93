"""``python -m llmft``: the offline demos.

  demo       the main job: the seeds' forgetting finding reproduced offline (see llmft/demo.py), a few minutes on 2 CPU
             cores the first time (it builds and caches a tiny pretrained base), less after
  sft-demo   the foundation path end to end: SFT on FineTome-shaped data, evaluation, adapters saved and reloaded
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="forgetting demo: Fibonacci probe vs MCQ fine-tuning (0.2 / 1 epoch, KD, Chebyshev)",
        description="Build (once) a tiny Llama that knows the Fibonacci sequence, fine-tune it with LoRA on "
                    "multiple-choice questions for 0.2 epoch, 1 epoch, 1 epoch with distillation and 1 epoch with "
                    "the Chebyshev schedule, probe every run, and write plots, results.json and summary.md.")
    demo.add_argument("--output-dir", default="llmft_demo", help="where results go (default: %(default)s)")
    demo.add_argument("--pretrain-steps", type=int, default=600,
                      help="full-training steps of the tiny base, cached per value (default: %(default)s)")
    demo.add_argument("--mcq-rows", type=int, default=1000, help="MCQ training rows; 1 epoch = rows / 8 steps "
                      "(default: %(default)s)")
    demo.add_argument("--learning-rate", type=float, default=2e-3, help="LoRA learning rate (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=3407, help="random seed (default: %(default)s)")
    demo.add_argument("--probe-items", type=int, default=None,
                      help="score only the first N of the Fibonacci probe's 117 items (default: all)")
    sft = sub.add_parser("sft-demo", help="offline end-to-end SFT on a tiny model (no GPU, no hub)",
                         description="Fine-tune a tiny offline Llama with LoRA on FineTome-shaped chat data, evaluate, "
                                     "save and reload the adapters, and write results to --output-dir.")
    sft.add_argument("--output-dir", default="llmft_sft_demo", help="where results go (default: %(default)s)")
    sft.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    sft.add_argument("--seed", type=int, default=3407, help="random seed (default: %(default)s)")
    sft.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="tiny architecture (default: llama)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from llmft import demo

    if args.command == "sft-demo":
        if args.max_steps < 1:
            print("--max-steps must be at least 1", file=sys.stderr)
            return 2
        results = demo.run_sft_demo(args.output_dir, args.max_steps, args.seed, args.arch)
        return 0 if results["reloaded_adapters_match"] else 1
    if args.pretrain_steps < 1 or args.mcq_rows < 8:
        print("--pretrain-steps must be at least 1 and --mcq-rows at least 8", file=sys.stderr)
        return 2
    demo.run_forgetting_demo(args.output_dir, pretrain_steps=args.pretrain_steps, mcq_rows=args.mcq_rows,
                             seed=args.seed, learning_rate=args.learning_rate, probe_items=args.probe_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
