"""More than one process (DDP): the recipes under ``torchrun --nproc_per_node=2`` (gloo on the CPU, the tiny model), and
the rank rules that make them safe: one writer, the same decisions in every process, resume.

Every torchrun job here is a real one (two processes, ``DistributedDataParallel``, gloo); each takes a few tens of
seconds, most of it importing Unsloth in both processes.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed
import yaml

from llmft import callbacks, recipes, runtime

from conftest import BF16, REPO, same_after_resume

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

MAX_STEPS, EVERY = 12, 3
# Every evaluation after the first counts as "no improvement" (min_delta is huge), so early stopping (patience 2)
# stops at the 3rd evaluation, step 9 of 12 — and only there if its counter survives a resume.
STOP_AT = 3 * EVERY
CONTROL = {"max_steps": MAX_STEPS, "eval_steps": EVERY, "early_stopping_patience": 2,
           "early_stopping_min_delta": 1.0e9, "save_total_limit": 3, "keep_best": 2, "gradient_accumulation_steps": 1}


def _recipe(tmp_path, name, command, **training):
    """recipes/01_sft.yaml or 02_dpo.yaml with its smoke section pointed at tmp_path (and a few changes)."""
    source = REPO / "recipes" / ("01_sft.yaml" if command == "train" else "02_dpo.yaml")
    recipe = yaml.safe_load(source.read_text())
    smoke = recipe["smoke"]
    smoke["training"].update({"output_dir": str(tmp_path / name), **CONTROL, **training})
    smoke["data"].update(rows=48, eval_rows=8)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / name


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def _torchrun(*args, cwd, **env):
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (as ``python -m torch.distributed.run``, the same program)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=900,
                          start_new_session=True)


def _cli(command, recipe, cwd):
    done = _torchrun("-m", "llmft", command, recipe, "--smoke", cwd=cwd)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])


def _worker(command, recipe, report_dir, cwd, kill_at=None, **env):
    return _torchrun(REPO / "tests" / "ddp_worker.py", command, recipe, report_dir,
                     *([kill_at] if kill_at else []), cwd=cwd, **env)


def _rows(out):
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _check_one_writer(out, last_step):
    """metrics.csv has each (step, event) once, every train step up to ``last_step``, and no half-written files;
    best/ holds exactly the checkpoints best.json lists, each complete."""
    rows = _rows(out)
    counts = Counter((int(r["step"]), r["event"]) for r in rows)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    assert sorted(s for s, e in counts if e == "train") == list(range(1, last_step + 1))
    assert sorted(s for s, e in counts if e == "eval") == list(range(EVERY, last_step + 1, EVERY))
    assert not list(out.rglob("*.tmp")) and not list((out / "best").glob(".tmp-*"))
    best = json.loads((out / "best" / "best.json").read_text())
    assert {p.name for p in (out / "best").glob("step-*")} == {Path(k["path"]).name for k in best["kept"]}
    assert all((Path(k["path"]) / "adapter_model.safetensors").exists() for k in best["kept"])
    return rows, best


def _reports(report_dir):
    reports = [json.loads((report_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    assert all(r["distributed"] and r["parallel_mode"] == "ParallelMode.DISTRIBUTED" for r in reports)
    return reports


def _check_ranks_agree(reports):
    """Both processes stopped at the same step with the same weights, saw the same evaluation metrics (probe scores
    included), shared a stop vote, and got every prompt's answer once, in order, from the split generation."""
    first, second = reports
    assert first["global_step"] == second["global_step"]
    assert first["lora_sha256"] == second["lora_sha256"]  # DDP kept the replicas identical
    assert first["evaluations"] == second["evaluations"] and first["evaluations"]
    assert first["train_logs"] == second["train_logs"]  # the logged (gathered) values, step by step
    assert all(r["any_when_only_rank_1"] is True and r["any_when_none"] is False for r in reports)
    for report in reports:
        assert report["generated_across_processes"] == report["generated_here"]
        assert len(report["generated_across_processes"]) == 7
    assert first["generated_across_processes"] == second["generated_across_processes"]


def _check_same_values(rows, reference_rows, train_keys, eval_keys):
    """The resumed run IS the uninterrupted one: bit for bit in fp32, within rounding in bf16 (as tests/test_resume.py
    checks for one process); the learning rate comes from the restored scheduler alone: exact in both."""
    reference = {(int(r["step"]), r["event"]): r for r in reference_rows}
    assert set(reference) == {(int(r["step"]), r["event"]) for r in rows}
    keys = {"train": train_keys, "eval": eval_keys, "summary": ("train_loss",)}
    for row in rows:
        ref = reference[(int(row["step"]), row["event"])]
        for key in keys[row["event"]]:
            assert same_after_resume(row, ref, key), (row["step"], row["event"], key, row[key], ref[key])
        if row["event"] == "train":
            assert float(row["learning_rate"]) == float(ref["learning_rate"])


def _trainer_state(out, step):
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    """An uninterrupted 2-process SFT recipe run (the reference the resumed run must match), started as a notebook
    cell starts it: ``llmft.torchrun_recipe`` (torchrun of ``python -m llmft train``)."""
    tmp = tmp_path_factory.mktemp("sft_reference")
    recipe, out = _recipe(tmp, "sft", "train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
        assert recipes.torchrun_recipe(recipe, "train", smoke=True) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_sft_recipe_on_two_processes_writes_once_and_stops_early(sft_reference, tmp_path, launcher):
    """Before llmft was rank-aware, both processes rewrote metrics.csv through one temporary file: 6 runs of 8 crashed
    (FileNotFoundError on metrics.csv.tmp) and the others logged every row twice. Run twice here, with both launchers
    (and five more times, with the same writers, in the tests below). ``accelerate launch --multi_gpu`` starts its
    processes through torchrun too (``--cpu`` would start one process here: its multi-CPU path needs mpirun)."""
    if launcher == "torchrun":
        out = sft_reference
    else:
        recipe, out = _recipe(tmp_path, "sft", "train")
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "-m", "llmft", "train", str(recipe), "--smoke"], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=900, start_new_session=True)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    rows, best = _check_one_writer(out, STOP_AT)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == STOP_AT < MAX_STEPS
    early = _trainer_state(out, STOP_AT)["stateful_callbacks"]["EarlyStopping"]["attributes"]
    assert early["stopped_at_step"] == STOP_AT
    assert "eval_probe/fibonacci" in rows[0]  # the recipe's live probe, scored across the two processes
    assert best["metric"] == "eval_loss" and (out / "adapters" / "adapter_model.safetensors").exists()


@pytest.mark.numeric
@pytest.mark.slow
def test_killed_sft_run_resumes_under_torchrun_to_the_same_end(sft_reference, tmp_path):
    recipe, out = _recipe(tmp_path, "sft", "train")
    killed = _worker("train", recipe, tmp_path / "killed", tmp_path, kill_at=STOP_AT - 2)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout[-2000:], killed.stderr[-4000:])
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{EVERY}", f"checkpoint-{2 * EVERY}"}
    assert max(int(r["step"]) for r in _rows(out)) == STOP_AT - 3  # step 7 ran but was never logged
    assert not (tmp_path / "killed").exists()

    resumed = _worker("train", recipe, tmp_path / "resumed", tmp_path)
    assert resumed.returncode == 0, (resumed.stdout[-2000:], resumed.stderr[-5000:])
    assert "resuming from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    reports = _reports(tmp_path / "resumed")
    _check_ranks_agree(reports)
    assert all(r["global_step"] == STOP_AT for r in reports)  # early stopping's counter carried over, everywhere
    rows, _ = _check_one_writer(out, STOP_AT)

    _check_same_values(rows, _rows(sft_reference), ("loss", "grad_norm", "num_tokens"), ("eval_loss",))


@pytest.mark.numeric
@pytest.mark.slow
def test_retention_guard_and_distillation_on_two_processes(tmp_path):
    """The probe is scored by both processes on their halves of its items and gathered, so the guard sees the same
    score everywhere: the tiny model never answers the Fibonacci probe (0 < 1.0), and with patience 2 both processes
    stop at the second evaluation. With distillation on, the two processes train what one process trains with twice
    the batch: the same loss and KL term at the first step (before any update), and the same eval_kd_loss in both.

    It runs as on Kaggle: there a single process is pinned to GPU 0 (tests/test_models.py), but a process a launcher
    started as one of two must see both GPUs, so Unsloth can put it on its own (cuda:LOCAL_RANK)."""
    recipe, out = _recipe(tmp_path, "sft_retain", "train", retain={"fibonacci": 1.0}, retain_patience=2,
                          early_stopping_patience=None, distill={"weight": 0.3})
    done = _worker("train", recipe, tmp_path / "report", tmp_path, KAGGLE_KERNEL_RUN_TYPE="Batch")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-5000:])
    reports = _reports(tmp_path / "report")
    assert all(r["cuda_visible_devices"] is None for r in reports) and "Kaggle detected" not in done.stdout
    _check_ranks_agree(reports)
    assert all(r["global_step"] == 2 * EVERY for r in reports)
    assert [e["eval_probe/fibonacci"] for e in reports[0]["evaluations"]] == [0.0, 0.0]
    guard = _trainer_state(out, 2 * EVERY)["stateful_callbacks"]["RetentionGuard"]["attributes"]
    assert guard["stopped_at_step"] == 2 * EVERY and guard["stopped_by"] == {"eval_probe/fibonacci": 0.0}
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["kept"] == [] and [s["step"] for s in best["skipped"]] == [EVERY, 2 * EVERY]
    assert all("eval_kd_loss" in e for e in reports[0]["evaluations"])  # gathered: equal in both (checked above)

    from llmft import recipes

    single = recipes.load_recipe(recipe, smoke=True)
    single["training"].update(output_dir=str(tmp_path / "single"), per_device_train_batch_size=4, max_steps=1,
                              probes=None, retain=None)
    recipes.run_recipe(single, "train", smoke=False)
    first = [next(r for r in _rows(run) if r["event"] == "train") for run in (out, tmp_path / "single")]
    tolerance = {"rel": 2e-2} if BF16 else {"rel": 1e-3}
    for key in ("loss", "kd_loss"):
        assert float(first[0][key]) == pytest.approx(float(first[1][key]), **tolerance), key


@pytest.mark.numeric
@pytest.mark.slow
def test_dpo_recipe_under_torchrun_killed_and_resumed(tmp_path):
    """The DPO recipe from the command line (uninterrupted), then killed after a checkpoint and resumed: the same
    end, one writer, and the same metrics in both processes (TRL gathers DPO's rewards over the processes)."""
    recipe, reference = _recipe(tmp_path, "dpo", "dpo")
    _cli("dpo", recipe, tmp_path)
    rows, best = _check_one_writer(reference, STOP_AT)
    assert best["metric"] == "eval_rewards/accuracies" and "eval_rewards/margins" in rows[0]
    assert json.loads((reference / "summary.json").read_text())["global_step"] == STOP_AT < MAX_STEPS

    recipe, out = _recipe(tmp_path, "dpo_killed", "dpo")
    killed = _worker("dpo", recipe, tmp_path / "killed", tmp_path, kill_at=STOP_AT - 2)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout[-2000:], killed.stderr[-4000:])
    assert max(int(r["step"]) for r in _rows(out)) == STOP_AT - 3
    resumed = _worker("dpo", recipe, tmp_path / "resumed", tmp_path)
    assert resumed.returncode == 0, (resumed.stdout[-2000:], resumed.stderr[-5000:])
    reports = _reports(tmp_path / "resumed")
    _check_ranks_agree(reports)
    assert all(r["global_step"] == STOP_AT for r in reports)
    rows, _ = _check_one_writer(out, STOP_AT)
    _check_same_values(rows, _rows(reference), ("loss", "grad_norm", "rewards/margins"),
                       ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"))


# --------------------------------------------------------------------------------------------------------------------
# The rank rules in one process (no launcher): what a process that is not the main one does
# --------------------------------------------------------------------------------------------------------------------
class _Adapter:
    """Stands in for a PEFT model: save_pretrained writes one file."""

    def save_pretrained(self, path, **kwargs):
        (Path(path) / "adapter_model.safetensors").write_text("weights")


def _control_run(directory, should_save):
    """Drive MetricsLogger and BestCheckpoint through a run's events as the trainer would, as the main process
    (``should_save``) or another one; returns the callbacks."""
    from transformers import TrainerControl, TrainerState

    args = types.SimpleNamespace(should_save=should_save)
    state, control = TrainerState(), TrainerControl()
    logger = callbacks.MetricsLogger(directory / "metrics.csv")
    best = callbacks.BestCheckpoint(str(directory / "best"), keep=1)
    for callback in (logger, best):
        callback.on_train_begin(args, state, control)
    for step, eval_loss in ((1, 2.0), (2, 1.5), (3, 1.7)):
        state.global_step = step
        logger.on_log(args, state, control, logs={"loss": 3.0 / step, "learning_rate": 1e-3})
        metrics = {"eval_loss": eval_loss}
        logger.on_log(args, state, control, logs=dict(metrics))
        best.on_evaluate(args, state, control, metrics=metrics, model=_Adapter())
    return logger, best


def test_only_the_main_process_writes_and_every_process_keeps_the_same_state(tmp_path):
    _, main = _control_run(tmp_path / "main", should_save=True)
    _, other = _control_run(tmp_path / "other", should_save=False)
    assert len(_rows(tmp_path / "main")) == 6 and (tmp_path / "main" / "best" / "best.json").exists()
    assert not (tmp_path / "other").exists()  # nothing at all: no CSV, no best/, no directory
    assert (main.best_step, main.best_value, main.skipped) == (other.best_step, other.best_value, other.skipped)
    assert [(k["step"], k["value"]) for k in main.kept] == [(k["step"], k["value"]) for k in other.kept] == [(2, 1.5)]


def test_rank_helpers_follow_the_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (runtime.process_rank(), runtime.process_count(), runtime.is_main_process()) == (0, 1, True)
    assert not runtime.launched_distributed() and runtime.any_process(True) and not runtime.any_process(False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets, before the trainer starts the process group
    assert runtime.process_rank() == 1 and not runtime.is_main_process() and runtime.launched_distributed()
    assert runtime.is_main_process(types.SimpleNamespace(should_save=True))  # a trainer's args decide when given


def test_preflight_and_messages_under_a_launcher(monkeypatch, capsys):
    from test_runtime import _fake_gpus

    from llmft.log import say

    monkeypatch.setattr(runtime, "_preflight_printed", False)
    _fake_gpus(monkeypatch, "Tesla T4", (7, 5), count=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    runtime.preflight()
    say("a message")
    assert capsys.readouterr().out == ""  # process 1 is silent: the main process speaks for the job
    monkeypatch.setenv("RANK", "0")
    notes = runtime.preflight(force=True)["notes"]
    say("a message")
    out = capsys.readouterr().out
    assert "2 processes (data parallel), one GPU each: this one on cuda:1 of 2 visible." in notes
    assert "llmft preflight: Tesla T4" in out and "a message" in out


def test_a_stop_voted_by_another_process_stops_this_one(monkeypatch):
    """What ``any_process`` guards against: values that differ between processes (a trainer's own, ungathered log).
    Here this process's values say "go on"; the other process's vote (simulated) says "stop": it stops too."""
    from transformers import TrainerControl, TrainerState

    monkeypatch.setattr(callbacks, "any_process", lambda flag: True)  # the other process voted stop
    args = types.SimpleNamespace(should_save=True, learning_rate=1e-3)
    state = TrainerState(global_step=5, max_steps=10)
    guards = {"nan": callbacks.NonFiniteLossGuard(), "early": callbacks.EarlyStopping(patience=3),
              "retain": callbacks.RetentionGuard({"fibonacci": 0.5})}
    controls = {name: TrainerControl() for name in guards}
    guards["nan"].on_log(args, state, controls["nan"], logs={"loss": 1.0})
    guards["early"].on_evaluate(args, state, controls["early"], metrics={"eval_loss": 1.0})  # its best so far
    guards["retain"].on_evaluate(args, state, controls["retain"], metrics={"eval_probe/fibonacci": 1.0})
    assert all(control.should_training_stop for control in controls.values())
    assert "another process at step 5" in guards["nan"].failure and not controls["nan"].should_save
    assert guards["early"].stopped_at_step == guards["retain"].stopped_at_step == 5
    with pytest.raises(callbacks.NonFiniteLossError):
        guards["nan"].on_train_end(args, state, controls["nan"])


def test_torchrun_recipe_gives_each_process_every_gpu_unless_the_user_chose(monkeypatch, capsys):
    """From a Kaggle kernel where ``import llmft`` pinned GPU 0, the processes torchrun starts must not inherit the pin
    (they would share one T4); a CUDA_VISIBLE_DEVICES the user set is theirs to keep."""
    from llmft import _unsloth

    seen = []

    class FakePopen:  # records what would be started; prints like a finished run
        def __init__(self, args, env, **kwargs):
            seen.append((args, env.get("CUDA_VISIBLE_DEVICES")))
            self.stdout, self.returncode = iter(["line 1\n", "line 2\n"]), len(seen) - 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(_unsloth, "_pinned", "0")  # llmft's Kaggle pin set it
    assert recipes.torchrun_recipe("r.yaml", "dpo", smoke=True) == 0
    monkeypatch.setattr(_unsloth, "_pinned", None)  # the user set it
    with pytest.raises(RuntimeError, match=r"exited with status 1; the lines above say why"):
        recipes.torchrun_recipe("r.yaml")
    assert seen[0][0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmft",
                              "dpo", "r.yaml", "--smoke"]
    assert [cvd for _, cvd in seen] == [None, "0"]
    assert "line 1\nline 2\n" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# A launcher that dies takes its workers with it
# --------------------------------------------------------------------------------------------------------------------
JOB_MARK = "LLMFT_TEST_JOB"


def _job_processes(mark):
    """{pid: (is a worker, state)} of the live processes whose environment holds ``JOB_MARK=mark`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{JOB_MARK}={mark}".encode() in environ and state not in ("Z", "X"):
            found[int(entry.name)] = any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ)
    return found


def _wait_for_training(out, process, timeout=600):
    """Wait until metrics.csv has two train rows (both workers are in the training loop)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.csv").exists() and len(_rows(out)) >= 2:
            return
        assert process.poll() is None, "the job ended before training"
        time.sleep(1)
    raise AssertionError(f"no training after {timeout} s")


def _gone_within(mark, pids, timeout=60):
    """Seconds until none of ``pids`` is alive, or None after ``timeout``."""
    import time

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not set(_job_processes(mark)) & set(pids):
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def _kill_job(mark):
    for pid in _job_processes(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


LONG = {"max_steps": 100000, "eval_steps": 100000, "early_stopping_patience": None}
# a notebook kernel turns SIGINT (Jupyter's interrupt) into KeyboardInterrupt whatever it inherited: a job started with
# `&` by a non-interactive shell (as CI may start the suite) inherits SIGINT ignored, which Python would keep
PARENT = ("import signal, sys, llmft; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "llmft.torchrun_recipe(sys.argv[1], 'train', smoke=True)")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the job's processes through /proc")
def test_workers_die_with_a_killed_torchrun(tmp_path):
    """B5 / GUIDE: a SIGKILL of torchrun's process group left both workers training to the end (each runs in a
    session of its own). ``import llmft`` in a worker now asks Linux to SIGKILL it when its launcher dies. Output goes
    to a file, so nothing dies of a broken pipe instead."""
    import uuid

    recipe, out = _recipe(tmp_path, "long", "train", **LONG)
    mark = uuid.uuid4().hex
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmft",
               "train", str(recipe), "--smoke"]
    with open(tmp_path / "job.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=tmp_path, env={**_env(), JOB_MARK: mark}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_training(out, launcher)
        workers = [pid for pid, worker in _job_processes(mark).items() if worker]
        assert len(workers) == 2
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(30)
        seconds = _gone_within(mark, workers)
        assert seconds is not None, f"workers {workers} still training 60 s after torchrun was killed"
        print(f"workers gone {seconds:.1f} s after torchrun's process group was killed")
    finally:
        _kill_job(mark)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the job's processes through /proc")
@pytest.mark.parametrize("how", ["kernel restart", "kernel killed", "interrupt"])
def test_torchrun_recipe_goes_down_with_its_cell(tmp_path, how):
    """B5: ``llmft.torchrun_recipe`` from a notebook kernel (here a python process in a session of its own, as
    Jupyter starts kernels): a kernel restart SIGKILLs the kernel's process group, a crash or kill ends the kernel
    alone, an interrupt raises KeyboardInterrupt in the cell. In each case torchrun and both workers end. (Before,
    they ended too, 7-9 s later and by accident: the first worker died printing into the dead kernel's pipe, the second
    lost its peer; over NCCL a lost peer can hang until the collective times out. The test above, with the output in a
    file, shows the workers outliving a killed torchrun.)"""
    import uuid

    recipe, out = _recipe(tmp_path, "long", "train", **LONG)
    mark = uuid.uuid4().hex
    with open(tmp_path / "kernel.log", "w") as log:
        kernel = subprocess.Popen([sys.executable, "-c", PARENT, str(recipe)], cwd=tmp_path,
                                  env={**_env(), JOB_MARK: mark}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for_training(out, kernel)
        job = _job_processes(mark)
        assert kernel.pid in job and sum(job.values()) == 2 and len(job) >= 4  # kernel, torchrun, two workers (+ any
        # helper process they start, e.g. a resource tracker)
        if how == "kernel restart":
            os.killpg(kernel.pid, signal.SIGKILL)
        elif how == "kernel killed":
            os.kill(kernel.pid, signal.SIGKILL)
        else:
            os.kill(kernel.pid, signal.SIGINT)
        # an interrupt waits 3 s for torchrun, then SIGTERM and up to 30 s (stop_timeout) before SIGKILL: on a loaded
        # 2-core machine that can pass 60 s
        seconds = _gone_within(mark, [pid for pid in job if pid != kernel.pid], timeout=120)
        assert seconds is not None, f"{how}: still running 120 s later: {_job_processes(mark)}"
        print(f"{how}: torchrun and its workers gone in {seconds:.1f} s")
        kernel.wait(60)
        if how == "interrupt":
            assert "KeyboardInterrupt" in (tmp_path / "kernel.log").read_text()
    finally:
        _kill_job(mark)
