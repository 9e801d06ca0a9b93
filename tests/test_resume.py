"""A run killed with SIGKILL after a checkpoint resumes to the same end as an uninterrupted run."""
import csv
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from llmft import callbacks

from conftest import REPO, same_after_resume

sys.path.insert(0, str(REPO / "tests"))
import resume_worker  # noqa: E402


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.numeric
@pytest.mark.slow
def test_killed_run_resumes_like_an_uninterrupted_one(tmp_path):
    reference = resume_worker.run(tmp_path / "reference", resume=False)
    assert reference.state.global_step == 30  # stopped early by the patience rule

    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "resume_worker.py"), str(out), "23"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert {p.name for p in out.glob("checkpoint-*")} >= {"checkpoint-20"}
    # rows 21-22 were logged after checkpoint-20; the process died in step 23, before logging it
    assert max(int(r["step"]) for r in _rows(out)) == 22

    resumed = resume_worker.run(out)  # resume="auto": picks checkpoint-20
    assert resumed.state.global_step == reference.state.global_step == 30
    stopper = callbacks.find_callback(resumed, callbacks.EarlyStopping)
    assert stopper.stopped_at_step == 30  # the counter (3 bad evaluations at step 20) carried over

    rows = _rows(out)
    counts = Counter((int(r["step"]), r["event"]) for r in rows)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    assert sorted(s for s, e in counts if e == "train") == list(range(1, 31))
    assert sorted(s for s, e in counts if e == "eval") == [5, 10, 15, 20, 25, 30]

    # Values, not only steps: the resumed run IS the uninterrupted run (bit for bit in fp32; bf16 within rounding).
    ref_rows = {(int(r["step"]), r["event"]): r for r in _rows(tmp_path / "reference")}
    assert set(ref_rows) == set(counts)
    for row in rows:
        ref = ref_rows[(int(row["step"]), row["event"])]
        keys = {"train": ("loss", "learning_rate", "grad_norm", "num_tokens"), "eval": ("eval_loss",),
                "summary": ("train_loss",)}[row["event"]]
        for key in keys:
            assert same_after_resume(row, ref, key), (row["step"], row["event"], key, row[key], ref[key])
    # the learning rate comes from the restored scheduler alone: exact in both precisions
    assert all(float(r["learning_rate"]) == float(ref_rows[(int(r["step"]), "train")]["learning_rate"])
               for r in rows if r["event"] == "train")
    best = callbacks.find_callback(resumed, callbacks.BestCheckpoint)
    assert all(int(k["step"]) <= 30 for k in best.kept) and os.path.isdir(best.best_path)
    assert best.best_step == callbacks.find_callback(reference, callbacks.BestCheckpoint).best_step
    reference_best = callbacks.find_callback(reference, callbacks.BestCheckpoint).best_value
    assert same_after_resume({"v": best.best_value}, {"v": reference_best}, "v")

    # adapters keep their dtype across the resume: in memory, and in checkpoints saved after it
    assert _lora_dtypes(resumed.model) == _lora_dtypes(reference.model)
    for name in ("checkpoint-25", "checkpoint-30"):
        assert _saved_dtypes(out / name) == _saved_dtypes(tmp_path / "reference" / name), name


def _lora_dtypes(model):
    return {name: str(p.dtype) for name, p in model.named_parameters() if "lora_" in name}


def _saved_dtypes(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


def test_resume_options(tmp_path):
    import llmft

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        llmft.train(resume_worker.build(tmp_path / "empty"), resume=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        llmft.train(resume_worker.build(tmp_path / "empty"), resume=str(tmp_path))
