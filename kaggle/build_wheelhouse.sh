#!/usr/bin/env bash
# Build a wheelhouse of the whole llmft stack for a Kaggle kernel that runs with the internet off (how code
# competitions score). Run it where PyPI is reachable:
#   bash kaggle/build_wheelhouse.sh --torch 2.13.0 [--out build/wheelhouse] [--python 3.11] [--glibc 2.31] [--native]
# --torch    the torch version of the image the kernel runs on (in a Kaggle notebook: import torch;
#            torch.__version__; a local label such as +cu128 is ignored). triton, xformers and cut_cross_entropy are
#            resolved together with it, so they match it.
# --python / --glibc   the kernel's Python and glibc (wheels are taken for manylinux <= that glibc);
# --native   build for this machine instead (tests).
# The whole dependency closure is resolved (pip install --dry-run --report, as if into an empty environment) and
# downloaded, minus what the image provides: torch and the CUDA libraries listed in IMAGE_PROVIDED below. Then:
#   kaggle datasets create -p build/wheelhouse       (a dataset, e.g. YOU/llmft-wheelhouse)
#   python kaggle/push_kernel.py notebooks/05_codemmlu_kaggle.ipynb ... --wheelhouse YOU/llmft-wheelhouse
# and the kernel's install cell runs, with the dataset at W:
#   pip install --no-index --find-links W -r W/requirements-kaggle.txt
#   pip install --no-index --find-links W --no-deps -r W/requirements-unsloth.txt llmft
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=build/wheelhouse; torch=""; py=3.11; glibc=2.31; native=0
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --glibc) glibc="$2"; shift 2 ;;
    --native) native=1; shift ;;
    *) echo "build_wheelhouse.sh: unknown option '$1' (known: --torch, --out, --python, --glibc, --native)" >&2; exit 2 ;;
  esac
done
if [ -z "$torch" ]; then
  echo "build_wheelhouse.sh: --torch VERSION is required: the torch of the Kaggle image the kernel will run on" >&2
  echo "  (in a Kaggle notebook: import torch; print(torch.__version__)). triton/xformers/cut_cross_entropy match it." >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"
public_torch="${torch%%+*}"
target=()
if [ "$native" = 0 ]; then
  target=(--python-version "$py" --implementation cp --abi "cp${py//./}" --abi abi3 --abi none)
  for minor in $(seq "${glibc#*.}" -1 5); do target+=(--platform "manylinux_2_${minor}_x86_64"); done
  target+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
           --platform linux_x86_64 --platform any)
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# What the kernel installs: the pinned stack without torch (the image's stays), plus Unsloth's GPU kernels.
grep -v -E '^torch([<>=!~ ]|$)' "$here/requirements.txt" > "$out/requirements-kaggle.txt"
printf '# Unsloth GPU kernels, resolved with torch==%s when the wheelhouse was built\ntriton\ncut_cross_entropy\n' \
  "$public_torch" >> "$out/requirements-kaggle.txt"
cp "$here/requirements-unsloth.txt" "$out/requirements-unsloth.txt"

resolve() {  # the closure, resolved as if into an empty environment; torch=== skips local builds such as +cpu
  "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" --target "$work/t" \
    --only-binary=:all: ${target[@]+"${target[@]}"} -r "$out/requirements-kaggle.txt" "torch===$public_torch" "$@"
}
echo "[wheelhouse] resolving the stack with torch==$public_torch ..."
if resolve "xformers>=0.0.27.post2"; then
  echo 'xformers>=0.0.27.post2' >> "$out/requirements-kaggle.txt"
else
  echo "[wheelhouse] note: no xformers wheel fits torch $public_torch; leaving it out (Unsloth uses PyTorch attention)."
  resolve
fi

"$PYTHON" - "$work/report.json" "$work/urls.txt" "$out/BUILT_FOR.txt" "$torch" "$py" "$glibc" "$native" <<'PY'
import json, re, sys

report, urls, built_for, torch, py, glibc, native = sys.argv[1:]
# Provided by Kaggle's CUDA image together with its torch: never downloaded, never replaced.
IMAGE_PROVIDED = {
    "torch", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit",
    # CUDA 13 wheels (torch >= 2.9 default builds)
    "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
    "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13",
    "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx",
    # CUDA 12 wheels (older torch)
    "nvidia-cublas-cu12", "nvidia-cuda-cupti-cu12", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12",
    "nvidia-cudnn-cu12", "nvidia-cufft-cu12", "nvidia-cufile-cu12", "nvidia-curand-cu12", "nvidia-cusolver-cu12",
    "nvidia-cusparse-cu12", "nvidia-cusparselt-cu12", "nvidia-nccl-cu12", "nvidia-nvjitlink-cu12",
    "nvidia-nvshmem-cu12", "nvidia-nvtx-cu12",
}
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
items = json.load(open(report))["install"]
unknown = [i["metadata"]["name"] for i in items if re.match(r"(nvidia|cuda)-", canon(i["metadata"]["name"]))
           and canon(i["metadata"]["name"]) not in IMAGE_PROVIDED]
if unknown:
    sys.exit(f"[wheelhouse] error: torch {torch} pulls CUDA packages not in IMAGE_PROVIDED: {unknown}. Add them to "
             "IMAGE_PROVIDED in kaggle/build_wheelhouse.sh if the image provides them.")
keep = [i for i in items if canon(i["metadata"]["name"]) not in IMAGE_PROVIDED]
open(urls, "w").write("".join(i["download_info"]["url"] + "\n" for i in keep))
versions = {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
open(built_for, "w").write(
    f"torch {torch}\npython {py}\nplatform {'this machine' if native == '1' else f'manylinux, glibc <= {glibc}'}\n"
    + "".join(f"{name} {versions[name]}\n" for name in ("triton", "xformers", "cut-cross-entropy") if name in versions)
    + "left to the image: " + ", ".join(sorted(canon(i["metadata"]["name"]) for i in items
                                             if canon(i["metadata"]["name"]) in IMAGE_PROVIDED)) + "\n")
print(f"[wheelhouse] {len(keep)} wheels to download; {len(items) - len(keep)} left to the image")
PY
"$PYTHON" -m pip download --quiet --no-deps --dest "$out" -r "$work/urls.txt"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: ${target[@]+"${target[@]}"} --dest "$out" \
  -r "$out/requirements-unsloth.txt"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$here"   # llmft itself
cat "$out/BUILT_FOR.txt"
echo "[wheelhouse] $out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1); upload it as a Kaggle dataset"
