"""Where this process runs, read from the environment alone (the bottom layer of llmft: standard library only, never
imports torch, so the Kaggle tooling and ``python -m llmft --help`` can use it).

- Platform: :func:`on_colab`, :func:`on_kaggle`; switches: :func:`smoke_mode` (``LLMFT_SMOKE=1``: notebooks swap hub
  ids for tiny local assets and shrink step counts), :func:`cpu_allowed` (smoke mode or ``LLMFT_ALLOW_CPU=1``).
- More than one process (``torchrun --nproc_per_node=N`` or ``accelerate launch --multi_gpu``, data parallel):
  :func:`is_main_process` says whether this process writes llmft's files and messages (only one does),
  :func:`any_process` turns a per-process decision into one every process shares, :func:`process_rank` /
  :func:`process_count` / :func:`launched_distributed` say where this process stands.
- :data:`DEFAULT_SEED`: the seed every llmft default uses (Unsloth's notebooks use 3407 too).
"""
from __future__ import annotations

import os
import sys

DEFAULT_SEED = 3407
ALLOW_CPU_ENV = "LLMFT_ALLOW_CPU"
SMOKE_ENV = "LLMFT_SMOKE"


def smoke_mode() -> bool:
    """True when ``LLMFT_SMOKE=1``: notebooks swap hub ids for tiny local assets and shrink step counts."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes"}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ


def on_kaggle() -> bool:
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def _process_group():
    """``torch.distributed`` when a process group is up (never imports torch: the Kaggle tooling runs without it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def process_rank() -> int:
    """This process's global rank: torch.distributed's once the process group is up (the trainer starts it), before
    that the ``RANK`` every process of ``torchrun`` / ``accelerate launch`` gets, and 0 in a plain run."""
    group = _process_group()
    return group.get_rank() if group is not None else _int_env("RANK", 0)


def process_count() -> int:
    """How many processes train together (the world size): 1 in a plain run."""
    group = _process_group()
    return group.get_world_size() if group is not None else _int_env("WORLD_SIZE", 1)


def launched_distributed() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several (``WORLD_SIZE`` > 1);
    each process then owns one GPU, ``cuda:LOCAL_RANK``."""
    return _int_env("WORLD_SIZE", 1) > 1


def is_main_process(args=None) -> bool:
    """True in the process that writes llmft's files (metrics CSV, best checkpoints, configs, plots, adapters) and
    prints its messages: with a trainer's ``args``, transformers' own answer (``args.should_save``: process 0 of the
    world, or of each node with ``save_on_each_node``); without, global rank 0. Always True in a plain run."""
    if args is not None:
        return bool(args.should_save)
    return process_rank() == 0


def any_process(flag: bool) -> bool:
    """``flag`` or-ed over every process (accelerate's ``gather_object``), so a stop decision is the same everywhere: a
    process that stopped alone would leave the others waiting in the next gradient all-reduce. Every process must
    call it at the same point; in a plain run it returns ``flag``."""
    if process_count() <= 1:
        return bool(flag)
    from accelerate.utils import gather_object

    return any(gather_object([bool(flag)]))


def cpu_opt_in() -> str | None:
    """Which opt-in allows the CPU: "smoke" (``LLMFT_SMOKE=1``), "env" (``LLMFT_ALLOW_CPU=1``) or None."""
    if smoke_mode():
        return "smoke"
    return "env" if _truthy(os.environ.get(ALLOW_CPU_ENV)) else None


def cpu_allowed() -> bool:
    """True in smoke mode (``LLMFT_SMOKE=1``) or with ``LLMFT_ALLOW_CPU=1``."""
    return cpu_opt_in() is not None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _pdeathsig_setter():
    """A function ``(signal) -> bool`` asking Linux to send ``signal`` to this process when its parent exits
    (``prctl(PR_SET_PDEATHSIG)``), resolved now so that calling it runs no loader code (it is also called between
    fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda signum: prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def die_with_parent(signum: int | None = None, parent: int | None = None) -> bool:
    """Linux: have ``signum`` (default SIGKILL) sent to this process when its parent process exits, however it exits
    (``prctl(PR_SET_PDEATHSIG)``; strictly, when the parent's thread that started it exits). ``parent``: the parent's
    pid as the parent knew it; if this process already has another parent (the parent died before the request), the
    signal is sent at once. Returns whether the request was made (False off Linux: nothing is done)."""
    import signal

    signum = signal.SIGKILL if signum is None else signum
    setter = _pdeathsig_setter()
    if setter is None or not setter(signum):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


def die_with_launcher() -> bool:
    """In a worker started by torchrun (or ``accelerate launch``, which runs torchrun's agent; both set
    ``TORCHELASTIC_RUN_ID``): die with the launcher. torchrun starts each worker in a session of its own, so a kill of
    the launcher's process group (a notebook kernel restarted or killed) used to leave the workers training to the
    end, writing into ``output_dir`` while the cell was run again. ``import llmft`` calls it first thing; returns
    whether it applies and was set up. (A launcher killed in the instant between a worker's start and its ``import
    llmft`` is not seen: the worker then has its new parent already.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return die_with_parent()
