"""One callback set controls SFT and DPO runs through Unsloth's CPU path."""
import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import llmft
from llmft import callbacks, testing, trainers


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _evals(out, metric):
    return [(int(r["step"]), float(r[metric])) for r in _rows(Path(out) / "metrics.csv")
            if r["event"] == "eval" and r.get(metric)]


def _expected_stop(evals, patience, greater, min_delta, max_steps):
    """Replay early stopping independently over the logged evaluations."""
    best, bad = None, 0
    for step, value in evals:
        if best is None or (value > best + min_delta if greater else value < best - min_delta):
            best, bad = value, 0
        else:
            bad += 1
            if bad >= patience and step < max_steps:
                return step
    return max_steps


def _sft(model, tokenizer, data, out, **kw):
    options = dict(max_steps=40, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                   warmup_steps=2, eval_steps=4, output_dir=str(out), verbose=False)
    return llmft.build_trainer(model, tokenizer, data.select(range(48)), data.select(range(48, 64)),
                               **{**options, **kw})


@pytest.mark.numeric
def test_sft_early_stops_at_the_right_evaluation(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    # Pretend a higher eval loss is better: every evaluation after the first is then "worse".
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, greater_is_better=True, early_stopping_patience=2)
    trainer.train()
    evals = _evals(tmp_path, "eval_loss")
    assert trainer.state.global_step == _expected_stop(evals, 2, True, 0.0, 40) == 12
    stopper = callbacks.find_callback(trainer, callbacks.EarlyStopping)
    assert stopper.stopped_at_step == 12 and stopper.bad_evaluations == 2


@pytest.mark.numeric
def test_sft_best_checkpoint_on_disk_is_the_best_one(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=24, learning_rate=2e-2, keep_best=2,
                   early_stopping_patience=None)
    trainer.train()
    evals = _evals(tmp_path, "eval_loss")
    best_step, best_value = min(evals, key=lambda e: e[1])
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert record["best_step"] == best_step and record["best_value"] == pytest.approx(best_value)
    kept = sorted(p.name for p in (tmp_path / "best").glob("step-*"))
    two_best = sorted(f"step-{s:06d}" for s, _ in sorted(evals, key=lambda e: e[1])[:2])
    assert kept == two_best and not list((tmp_path / "best").glob(".tmp-*"))
    # The adapters on disk really are that step's model: they reproduce its eval loss.
    reloaded, tok2 = llmft.load_model(record["best_path"], max_seq_length=128)
    check = llmft.build_trainer(reloaded, tok2, chat_dataset.select(range(48)), chat_dataset.select(range(48, 64)),
                                per_device_train_batch_size=4, output_dir=str(tmp_path / "check"),
                                metrics_csv=False, verbose=False)
    assert check.evaluate()["eval_loss"] == pytest.approx(best_value, abs=1e-4)


def test_metrics_csv_and_weight_decay_ramp(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=10, eval_steps=5,
                   weight_decay_ramp=(0.0, 0.2), early_stopping_patience=None)
    trainer.train()
    rows = _rows(tmp_path / "metrics.csv")
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 11))
    assert [int(r["step"]) for r in rows if r["event"] == "eval"] == [5, 10]
    assert {"loss", "learning_rate", "eval_loss", "gpu_mem_reserved_gb", "gpu_mem_allocated_gb"} <= set(rows[0])
    assert all(float(r["gpu_mem_reserved_gb"]) == 0.0 for r in rows)  # CPU
    decay = [float(r["weight_decay"]) for r in train_rows]
    assert decay[0] == pytest.approx(0.0) and decay[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(decay, decay[1:]))
    groups = trainer.optimizer.param_groups
    assert any(g["weight_decay"] == pytest.approx(0.2) for g in groups)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))


def test_tensorboard_alternative(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=4, tensorboard=True)
    trainer.train()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert {"loss", "learning_rate", "eval_loss"} <= set(scalars)


def test_unknown_metric_is_named(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, metric="eval_rewards/accuracies", max_steps=4)
    with pytest.raises(KeyError, match=r"'eval_rewards/accuracies' is not among .*eval_loss"):
        trainer.train()


class _PoisonAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_non_finite_loss_stops_with_a_clear_message(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _sft(model, tokenizer, chat_dataset, tmp_path, max_steps=20, eval_steps=2,
                   callbacks=[_PoisonAt(5)], early_stopping_patience=None)
    with pytest.raises(callbacks.NonFiniteLossError, match=r"loss became nan at step 6.*fp16.*learning rate"):
        trainer.train()
    steps = [int(r["step"]) for r in _rows(tmp_path / "metrics.csv") if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # logs up to the failure are kept
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert saved and max(saved) <= 4  # nothing saved from the broken weights


def _dpo_rows(n=24):
    rows = []
    for r in testing.orca_dpo_rows(n):
        prompt = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + [
            {"role": "user", "content": r["question"]}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    return rows


@pytest.mark.numeric
def test_same_callbacks_early_stop_a_dpo_run_on_a_dpo_metric(lora_model, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = lora_model
    data = Dataset.from_list(_dpo_rows())
    args = DPOConfig(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=5e-3,
                     eval_strategy="steps", eval_steps=3, save_steps=3, logging_steps=1, report_to="none",
                     max_length=128, beta=0.1, **trainers.precision_flags(), optim=trainers.default_optim())
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                         train_dataset=data.select(range(16)), eval_dataset=data.select(range(16, 24)))
    metric = "eval_rewards/accuracies"
    trainers.attach_training_control(trainer, metric=metric, early_stopping_patience=2,
                                     early_stopping_min_delta=0.0, keep_best=1)
    trainer.train()
    evals = _evals(tmp_path, metric)
    assert len(evals) >= 2
    expected = _expected_stop(evals, 2, True, 0.0, 30)
    assert trainer.state.global_step == expected < 30, evals  # it did stop early, at the evaluation the rule says
    header = set(_rows(tmp_path / "metrics.csv")[0])
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected"} <= header
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    best_step, best_value = max(evals, key=lambda e: (e[1], -e[0]))  # first evaluation reaching the max
    assert record["greater_is_better"] is True
    assert (record["best_step"], record["best_value"]) == (best_step, pytest.approx(best_value))
    assert (Path(record["best_path"]) / "adapter_model.safetensors").exists()
