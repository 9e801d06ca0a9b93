"""Assemble a Kaggle kernel folder from a notebook and push it with the official kaggle CLI.

    python kaggle/push_kernel.py notebooks/05_codemmlu_kaggle.ipynb --owner YOU --title "llmft CodeMMLU T4" \
        [--competition SLUG] [--dataset OWNER/SLUG ...] [--wheelhouse OWNER/SLUG] [--no-internet] [--public]
        [--out build/kernel] [--dry-run]

--wheelhouse OWNER/SLUG (a dataset built by kaggle/build_wheelhouse.sh) attaches it, turns the internet off and
points the notebook's install cell at /kaggle/input/SLUG: it installs with pip --no-index from there.

Checks the notebook (valid, no secrets in any cell's source or outputs: a secret stops it before anything is written,
naming the cell and the form, never the secret) and the metadata (id/title slug, booleans, T4 machine shape) first;
with --dry-run it stops there and prints the commands it would run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's llmft, installed or not
# light: `import llmft` and llmft.kaggle import no torch, Unsloth or transformers (a machine that only pushes kernels)
from llmft.kaggle import KernelError, assemble_kernel, kernel_metadata, push  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook")
    parser.add_argument("--owner", required=True, help="your Kaggle username")
    parser.add_argument("--title", required=True, help="kernel title (its slug becomes the kernel id)")
    parser.add_argument("--competition", action="append", default=[], help="competition slug to attach")
    parser.add_argument("--dataset", action="append", default=[], help="dataset OWNER/SLUG to attach (e.g. a wheelhouse)")
    parser.add_argument("--wheelhouse", help="OWNER/SLUG of a wheelhouse dataset: install offline from it (implies "
                        "--no-internet)")
    parser.add_argument("--no-internet", action="store_true", help="for competitions that score offline")
    parser.add_argument("--public", action="store_true")
    parser.add_argument("--out", default="build/kaggle-kernel")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    datasets = args.dataset + ([args.wheelhouse] if args.wheelhouse and args.wheelhouse not in args.dataset else [])
    meta = kernel_metadata(args.owner, args.title, "notebook.ipynb", competition_sources=args.competition,
                           dataset_sources=datasets, enable_internet=not (args.no_internet or args.wheelhouse),
                           is_private=not args.public)
    try:
        folder = assemble_kernel(args.notebook, args.out, meta, wheelhouse=args.wheelhouse)
        commands = push(folder, dry_run=args.dry_run)
    except KernelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"kernel folder ready: {folder}")
        for command in commands:
            print("would run:", " ".join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
