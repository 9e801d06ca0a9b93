"""A run's checkpoints on disk: which ``checkpoint-N`` folders in an ``output_dir`` are complete, in step order (used
to resume, to probe a run across its checkpoints, and to keep the best ones). An incomplete one (a kill or a full disk
while it was written) is skipped with a warning naming the file and why."""
from __future__ import annotations

import json
import os
from pathlib import Path

from llmft.environment import is_main_process
from llmft.log import logger


CHECKED_JSON = ("trainer_state.json", "adapter_config.json", "config.json")  # what a resume or an adapter load reads
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save files: zip archives (optimizer, scheduler, RNG, .bin weights)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _file_problem(path: Path) -> str | None:
    """Why ``path`` (a file of a checkpoint) cannot be read to its end, or None. Only what the formats allow cheaply:
    JSON parses; a safetensors file covers every tensor its header lists (safetensors' own check when it opens a file;
    a cut file fails it); a torch file has the zip central directory it writes last."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return f"{path.name} is empty (0 bytes)"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{path.name} is cut or not JSON ({size} bytes; {exc})"
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
            return f"{path.name} is cut or unreadable ({size} bytes; {exc})"
    elif path.suffix in TORCH_SUFFIXES:
        with path.open("rb") as handle:
            zipped = handle.read(2) == b"PK"  # torch's format since 1.6; an older pickle file is not checked
        if zipped:
            try:
                zipfile.ZipFile(path).close()
            except zipfile.BadZipFile:
                return f"{path.name} is cut ({size} bytes, its end is missing: not a whole torch file)"
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why the ``checkpoint-N`` folder ``checkpoint`` is not complete, naming the file, or None when it is.

    Complete means what resuming from it reads is whole: ``trainer_state.json`` parses and holds ``global_step``
    (transformers writes it last, with a plain ``open(..., "w")``: a kill or a full disk at that moment leaves it
    empty or cut), model weights are there (``adapter_model.safetensors`` for LoRA), and every file a resume or an
    adapter load reads — the weights, ``adapter_config.json``, ``optimizer.pt``, ``scheduler.pt``, the RNG states, in
    the folder and in its adapter subfolders (DPO's ``ref/``) — reads to its end (see :func:`_file_problem`).
    Tokenizer files are not read by a resume and not checked."""
    root = Path(checkpoint)
    state = root / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (transformers writes it last: the save did not finish)"
    folders = [root] + sorted(child for child in root.iterdir() if child.is_dir())
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and (path.name in CHECKED_JSON or path.name.endswith(".index.json")
                                   or path.suffix in (".safetensors",) + TORCH_SUFFIXES):
                problem = _file_problem(path)
                if problem:
                    return problem if folder == root else f"{folder.name}/{problem}"
    if "global_step" not in json.loads(state.read_text()):
        return "trainer_state.json has no global_step (not written by a transformers Trainer)"
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        return f"no model weights (none of {', '.join(WEIGHT_FILES[:2])}, ...)"
    return None


def checkpoints(output_dir: str | os.PathLike, *, verbose: bool = True) -> list[tuple[int, float, str]]:
    """``(step, epoch, path)`` of every complete ``checkpoint-N`` in a run's ``output_dir`` (see
    :func:`checkpoint_problem`), in step order. An incomplete one is skipped with a warning naming it and why (with
    ``verbose``): a resume falls back to the newest complete checkpoint before it."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if not (path.is_dir() and path.name.split("-")[-1].isdigit()):
            continue
        problem = checkpoint_problem(path)
        if problem:
            if verbose and is_main_process():
                logger.warning(f"llmft: skipping {path}: {problem}")
            continue
        info = json.loads((path / "trainer_state.json").read_text())
        found.append((int(info["global_step"]), float(info.get("epoch") or 0.0), str(path)))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike, *, verbose: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (see :func:`checkpoints`, which says which it skipped
    and why), or None."""
    found = checkpoints(output_dir, verbose=verbose)
    return found[-1][2] if found else None
