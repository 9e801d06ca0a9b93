"""Import Unsloth first, once, with clear errors.

Unsloth patches transformers, TRL and PEFT when it is imported; TRL 1.15 on a CPU even fails in SFT/DPO unless
``import unsloth`` ran before it. ``import llmft`` calls :func:`import_unsloth` before anything imports trl or
transformers, so users of llmft get the right order for free.

Kaggle's "GPU T4 x2" machines expose two GPUs; a single process trains on one, and the second only confuses device
placement. Before torch starts, we pin ``CUDA_VISIBLE_DEVICES=0`` on Kaggle unless the user set it. To use another
GPU, set ``CUDA_VISIBLE_DEVICES`` yourself before ``import llmft``. To use both, launch one process per GPU
(``torchrun --nproc_per_node=2 ...``): the pin then steps aside, since every process must see the GPUs for Unsloth to
put each on its own, ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import os
import sys
import warnings

from llmft.log import say
MIN_UNSLOTH_FOR_CPU = (2026, 10, 9)
INSTALL_HINT = ("Install the pinned stack: in a notebook, re-run its install cell (the first code cell; it runs "
                "`bash llmft-src/scripts/install.sh` and says which step failed), restarting the runtime first if "
                "torch changed; from a clone of the repository, `bash scripts/install.sh` (see README.md).")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_pinned: str | None = None  # what pin_single_gpu_on_kaggle set in this process, if anything


def pinned_gpu() -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value llmft's Kaggle pin set in this process (None when it set nothing: not on
    Kaggle, a user's own value, or a launcher's process)."""
    return _pinned


def pin_single_gpu_on_kaggle() -> str | None:
    """On Kaggle, expose only GPU 0 unless ``CUDA_VISIBLE_DEVICES`` is already set or a launcher started several
    processes (one per GPU); returns what was set."""
    from llmft.environment import launched_distributed, on_kaggle

    if not on_kaggle() or "CUDA_VISIBLE_DEVICES" in os.environ or launched_distributed():
        return None
    if "torch" in sys.modules:
        warnings.warn("llmft: torch was imported before llmft, so it cannot pin Kaggle's 2xT4 to one GPU. "
                      "Import llmft first, or set CUDA_VISIBLE_DEVICES=0 before importing torch.", stacklevel=3)
        return None
    global _pinned
    os.environ["CUDA_VISIBLE_DEVICES"] = _pinned = "0"
    say("llmft: Kaggle detected; training on GPU 0 only (set CUDA_VISIBLE_DEVICES before import to change).")
    return "0"


def _has_cuda_gpu() -> bool:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"llmft needs PyTorch. {INSTALL_HINT}") from exc
    return torch.cuda.is_available()


def import_unsloth():
    """Import and return the ``unsloth`` module, checking that the installed version can run on this machine."""
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    pin_single_gpu_on_kaggle()
    try:
        version = metadata.version("unsloth")
    except metadata.PackageNotFoundError as exc:
        raise ImportError(f"llmft needs Unsloth, which is not installed. {INSTALL_HINT}") from exc
    if not _has_cuda_gpu() and _version_tuple(version) < MIN_UNSLOTH_FOR_CPU:
        raise ImportError(
            f"Unsloth {version} is installed, but there is no GPU and only Unsloth >= "
            f"{'.'.join(map(str, MIN_UNSLOTH_FOR_CPU))} has a CPU mode. A plain `pip install unsloth` can fall back "
            f"to an older release when its certifi pin is unavailable. {INSTALL_HINT}")
    late = [name for name in ("trl", "transformers", "peft") if name in sys.modules]
    if late:
        warnings.warn(f"llmft: {', '.join(late)} was imported before Unsloth; Unsloth's patches may be incomplete. "
                      "Import llmft (or unsloth) first in a fresh kernel.", stacklevel=3)
    try:
        import unsloth  # noqa: F401  (patches transformers/trl/peft on import)
    except Exception as exc:  # noqa: BLE001 - rewrap with what to do
        raise ImportError(f"Importing Unsloth {version} failed: {exc}. {INSTALL_HINT}") from exc
    return sys.modules["unsloth"]


ORDERED_AFTER_UNSLOTH = ("transformers", "trl", "peft", "unsloth_zoo")  # unsloth_zoo refuses to go first
_wrapped_import = None  # Python's own __import__ while the wrapper below is installed


def unsloth_before_transformers() -> bool:
    """Guarantee that Unsloth is imported before transformers, TRL and PEFT, whoever imports them first, without
    importing anything heavy now (so ``llmft.kaggle``, ``llmft.configs`` and ``python -m llmft --help`` stay light).

    Until Unsloth is loaded, Python's ``__import__`` is wrapped: the first ``import transformers`` (or trl, peft,
    unsloth_zoo, or one of their submodules) imports Unsloth just before it, through :func:`import_unsloth` and its
    checks. The wrapper steps aside for good once Unsloth is in. Nothing is installed when Unsloth is already imported, when one of
    those libraries was imported first (:func:`import_unsloth` warns about that when llmft needs Unsloth), or when
    Unsloth is not installed (llmft's model functions then say how to install it). Returns whether it was installed.
    ``importlib.import_module("transformers")`` bypasses ``__import__``: llmft's own modules import Unsloth
    explicitly wherever they need it."""
    global _wrapped_import
    import builtins
    import importlib.util

    if _wrapped_import is not None or "unsloth" in sys.modules:
        return _wrapped_import is not None
    if any(name in sys.modules for name in ORDERED_AFTER_UNSLOTH) or importlib.util.find_spec("unsloth") is None:
        return False
    original = _wrapped_import = builtins.__import__

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        global _wrapped_import
        if _wrapped_import is not None and level == 0 and name.partition(".")[0] in ORDERED_AFTER_UNSLOTH:
            _wrapped_import = None
            if builtins.__import__ is _import:
                builtins.__import__ = original
            import_unsloth()
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = _import
    return True


@contextlib.contextmanager
def pinned_cpu_precision(bf16: bool = False, threads: int | None = 2):
    """Within the block, a CPU run gives the same numbers on every x86 machine: Unsloth's CPU mode computes in bf16
    where the CPU has native bf16 (AMX / AVX512-BF16) and in fp32 elsewhere, and float sums depend on the thread
    count. Sets ``UNSLOTH_CPU_BF16`` (Unsloth reads it when it picks a dtype, so load models inside the block) and the
    torch thread count, and restores both after. No effect on a GPU. Yields what was pinned, for a run's summary."""
    import torch

    if torch.cuda.is_available():
        yield {"device": "cuda"}
        return
    import_unsloth()
    from unsloth_zoo.cpu import runtime

    saved_env, saved_threads = os.environ.get("UNSLOTH_CPU_BF16"), torch.get_num_threads()
    os.environ["UNSLOTH_CPU_BF16"] = "1" if bf16 else "0"
    runtime.cpu_bf16_supported.cache_clear()  # Unsloth caches the answer; it re-reads the variable after this
    if threads:
        torch.set_num_threads(threads)
    try:
        yield {"device": "cpu", "compute_dtype": "bfloat16" if bf16 else "float32",
               "threads": torch.get_num_threads()}
    finally:
        if saved_env is None:
            os.environ.pop("UNSLOTH_CPU_BF16", None)
        else:
            os.environ["UNSLOTH_CPU_BF16"] = saved_env
        runtime.cpu_bf16_supported.cache_clear()
        torch.set_num_threads(saved_threads)
