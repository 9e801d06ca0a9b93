"""Live probes in training (eval_probe/<name> at every evaluation) and the retention guard, for SFT and DPO, through
the real Unsloth/TRL path."""
import csv
import json
from pathlib import Path

import pytest

import llmft  # first: imports Unsloth before transformers
from llmft import callbacks, data, probes, testing
from transformers import TrainerCallback  # noqa: E402


def _rows(out):
    with open(Path(out) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _evals(out, *columns):
    return [(int(r["step"]), *(float(r[c]) for c in columns)) for r in _rows(out) if r["event"] == "eval"]


class _ScriptedScorer(TrainerCallback):
    """A probe scorer the test controls: every item is right up to step ``good_until`` and wrong after it, so the
    probe 'forgets' at a known step (the generation itself still runs on the current weights)."""

    def __init__(self, good_until):
        self.good_until, self.step = good_until, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def __call__(self, generated, expected):
        return self.step <= self.good_until


def _scripted_probe(scorer):
    return probes.custom_probe("kept", [("Continue: 1, 1, 2, 3, 5, 8", "13"), ("What is 3 plus 4?", "7")],
                               scorer=scorer)


class _ModeAtStep(TrainerCallback):
    """Whether the model is in training mode, with gradient checkpointing on, when each step begins."""

    def __init__(self):
        self.seen = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        self.seen[state.global_step] = (model.training, checkpointing)


def _sft(model, tokenizer, chats, out, **kw):
    options = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                   warmup_steps=1, eval_steps=3, output_dir=str(out), verbose=False, disable_tqdm=True)
    return llmft.build_trainer(model, tokenizer, chats.select(range(48)), chats.select(range(48, 56)),
                               **{**options, **kw})


@pytest.mark.numeric
def test_probe_scores_current_weights_at_every_evaluation_and_leaves_training_unchanged(tiny_dir, lora_model,
                                                                                        chat_dataset, tmp_path):
    model, tokenizer = lora_model
    fib = probes.fibonacci_probe(max_items=4)
    mode = _ModeAtStep()
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path / "probed", probes=[fib], callbacks=[mode],
                   early_stopping_patience=None)
    assert isinstance(trainer.callback_handler.callbacks[0], callbacks.ProbeCallback)  # before the CSV logger
    trainer.train()
    rows = [r for r in _rows(tmp_path / "probed") if r["event"] == "eval"]
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(r["eval_probe/fibonacci"] != "" and float(r["eval_probe_runtime"]) > 0 for r in rows)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["eval_probe/fibonacci"] for h in evals] == [float(r["eval_probe/fibonacci"]) for r in rows]
    # The last evaluation (step 6 = the end) scored the weights the model has now, item by item.
    prober = callbacks.find_callback(trainer, callbacks.ProbeCallback)
    now = probes.run_probe(model, tokenizer, fib, progress=False)
    assert list(prober.last_tables["fibonacci"]["answer"]) == list(now["answer"])
    # After the evaluation at step 3 the model trains as before it: training mode, gradient checkpointing on.
    assert mode.seen[3] == mode.seen[0] == (True, True)
    # Probing is read-only: the same run without probes has the same losses.
    fresh, tok2 = llmft.load_model(tiny_dir, max_seq_length=128, lora_r=8, lora_alpha=16)
    plain = _sft(fresh, tok2, chat_dataset, tmp_path / "plain", early_stopping_patience=None)
    plain.train()
    with_probe = _evals(tmp_path / "probed", "eval_loss")
    without = _evals(tmp_path / "plain", "eval_loss")
    assert [s for s, _ in with_probe] == [s for s, _ in without]
    for (_, a), (_, b) in zip(with_probe, without):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_sft_retention_guard_picks_the_best_among_kept_evaluations_and_stops(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    scorer = _ScriptedScorer(good_until=4)
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=20, eval_steps=2, learning_rate=1e-2,
                   probes=[_scripted_probe(scorer)], retain={"kept": 0.5}, retain_patience=2,
                   early_stopping_patience=None, keep_best=1, callbacks=[scorer])
    trainer.train()
    evals = _evals(tmp_path, "eval_loss", "eval_probe/kept")
    assert [(s, p) for s, _, p in evals] == [(2, 1.0), (4, 1.0), (6, 0.0), (8, 0.0)]  # stopped at the 2nd below
    guard = callbacks.find_callback(trainer, callbacks.RetentionGuard)
    assert trainer.state.global_step == guard.stopped_at_step == 8
    assert guard.stopped_by == {"eval_probe/kept": 0.0}
    kept_best = min((loss, s) for s, loss, p in evals if p >= 0.5)[1]
    unguarded_best = min((loss, s) for s, loss, _ in evals)[1]
    assert unguarded_best > 4, evals  # the loss kept falling: without the guard the best would be a forgetful step
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert record["best_step"] == kept_best and record["retain"] == {"kept": 0.5}
    assert [s["step"] for s in record["skipped"]] == [6, 8]
    assert [p.name for p in (tmp_path / "best").glob("step-*")] == [f"step-{kept_best:06d}"]


def test_dpo_live_probe_and_retention_guard(lora_model, tmp_path):
    model, tokenizer = lora_model
    pairs = data.orca_to_dpo(testing.tiny_orca_dpo(32), verbose=False)
    scorer = _ScriptedScorer(good_until=3)
    metric = "eval_rewards/margins"
    trainer = llmft.build_dpo_trainer(
        model, tokenizer, pairs.select(range(24)), pairs.select(range(24, 32)), max_steps=30,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_steps=1,
        eval_steps=3, output_dir=str(tmp_path), verbose=False, disable_tqdm=True, metric=metric,
        early_stopping_patience=None, keep_best=1, callbacks=[scorer],
        probes=callbacks.ProbeCallback([_scripted_probe(scorer)], max_new_tokens=4),
        retain={"kept": 1.0}, retain_patience=1)
    trainer.train()
    evals = _evals(tmp_path, metric, "eval_probe/kept")
    assert [(s, p) for s, _, p in evals] == [(3, 1.0), (6, 0.0)]  # patience 1: stops at the first evaluation below
    assert trainer.state.global_step == 6
    assert callbacks.find_callback(trainer, callbacks.RetentionGuard).stopped_at_step == 6
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert record["best_step"] == 3 and [s["step"] for s in record["skipped"]] == [6]
    assert "eval_rewards/margins" in _rows(tmp_path)[0]


def test_retention_options_are_checked(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    fib = probes.fibonacci_probe(max_items=2)
    with pytest.raises(ValueError, match=r"no probe named 'fibonaci'.*did you mean 'fibonacci'"):
        _sft(model, tokenizer, chat_dataset, tmp_path, probes=[fib], retain={"fibonaci": 0.9})
    with pytest.raises(ValueError, match=r"no probes were given"):
        _sft(model, tokenizer, chat_dataset, tmp_path, retain={"fibonacci": 0.9})
    with pytest.raises(ValueError, match=r"accuracy in \[0, 1\]"):
        _sft(model, tokenizer, chat_dataset, tmp_path, probes=[fib], retain={"fibonacci": 90})
    with pytest.raises(ValueError, match=r"never evaluates: give an eval_dataset"):
        llmft.build_trainer(model, tokenizer, chat_dataset, max_steps=2, output_dir=str(tmp_path), verbose=False,
                            probes=[fib])
    with pytest.raises(ValueError, match=r"unique"):
        callbacks.ProbeCallback([fib, fib])


def test_retention_state_survives_a_resume_and_a_missing_probe_is_named():
    guard = callbacks.RetentionGuard({"fibonacci": 0.9}, patience=3)

    class _State:
        global_step, max_steps = 10, 100

    class _Control:
        should_training_stop = False

    guard.on_evaluate(None, _State, _Control, metrics={"eval_probe/fibonacci": 0.5})
    saved = guard.state()
    restored = callbacks.RetentionGuard(**saved["args"])  # what transformers does on resume
    for key, value in saved["attributes"].items():
        setattr(restored, key, value)
    assert restored.below_for == {"eval_probe/fibonacci": 1} and restored.patience == 3
    for _ in range(2):
        restored.on_evaluate(None, _State, _Control, metrics={"eval_probe/fibonacci": 0.5})
    assert _Control.should_training_stop and restored.stopped_at_step == 10
    best = callbacks.BestCheckpoint("/tmp/unused-best", retain={"fibonacci": 0.9})
    assert callbacks.BestCheckpoint(**best.state()["args"]).retain == {"fibonacci": 0.9}
    with pytest.raises(KeyError, match=r"'eval_probe/fibonacci' is not among .*probes reported: none.*probes=\["):
        guard.on_evaluate(None, _State, _Control, metrics={"eval_loss": 1.0})


@pytest.mark.numeric
def test_resumed_run_keeps_the_guard_state_and_the_probe_first(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model

    def run(resume):
        scorer = _ScriptedScorer(good_until=4)
        trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=12, eval_steps=2, learning_rate=1e-2,
                       probes=[_scripted_probe(scorer)], retain={"kept": 0.5}, retain_patience=3,
                       early_stopping_patience=None, keep_best=1, save_total_limit=None, callbacks=[scorer])
        llmft.train(trainer, resume=resume)
        return trainer

    first = run(False)  # below at 6, 8, 10: stops at 10
    assert first.state.global_step == 10
    # Resumed from step 6, where the probe had been below once: the restored count stops it at 10 again (a guard
    # starting from zero would run on to the end, step 12).
    second = run(str(tmp_path / "checkpoint-6"))
    assert second.state.global_step == 10
    guard = callbacks.find_callback(second, callbacks.RetentionGuard)
    assert guard.stopped_at_step == 10 and guard.below_for == {"eval_probe/kept": 3}
    assert isinstance(second.callback_handler.callbacks[0], callbacks.ProbeCallback)  # still before the logger
    assert [(s, p) for s, _, p in _evals(tmp_path, "eval_loss", "eval_probe/kept")] == [
        (2, 1.0), (4, 1.0), (6, 0.0), (8, 0.0), (10, 0.0)]  # the CSV: no lost or duplicated evaluation
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert [s["step"] for s in record["skipped"]] == [6, 8, 10] and record["best_step"] in (2, 4)
