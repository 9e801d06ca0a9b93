"""A run's checkpoints on disk: which ``checkpoint-N`` folders in an ``output_dir`` are complete, in step order (used
to resume, to probe a run across its checkpoints, and to keep the best ones)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, float, str]]:
    """``(step, epoch, path)`` of every complete ``checkpoint-N`` in a run's ``output_dir`` (one whose
    trainer_state.json was written: transformers writes it last), in step order."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        state = path / "trainer_state.json"
        if path.name.split("-")[-1].isdigit() and state.exists():
            info = json.loads(state.read_text())
            found.append((int(info["global_step"]), float(info.get("epoch") or 0.0), str(path)))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (see :func:`checkpoints`), or None."""
    found = checkpoints(output_dir)
    return found[-1][2] if found else None
