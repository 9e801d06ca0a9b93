"""Where a run happens: refuse to train on a CPU by accident, say once what the GPU is, and put outputs where they
survive a recycled VM.

- :func:`require_gpu`: outside smoke mode, loading a hub model with no CUDA device stops with how to pick a T4 on
  Colab and on Kaggle (Unsloth itself only prints one line and trains a 3B model on the CPU for hours). A P100
  (sm_60: current CUDA torch builds ship no kernels for it) is refused too. ``LLMFT_ALLOW_CPU=1`` (or
  ``load_model(..., allow_cpu=True)``) allows the CPU on purpose.
- :func:`preflight`: one summary line (GPU, compute capability, VRAM, precision, torch/CUDA/Unsloth versions), printed
  once per process by ``load_model`` (by the main process only under torchrun); Kaggle's two T4s get a note that
  one is used, unless a launcher started one process per GPU.
- :func:`output_dir`: Google Drive on Colab (when mounted, or mounted on request), ``/kaggle/working`` on Kaggle,
  ``outputs/`` elsewhere; :func:`previous_adapters`: an earlier notebook's adapters from there or, on Kaggle, from its
  saved output attached under ``/kaggle/input``, or a stop that says how to bring them. :func:`download_dir`: where
  pinned downloads (checked by sha256) are kept between runs; :func:`build_atomically`: a folder is built under a
  temporary name and renamed when complete.
- The process and platform helpers notebooks use as ``llmft.runtime.*`` (:func:`is_main_process`,
  :func:`any_process`, :func:`process_rank`, :func:`process_count`, :func:`launched_distributed`, :func:`on_colab`,
  :func:`on_kaggle`, :func:`cpu_allowed`) live in :mod:`llmft.environment` and are re-exported here;
  :func:`llmft.recipes.torchrun_recipe` starts a recipe on several GPUs from a notebook cell.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import os
import shutil
import tempfile
from pathlib import Path

from llmft.environment import (  # noqa: F401  (re-exported: notebooks and recipes use them as llmft.runtime.*)
    ALLOW_CPU_ENV, _int_env, _truthy, any_process, cpu_allowed, cpu_opt_in, is_main_process, launched_distributed, on_colab, on_kaggle,
    process_count, process_rank,
)

T4_HOWTO = (
    "Colab: Runtime > Change runtime type > Hardware accelerator: T4 GPU > Save, then run the notebook again from "
    "the top (the runtime restarts). Kaggle: Settings > Accelerator > GPU T4 x2 (not P100), then run again from the "
    "top (in a pushed kernel: machine_shape NvidiaTeslaT4 in kernel-metadata.json).")
DRIVE_ENV = "LLMFT_DRIVE"
DRIVE_MOUNT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive/llmft"
DOWNLOADS_ENV = "LLMFT_DOWNLOADS"
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_INPUT = "/kaggle/input"

_preflight_printed = False


class NoGPUError(RuntimeError):
    """No usable CUDA GPU for a run that needs one; the message says how to get one or how to opt in to the CPU."""


def _cpu_reason(allow_cpu: bool | None = None) -> str:
    """Why a run is on the CPU: ``allow_cpu=True`` given, the opt-in that is set, or that none is."""
    opt_in = "argument" if allow_cpu else cpu_opt_in()
    return {"argument": "allow_cpu=True: on the CPU on purpose",
            "smoke": "smoke mode (LLMFT_SMOKE=1): tiny offline models",
            "env": f"{ALLOW_CPU_ENV}=1 set: on the CPU on purpose"}.get(
        opt_in, f"neither smoke mode nor {ALLOW_CPU_ENV}=1 is set: only local model directories (or allow_cpu=True) "
                "load here")


def require_gpu(what: str, *, allow_cpu: bool | None = None) -> None:
    """Raise :class:`NoGPUError` when ``what`` (e.g. ``load_model('unsloth/...')``) would run on the CPU or on a GPU
    this torch has no kernels for. ``allow_cpu=None`` follows :func:`cpu_allowed`."""
    import torch

    if allow_cpu is None:
        allow_cpu = cpu_allowed()
    if torch.cuda.is_available():
        _refuse_unsupported_gpu(what)
        return
    if allow_cpu:
        return
    if torch.version.cuda is None:
        why = (f"this torch ({torch.__version__}) is a CPU-only build, so even a GPU runtime would not be used. If "
               "the install replaced the image's CUDA torch, restart the runtime (Colab: Runtime > Disconnect and "
               "delete runtime; Kaggle: Run > Restart & clear cell outputs) and run the install cell again.")
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: no GPU is attached."
    raise NoGPUError(
        f"{what}: no CUDA GPU, and training a hub model on the CPU takes hours. {why}\nTo get a T4: {T4_HOWTO}\n"
        f"To run on the CPU on purpose: set {ALLOW_CPU_ENV}=1 before loading (or pass allow_cpu=True); "
        "LLMFT_SMOKE=1 runs the notebooks on tiny offline models instead.")


def _refuse_unsupported_gpu(what: str) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{major}{minor}"
    compiled = torch.cuda.get_arch_list()
    if compiled and not any(a.startswith(f"sm_{major}") or a.startswith(f"compute_{major}") for a in compiled) and \
            (major, minor) < (7, 0):
        raise NoGPUError(
            f"{what}: GPU 0 is a {torch.cuda.get_device_name(0)} ({arch}); torch {torch.__version__} has kernels only "
            f"for {', '.join(compiled)}, so every CUDA call would fail with 'no kernel image is available' (Kaggle's "
            f"P100 is such a GPU). {T4_HOWTO}")


def precision_name(dtype=None) -> str:
    """What the run computes in: the dtype given, else bf16 on Ampere+, fp16 on a T4, Unsloth's choice on a CPU."""
    import torch

    if dtype is not None:
        return str(dtype).replace("torch.", "")
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16 (no bf16 on this GPU)"
    try:
        from unsloth_zoo.cpu.runtime import cpu_bf16_supported  # type: ignore

        return "bfloat16 (Unsloth CPU mode, native bf16)" if cpu_bf16_supported() else "float32 (Unsloth CPU mode)"
    except Exception:  # noqa: BLE001 - older unsloth_zoo: no CPU mode helper
        return "float32 (CPU)"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def preflight(dtype=None, *, force: bool = False, allow_cpu: bool | None = None) -> dict:
    """Describe the machine in one line (printed once per process unless ``force``, and only by the main process when
    several train together) and return it as a dict. On a CPU the line says what allowed it (``allow_cpu=True`` as
    given to ``load_model``, smoke mode, ``LLMFT_ALLOW_CPU``) or that nothing did, with how to get a T4."""
    global _preflight_printed
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "unsloth": _version("unsloth"),
            "precision": precision_name(dtype), "gpu": None, "capability": None, "vram_gib": None,
            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0, "notes": []}
    if info["gpu_count"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                    vram_gib=round(props.total_memory / 2**30, 1))
        if launched_distributed():
            info["notes"].append(f"{process_count()} processes (data parallel), one GPU each: this one on "
                                 f"cuda:{_int_env('LOCAL_RANK', 0)} of {info['gpu_count']} visible.")
        elif info["gpu_count"] > 1:
            info["notes"].append(f"{info['gpu_count']} GPUs visible; Unsloth trains on one. Set "
                                 "CUDA_VISIBLE_DEVICES=0 before importing torch (llmft does it on Kaggle when it is "
                                 "imported first), or launch with torchrun to train on all (README: More than one "
                                 "GPU).")
    if on_kaggle() and os.environ.get("CUDA_VISIBLE_DEVICES") == "0":
        info["notes"].append("Kaggle: training on GPU 0 only (CUDA_VISIBLE_DEVICES=0); a second T4 stays idle "
                             "(`torchrun --nproc_per_node=2 -m llmft train ...` uses both).")
    if info["gpu"]:
        where = f"{info['gpu']} ({info['capability']}, {info['vram_gib']} GiB)"
    else:
        where = f"CPU (no CUDA GPU; {_cpu_reason(allow_cpu)})"
        if not (allow_cpu or cpu_allowed()):
            info["notes"].append(f"no GPU: load_model of a hub model stops here; to get a T4: {T4_HOWTO} To run on "
                                 f"the CPU on purpose: {ALLOW_CPU_ENV}=1.")
    line = (f"llmft preflight: {where} | precision {info['precision']} | torch {info['torch']} "
            f"(CUDA {info['cuda'] or 'none'}) | Unsloth {info['unsloth']}")
    if (force or not _preflight_printed) and is_main_process():
        print(line + "".join(f"\n  note: {note}" for note in info["notes"]))
        _preflight_printed = True
    info["line"] = line
    return info


def output_dir(name: str = "", *, drive: bool | None = None) -> str:
    """The folder a notebook writes to (created), ``name`` below the root that survives the platform's recycling:

    - Colab: ``/content/drive/MyDrive/llmft/<name>`` when Google Drive is mounted, or mounted here with
      ``drive=True`` (or ``LLMFT_DRIVE=1``; Colab asks for permission); otherwise ``outputs/<name>`` on the VM's disk,
      which is lost when the runtime is recycled.
    - Kaggle: ``/kaggle/working/<name>``, saved as the notebook's output when you Save Version.
    - elsewhere: ``outputs/<name>`` in the working directory.
    """
    if drive is None:
        drive = _truthy(os.environ.get(DRIVE_ENV))
    if on_kaggle() and os.path.isdir(KAGGLE_WORKING):
        root = KAGGLE_WORKING
    elif on_colab() and (drive or os.path.isdir(os.path.dirname(DRIVE_ROOT))):
        if not os.path.isdir(os.path.dirname(DRIVE_ROOT)):
            from google.colab import drive as colab_drive  # type: ignore

            colab_drive.mount(DRIVE_MOUNT)
        root = DRIVE_ROOT
    else:
        if drive:
            print("llmft.output_dir: drive=True only applies on Colab; writing to outputs/ here.")
        elif on_colab():
            print("llmft.output_dir: Google Drive is not mounted, so outputs/ is lost when Colab recycles the VM; "
                  "output_dir(..., drive=True) keeps checkpoints and adapters on Drive.")
        root = "outputs"
    path = os.path.join(root, name) if name else root
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def previous_adapters(name: str, *, made_by: str, drive: bool | None = None, missing_ok: bool = False,
                      switch: str = "missing_ok=True") -> str | None:
    """The adapters an earlier notebook saved, ``output_dir(name)/adapters``, for a notebook that continues from them
    (02 from 01's, 03 from 01's and 02's). Each notebook runs in its own Colab or Kaggle session, so they are looked
    for where the earlier one can leave them:

    - :func:`output_dir` ``(name, drive=drive)``: the same machine or session; on Colab, Google Drive when mounted
      (``drive=True`` mounts it), where the earlier notebook wrote them with ``DRIVE = True``;
    - Kaggle: ``/kaggle/input/**/<name>/adapters``, the earlier notebook's saved output attached as an input.

    Returns the folder (it holds ``adapter_config.json``). When there is none: with ``missing_ok`` None and a line
    saying so (the caller starts from the base model), else :class:`FileNotFoundError` saying how to bring them
    (``switch`` names the caller's setting that allows going on without them)."""
    import glob

    here = os.path.join(output_dir(name, drive=drive), "adapters")
    looked = [here]
    candidates = [here]
    if on_kaggle():
        pattern = os.path.join(KAGGLE_INPUT, "**", name, "adapters")
        looked.append(pattern)
        candidates += sorted(glob.glob(pattern, recursive=True))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return folder
    if missing_ok:
        print(f"llmft: no adapters from {made_by} (looked in {', '.join(looked)}); going on without them ({switch}).")
        return None
    raise FileNotFoundError(
        f"The adapters of {made_by} are not here (looked in {', '.join(looked)}). Each notebook runs in its own "
        f"session, so bring them over:\n"
        f"- Colab: run {made_by} with DRIVE = True (it saves to Google Drive, {DRIVE_ROOT}/{name}), then set DRIVE = "
        f"True in this notebook's settings too: it mounts Drive and finds them there.\n"
        f"- Kaggle: run {made_by} and Save Version; in this notebook, Add Input > Your Work > Notebooks > that "
        f"notebook: its output appears under {KAGGLE_INPUT}/<its name>/ and {name}/adapters is found there.\n"
        f"- Elsewhere: run {made_by} in this working directory first (it writes {here}).\n"
        f"Or go on without them: {switch} in this notebook's settings.")


def download_dir() -> Path:
    """Where pinned downloads are kept (``$LLMFT_DOWNLOADS``, else ``~/.cache/llmft/downloads``): archives whose sha256
    is recorded in llmft and what is extracted from them (e.g. llama.cpp's GGUF converter). Their content is fixed by
    the pin, so every run, tests included, shares one copy and works offline after the first fetch."""
    root = os.environ.get(DOWNLOADS_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llmft", "downloads")
    return Path(root)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (pinned downloads and converted assets record it)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pinned_download(distribution: str, version: str, sha256: str, folder: str | os.PathLike, filename: str, *,
                    source: bool = False, what: str = "", fix: str = "") -> Path:
    """``folder/filename``, downloaded once from the package index with ``pip download --require-hashes`` (a wheel, or
    the source archive with ``source=True``) and its sha256 checked again on every call; offline afterwards. Raises
    :class:`FileNotFoundError` saying what failed and how to fix it (``fix``: the caller's own way out)."""
    folder = Path(folder)
    path = folder / filename
    name = f"{distribution}=={version}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(folder / f".{filename}.lock"):  # processes that need it at once download it once
            if not path.exists():
                _download(distribution, version, sha256, path, source, what, fix)
    digest = file_sha256(path)
    if digest != sha256:
        raise FileNotFoundError(f"{path} has sha256 {digest}, expected {sha256} ({name}). Delete it and run again to "
                                "download the pinned file.")
    return path


def _download(distribution: str, version: str, sha256: str, path: Path, source: bool, what: str, fix: str) -> None:
    """``pip download`` into a temporary folder beside ``path``, then a rename: a download cut short leaves no file
    under the final name."""
    import subprocess
    import sys

    from llmft.log import say

    name = f"{distribution}=={version}"
    say(f"downloading {name}{f' ({what})' if what else ''} into {path.parent}; once")
    kind = ["--no-binary", distribution] if source else ["--only-binary=:all:"]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
        requirement = Path(tmp) / f"{distribution}-{version}.txt"
        requirement.write_text(f"{name} --hash=sha256:{sha256}\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--require-hashes",
                               "--disable-pip-version-check", "-q", "-r", str(requirement), "-d", tmp],
                              capture_output=True, text=True)
        got = Path(tmp) / path.name
        if done.returncode != 0 or not got.exists():
            raise FileNotFoundError(
                f"`pip download {name}` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
                f"\nFix: make the package index reachable once (later runs are offline), or put {path.name} at "
                f"{path}" + (f", or {fix}" if fix else "") + ".")
        os.replace(got, path)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created if missing) for the ``with`` block; the kernel
    releases it if the process dies. Processes that need one result at once (torchrun's workers, pytest-xdist's
    workers, two notebooks) build or download it once: the others wait, then find it done."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``target``; reuse ``target`` when it is already complete (it
    holds ``.complete``), so a crash or a kill never leaves a half-built folder that looks finished. Processes that
    need the same ``target`` at once (the workers of one torchrun job) build it once: the first builds under an
    exclusive lock (``fcntl.flock`` on ``.<name>.lock`` beside it), the others wait and reuse its result instead of
    each building the same folder (three processes built it three times without the lock). A folder left without
    ``.complete`` is built again."""
    target = Path(target)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if (target / ".complete").exists():  # built by another process while this one waited
            return target
        if target.exists():  # a leftover without .complete (an older llmft, a crash between rename and marker)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
