"""A run killed with SIGKILL after a checkpoint resumes to the same end as an uninterrupted run, through
``llmft.train`` and through the trainer's own ``train(resume_from_checkpoint=...)`` (TRL's and Unsloth's spelling)."""
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
    _kill(out, 23, "sft")
    assert {p.name for p in out.glob("checkpoint-*")} >= {"checkpoint-20"}
    # rows 21-22 were logged after checkpoint-20; the process died in step 23, before logging it
    assert max(int(r["step"]) for r in _rows(out)) == 22

    resumed = resume_worker.run(out, resume=True, spelling="trl")  # trainer.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == reference.state.global_step == 30
    stopper = callbacks.find_callback(resumed, callbacks.EarlyStopping)
    assert stopper.stopped_at_step == 30  # the counter (3 bad evaluations at step 20) carried over

    _same_rows(out, tmp_path / "reference", steps=30, every=5, keys={
        "train": ("loss", "learning_rate", "grad_norm", "num_tokens"), "eval": ("eval_loss",),
        "summary": ("train_loss",)})
    best = callbacks.find_callback(resumed, callbacks.BestCheckpoint)
    assert all(int(k["step"]) <= 30 for k in best.kept) and os.path.isdir(best.best_path)
    assert best.best_step == callbacks.find_callback(reference, callbacks.BestCheckpoint).best_step
    reference_best = callbacks.find_callback(reference, callbacks.BestCheckpoint).best_value
    assert same_after_resume({"v": best.best_value}, {"v": reference_best}, "v")

    # adapters keep their dtype across the resume: in memory, and in checkpoints saved after it
    assert _lora_dtypes(resumed.model) == _lora_dtypes(reference.model)
    for name in ("checkpoint-25", "checkpoint-30"):
        assert _saved_dtypes(out / name) == _saved_dtypes(tmp_path / "reference" / name), name


def _kill(out, step, kind):
    """Run resume_worker.py in a subprocess that SIGKILLs itself at the end of ``step``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "resume_worker.py"), str(out), str(step), kind],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]


def _same_rows(out, reference, *, steps, every, keys):
    """metrics.csv of the resumed run in ``out``: one row per (step, event), every step up to ``steps``, an evaluation
    every ``every``, and each value in ``keys`` (by event) the uninterrupted ``reference`` run's (bit for bit in fp32;
    bf16 within rounding); the learning rate comes from the restored scheduler alone: exact in both precisions."""
    rows = _rows(out)
    counts = Counter((int(r["step"]), r["event"]) for r in rows)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    assert sorted(s for s, e in counts if e == "train") == list(range(1, steps + 1))
    assert sorted(s for s, e in counts if e == "eval") == list(range(every, steps + 1, every))
    ref_rows = {(int(r["step"]), r["event"]): r for r in _rows(reference)}
    assert set(ref_rows) == set(counts)
    for row in rows:
        ref = ref_rows[(int(row["step"]), row["event"])]
        for key in keys[row["event"]]:
            assert same_after_resume(row, ref, key), (row["step"], row["event"], key, row[key], ref[key])
        if row["event"] == "train":
            assert float(row["learning_rate"]) == float(ref["learning_rate"]), row["step"]
    return rows


@pytest.mark.numeric
@pytest.mark.slow
def test_killed_dpo_run_resumes_through_the_trainers_own_train(tmp_path):
    """TRL's spelling after a SIGKILL: ``trainer.train(resume_from_checkpoint=True)`` on llmft's DPO trainer reloads
    the policy adapter PEFT saved at the checkpoint's root beside TRL's ``ref/`` copy (transformers alone would
    restart the policy from its initialisation: loss back at ln 2), so the run ends as the uninterrupted one."""
    steps, every = resume_worker.DPO_STEPS, resume_worker.DPO_EVERY
    reference = resume_worker.run(tmp_path / "reference", resume=False, kind="dpo")
    assert reference.state.global_step == steps
    out = tmp_path / "interrupted"
    _kill(out, 2 * every + 2, "dpo")
    assert max(int(r["step"]) for r in _rows(out)) == 2 * every + 1
    resumed = resume_worker.run(out, resume=True, kind="dpo", spelling="trl")
    assert resumed.state.global_step == steps
    _same_rows(out, tmp_path / "reference", steps=steps, every=every, keys={
        "train": ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"),
        "eval": ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"), "summary": ("train_loss",)})
    ours, theirs = _policy(resumed.model), _policy(reference.model)
    assert ours.keys() == theirs.keys() and ours
    import torch

    from conftest import BF16

    for name, value in ours.items():  # the trained policy itself: bit for bit in fp32
        assert (torch.allclose(value, theirs[name], rtol=2e-2, atol=1e-3) if BF16
                else torch.equal(value, theirs[name])), name


def _policy(model):
    return {name: p.detach().float() for name, p in model.named_parameters() if ".default." in name}


def _lora_dtypes(model):
    return {name: str(p.dtype) for name, p in model.named_parameters() if "lora_" in name}


def _saved_dtypes(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}


def test_resume_options(tmp_path):
    import llmft

    with pytest.raises(FileNotFoundError, match=r"llmft.train\(resume=True\): no complete checkpoint"):
        llmft.train(resume_worker.build(tmp_path / "empty"), resume=True)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        llmft.train(resume_worker.build(tmp_path / "empty"), resume=str(tmp_path))
    trainer = resume_worker.build(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"LlmftSFTTrainer.train\(resume_from_checkpoint=True\): no complete"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint='.*'\): not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    with pytest.raises(TypeError, match=r"resume_from_checkpoint=3.5\): give 'auto', True"):
        trainer.train(resume_from_checkpoint=3.5)
