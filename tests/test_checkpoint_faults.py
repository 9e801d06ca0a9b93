"""Faults during training: checkpoints left broken by a kill or a full disk, the totals a resumed run reports, a full
disk while saving. (Kill-and-resume of whole processes: tests/test_resume.py and tests/test_distributed.py.)"""
import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

import llmft  # first: Unsloth before transformers, as llmft guarantees
from transformers import TrainerCallback  # noqa: E402

from conftest import REPO, same_after_resume

MAX_STEPS, EVERY, CRASH_AT = 9, 3, 8  # checkpoints and evaluations at steps 3, 6, 9; the crash comes in step 8


class Disconnect(Exception):
    pass


class CrashAt(TrainerCallback):
    """Raise at the end of step ``step``, before it is logged or saved: the run stops as a disconnect stops it."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Disconnect(f"disconnected in step {self.step}")


def _build(tiny_dir, chats, output_dir, *callbacks, max_steps=MAX_STEPS, every=EVERY, evaluate=True):
    model, tokenizer = llmft.load_model(tiny_dir, max_seq_length=128, lora_r=8, seed=0)
    return llmft.build_trainer(
        model, tokenizer, chats.select(range(32)), chats.select(range(32, 40)) if evaluate else None,
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=5e-3, warmup_steps=1, eval_steps=every, save_total_limit=None, seed=0, verbose=False,
        callbacks=list(callbacks), disable_tqdm=True)


def _rows(out):
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _logged(history, key):
    """{step: value} of ``key`` in a trainer's log_history."""
    return {entry["step"]: entry[key] for entry in history if key in entry}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir, chat_dataset):
    """An uninterrupted run of MAX_STEPS, and the same run stopped in step CRASH_AT (checkpoints 3 and 6 written)."""
    tmp = tmp_path_factory.mktemp("faults")
    reference = _build(tiny_dir, chat_dataset, tmp / "reference")
    output = llmft.train(reference, resume=False)
    crashed = _build(tiny_dir, chat_dataset, tmp / "crashed", CrashAt(CRASH_AT))
    with pytest.raises(Disconnect):
        llmft.train(crashed, resume=False)
    assert sorted(p.name for p in (tmp / "crashed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    return {"reference": tmp / "reference", "crashed": tmp / "crashed", "output": output,
            "history": list(reference.state.log_history)}


def _copy(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["crashed"], run)
    return run


def _check_same_run(trainer, output, run, runs):
    """The resumed run reports the uninterrupted run's numbers: train_loss (returned, logged, in metrics.csv),
    the token counts of every train log and evaluation, every step logged once."""
    reference = runs["output"]
    assert trainer.state.global_step == MAX_STEPS
    assert same_after_resume({"event": "summary", "v": output.training_loss},
                             {"event": "summary", "v": reference.training_loss}, "v")
    assert output.metrics["train_loss"] == output.training_loss  # what transformers prints is the same number
    for key in ("num_tokens", "eval_num_tokens"):  # counts: exact in both precisions
        assert _logged(trainer.state.log_history, key) == _logged(runs["history"], key), key
    rows = _rows(run)
    counts = Counter((int(r["step"]), r["event"]) for r in rows)
    assert all(n == 1 for n in counts.values())
    summary = [r for r in rows if r["event"] == "summary"]
    assert len(summary) == 1 and same_after_resume(summary[0], [r for r in _rows(runs["reference"])
                                                                if r["event"] == "summary"][0], "train_loss")
    saved = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    assert _logged(saved, "num_tokens") == _logged(runs["history"], "num_tokens")


@pytest.mark.slow
@pytest.mark.numeric
def test_resume_skips_a_checkpoint_with_an_empty_trainer_state(runs, tmp_path, tiny_dir, chat_dataset, capsys):
    """B1: transformers writes trainer_state.json with a plain open(): a kill at that moment leaves it empty, and
    every resume="auto" failed for ever with JSONDecodeError. Now the checkpoint is skipped, saying which and why, and
    the run resumes from the one before and ends as the uninterrupted run."""
    run = _copy(runs, tmp_path)
    (run / "checkpoint-6" / "trainer_state.json").write_text("")
    trainer = _build(tiny_dir, chat_dataset, run)
    capsys.readouterr()
    output = llmft.train(trainer)
    said = capsys.readouterr().out
    assert f"skipping {run / 'checkpoint-6'}: trainer_state.json is empty" in said
    assert f"resuming from {run / 'checkpoint-3'}" in said
    _check_same_run(trainer, output, run, runs)


@pytest.mark.slow
def test_a_cut_adapter_is_skipped_and_named(runs, tmp_path, tiny_dir, chat_dataset, capsys):
    """B2: a cut adapter_model.safetensors in the newest checkpoint ("SafetensorError: incomplete metadata", no file
    named): resume="auto" takes the checkpoint before it; resuming from it by name says which file is cut."""
    from llmft import trainers

    run = _copy(runs, tmp_path)
    adapter = run / "checkpoint-6" / "adapter_model.safetensors"
    os.truncate(adapter, adapter.stat().st_size // 2)
    capsys.readouterr()
    assert trainers.latest_checkpoint(run) == str(run / "checkpoint-3")
    said = capsys.readouterr().out
    assert f"skipping {run / 'checkpoint-6'}: adapter_model.safetensors is cut" in said
    assert [step for step, _, _ in trainers.checkpoints(run, verbose=False)] == [3]
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors is cut.*resume from .*checkpoint-3"):
        llmft.train(_build(tiny_dir, chat_dataset, run), resume=str(run / "checkpoint-6"))


@pytest.mark.slow
@pytest.mark.numeric
def test_resumed_run_reports_the_whole_runs_loss_and_tokens(runs, tmp_path, tiny_dir, chat_dataset):
    """B3: after a resume, train_loss (returned and printed) summed only the resumed part (2.815 or 4.922 instead of
    6.074), and TRL's num_tokens / eval_num_tokens restarted from 0 (only metrics.csv's rows were corrected)."""
    run = _copy(runs, tmp_path)
    trainer = _build(tiny_dir, chat_dataset, run)
    output = llmft.train(trainer)
    assert trainer.state.log_history[0]["step"] == 1  # the checkpoint's history, then the resumed part
    _check_same_run(trainer, output, run, runs)


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, tiny_dir, chat_dataset):
    out = tmp_path_factory.mktemp("one") / "run"
    llmft.train(_build(tiny_dir, chat_dataset, out, max_steps=1, every=1, evaluate=False), resume=False)
    return out / "checkpoint-1"


CORRUPTIONS = [  # (file, what is done to it, what the reason says)
    ("trainer_state.json", "empty", "trainer_state.json is empty"),
    ("trainer_state.json", "half", "trainer_state.json is cut"),
    ("trainer_state.json", "delete", "no trainer_state.json"),
    ("adapter_model.safetensors", "half", "adapter_model.safetensors is cut"),
    ("adapter_model.safetensors", "delete", "no model weights"),
    ("adapter_config.json", "half", "adapter_config.json is cut"),
    ("optimizer.pt", "half", "optimizer.pt is cut"),
    ("scheduler.pt", "empty", "scheduler.pt is empty"),
    ("rng_state.pth", "last byte", "rng_state.pth is cut"),
]


def test_checkpoint_problem_names_the_broken_file(one_checkpoint, tmp_path, capsys):
    """B1/B2: what "complete" means: every file a resume reads is whole (see trainers.checkpoint_problem)."""
    from llmft import trainers

    assert trainers.checkpoint_problem(one_checkpoint) is None
    for index, (name, how, reason) in enumerate(CORRUPTIONS):
        run = tmp_path / str(index)
        shutil.copytree(one_checkpoint, run / "checkpoint-1")
        path = run / "checkpoint-1" / name
        if how == "delete":
            path.unlink()
        else:
            size = path.stat().st_size
            os.truncate(path, {"empty": 0, "half": size // 2, "last byte": size - 1}[how])
        assert reason in (trainers.checkpoint_problem(run / "checkpoint-1") or ""), (name, how)
        capsys.readouterr()
        assert trainers.checkpoints(run) == [] and trainers.latest_checkpoint(run, verbose=False) is None
        assert f"skipping {run / 'checkpoint-1'}: {reason}" in capsys.readouterr().out


def _fill_disk_at_step(monkeypatch, step, how):
    """Make the save of checkpoint-``step`` fail as a full disk makes it fail, as measured on a full tmpfs: torch's zip
    writer with "unexpected pos" and no errno (then the free space tells), or an OSError ENOSPC from a plain write
    (trainer_state.json)."""
    import shutil as shutil_module

    import torch
    from transformers.trainer_callback import TrainerState

    folder = f"checkpoint-{step}"
    if how == "torch":
        save = torch.save

        def full_save(obj, f, *args, **kwargs):
            if folder in str(f) and str(f).endswith("optimizer.pt"):
                with open(f, "wb") as handle:
                    handle.write(b"PK\x03\x04" + b"\0" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", full_save)
        usage = shutil_module.disk_usage
        monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(path)._replace(free=150_000))
    else:
        write = TrainerState.save_to_json

        def full_write(self, json_path):
            if folder in str(json_path):
                with open(json_path, "w") as handle:
                    handle.write('{"global_step": ')
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(self, json_path)

        monkeypatch.setattr(TrainerState, "save_to_json", full_write)


@pytest.mark.parametrize("how", ["torch", "oserror"])
def test_full_disk_while_saving_says_where_and_how_much(tmp_path, tiny_dir, chat_dataset, monkeypatch, how):
    """B4: a full disk during a checkpoint stopped training with torch's "enforce fail at inline_container.cc ...
    unexpected pos". Now: no space left on <dir>, N MB free, a checkpoint needs about M MB; the incomplete checkpoint
    removed, metrics.csv intact, and the next run resumes from the last complete checkpoint."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fill_disk_at_step(patch, 2, how)
        with pytest.raises(OSError) as caught:
            llmft.train(_build(tiny_dir, chat_dataset, out, max_steps=3, every=1, evaluate=False), resume=False)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert f"no space left on {out}: " in message and " MB free, a checkpoint needs about " in message, message
    needed = float(message.split("needs about ")[1].split(" MB")[0])
    assert needed == pytest.approx(sum(p.stat().st_size for p in (out / "checkpoint-1").iterdir()) / 1e6, abs=0.05)
    assert "checkpoint-2 it was writing was removed" in message and "resumes from checkpoint-1" in message
    assert not (out / "checkpoint-2").exists()
    assert "inline_container" in str(caught.value.__cause__) or isinstance(caught.value.__cause__, OSError)
    rows = _rows(out)
    assert [(int(r["step"]), r["event"]) for r in rows] == [(1, "train"), (2, "train")]
    assert all(r["loss"] not in ("", None) for r in rows)

    trainer = _build(tiny_dir, chat_dataset, out, max_steps=3, every=1, evaluate=False)
    llmft.train(trainer)  # space freed: resumes from checkpoint-1
    assert trainer.state.global_step == 3 and [int(r["step"]) for r in _rows(out) if r["event"] == "train"] == [1, 2, 3]


def _user_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


DISK_FULL_SCRIPT = """
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$DISK" || exit 90
"$PYTHON" "$WORKER" "$DISK/run" > "$LOGS/first.log" 2>&1
echo "first=$?"
mount -o remount,size=8m "$DISK" || exit 91
"$PYTHON" "$WORKER" "$DISK/run" > "$LOGS/second.log" 2>&1
echo "second=$?"
cp "$DISK/run/metrics.csv" "$LOGS/metrics.csv"
ls "$DISK/run" > "$LOGS/listing.txt"
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("unshare") is None or not _user_namespaces(),
                    reason="needs Linux user namespaces (unshare -rm) to mount a small tmpfs without root")
def test_full_tmpfs_during_a_checkpoint(tmp_path):
    """B4 on a real full disk: the resume worker's run (checkpoints every 5 steps, each ~0.2 MB) in a 560 KB tmpfs
    mounted in a private mount namespace. The first save that does not fit stops the run with the message (not torch's
    inline_container error); after the disk grows, the same command resumes and finishes."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIZE": "560k", "DISK": str(disk), "LOGS": str(logs),
           "PYTHON": sys.executable, "WORKER": str(REPO / "tests" / "resume_worker.py")}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", DISK_FULL_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=800, cwd=tmp_path)
    first, second = (logs / "first.log").read_text(), (logs / "second.log").read_text()
    assert "first=1" in done.stdout, (done.stdout, done.stderr, first[-3000:])
    assert "OSError: [Errno 28] no space left on " in first and " MB free, a checkpoint needs about " in first, \
        first[-3000:]
    assert "was removed" in first and "metrics.csv and the complete checkpoints are intact" in first
    assert "second=0" in done.stdout, second[-3000:]
    assert "llmft.train: resuming from " in second
    with open(logs / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = Counter((int(r["step"]), r["event"]) for r in rows)
    assert all(n == 1 for n in counts.values())
    assert sorted(s for s, e in counts if e == "train") == list(range(1, 31))  # early stopping at 30, as uninterrupted
