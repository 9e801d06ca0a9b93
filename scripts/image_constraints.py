"""Write pip constraints that keep a GPU image's torch stack: one ``name==version`` line for each of torch, torchvision,
torchaudio and triton that is installed (exactly the installed version, local label such as ``+cu124`` included).

    python scripts/image_constraints.py OUT_FILE

``scripts/install.sh`` runs it on a GPU image and installs everything with ``-c OUT_FILE``: pip then either keeps the
image's torch or fails, and never swaps in another torch (whose CUDA build may not match the driver, and which
Unsloth refuses next to the image's torchvision). xformers is deliberately not listed: install.sh asks pip for
``xformers>=0.0.27.post2`` under these constraints, so pip picks a build whose torch requirement the image's torch
meets, or none. Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

IMAGE_PACKAGES = ("torch", "torchvision", "torchaudio", "triton")
# The range Unsloth 2026.10.9 accepts (requirements.txt: torch>=2.4,<2.15).
TORCH_MIN, TORCH_BELOW = (2, 4), (2, 15)


def installed_versions(names=IMAGE_PACKAGES) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def check_torch(version: str) -> None:
    """Raise ValueError when the image's torch is outside the range the pinned Unsloth supports."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match or not TORCH_MIN <= (int(match[1]), int(match[2])) < TORCH_BELOW:
        raise ValueError(
            f"the image's torch is {version}, but the pinned Unsloth needs torch>={'.'.join(map(str, TORCH_MIN))},"
            f"<{'.'.join(map(str, TORCH_BELOW))}. Installing would replace the image's CUDA torch; use an image "
            "(or Colab/Kaggle runtime version) whose torch is in that range.")


def constraints_text(versions: dict[str, str]) -> str:
    if "torch" in versions:
        check_torch(versions["torch"])
    return "".join(f"{name}=={versions[name]}\n" for name in IMAGE_PACKAGES if name in versions)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    versions = installed_versions()
    try:
        text = constraints_text(versions)
    except ValueError as err:
        print(f"[llmft install] error: {err}", file=sys.stderr)
        return 3
    with open(argv[0], "w") as handle:
        handle.write(text)
    if "torch" not in versions:
        print("[llmft install] note: no torch on this image; pip will install torch>=2.4,<2.15 from the index.")
    for line in text.splitlines():
        print(f"[llmft install] keeping the image's {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
