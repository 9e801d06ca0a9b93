#!/usr/bin/env bash
# Build a wheelhouse of the pinned llmft stack for Kaggle's image, to attach as a dataset to kernels of
# competitions that run with the internet off. Run it where PyPI is reachable:
#   bash kaggle/build_wheelhouse.sh [OUT_DIR] [PYTHON_VERSION]      (defaults: build/wheelhouse, 3.11)
# Then upload OUT_DIR as a Kaggle dataset and, in the notebook's first cell (W=/kaggle/input/<your-dataset>):
#   !pip install --no-index --find-links $W -r $W/requirements-kaggle.txt
#   !pip install --no-index --find-links $W --no-deps -r $W/requirements-unsloth.txt llmft
# Wheels are taken for glibc <= 2.31 (Kaggle's image reported glibc 2.31). Torch is not included: Kaggle's image has a CUDA torch (it must satisfy torch<2.15). Only the listed packages are
# downloaded (--no-deps); their own dependencies must already be in Kaggle's image, and pip says which one is missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-build/wheelhouse}"
py="${2:-3.11}"
mkdir -p "$out"
grep -v -E '^torch([<>=!~ ]|$)' "$here/requirements.txt" > "$out/requirements-kaggle.txt"   # keeps torchao
printf 'triton>=3.0.0\ncut_cross_entropy\n' >> "$out/requirements-kaggle.txt"
cp "$here/requirements-unsloth.txt" "$out/requirements-unsloth.txt"
for reqs in requirements-kaggle.txt requirements-unsloth.txt; do
  python -m pip download --dest "$out" --only-binary=:all: --python-version "$py" \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform any --no-deps -r "$out/$reqs"
done
python -m pip wheel --no-deps --wheel-dir "$out" "$here"   # llmft itself
echo "wheelhouse: $out ($(ls "$out" | wc -l) files); upload it as a Kaggle dataset"
