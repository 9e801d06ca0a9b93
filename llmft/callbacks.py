"""Training control that works for any trainer built on transformers' ``Trainer`` (TRL's SFTTrainer, DPOTrainer, ...).

The callbacks rely only on what every trainer reports — ``on_log`` and ``on_evaluate(metrics=...)`` — and never run a
forward pass of their own, so the same objects serve SFT and DPO (the NTUA lab report's callback broke under DPO because
its own evaluation fed SFT-shaped inputs to a DPO model).

- :class:`MetricsLogger`: one CSV row per log/eval event, with GPU memory; safe against crashes and resumes.
- :class:`BestCheckpoint`: saves the adapters when the chosen metric improves, keeps the K best, atomically.
- :class:`EarlyStopping`: patience counted in evaluations, ``min_delta``, any metric and direction.
- :class:`NonFiniteLossGuard`: stops on a NaN/inf loss and says where and why.
- :class:`WeightDecayRamp`: weight decay rising from ``start`` to ``end`` over training (CodeMMLU report).

Stateful callbacks implement transformers' ``ExportableState``: their state is saved in every checkpoint and restored
on resume (``build_trainer`` sets ``restore_callback_states_from_checkpoint=True``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from llmft.log import say
from llmft.models import save_active_adapter

CORE_COLUMNS = ["step", "epoch", "event", "loss", "learning_rate", "grad_norm", "weight_decay",
                "gpu_mem_reserved_gb", "gpu_mem_allocated_gb"]
LOWER_IS_BETTER_HINTS = ("loss", "perplexity", "error")


def greater_is_better_for(metric: str) -> bool:
    """Direction of a metric by name: losses (and perplexity, error) are better lower, everything else higher
    (accuracies, rewards, margins, BLEU...)."""
    return not any(hint in metric.lower() for hint in LOWER_IS_BETTER_HINTS)


def _metric_key(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _gpu_memory_gb() -> tuple[float, float]:
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_reserved() / 2**30, torch.cuda.memory_allocated() / 2**30


def _write_json_atomically(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


TOKEN_COUNTERS = ("num_tokens",)  # cumulative counters TRL keeps in memory only (lost on resume)


def _totals_before(rows: list[dict]) -> tuple[float, dict[str, float]]:
    """From the train rows kept at a resume: the summed training loss (each logged loss is a mean over the steps
    since the previous log) and the last value of each cumulative token counter."""
    loss_sum, previous, tokens = 0.0, 0, {}
    for row in sorted((r for r in rows if r.get("event") == "train"), key=lambda r: int(float(r["step"]))):
        step = int(float(row["step"]))
        if row.get("loss") not in (None, ""):
            loss_sum += float(row["loss"]) * (step - previous)
            previous = step
        for key in TOKEN_COUNTERS:
            if row.get(key) not in (None, ""):
                tokens[key] = float(row[key])
    return loss_sum, tokens


class _Improvement:
    """Shared rule: is ``value`` better than ``best`` by more than ``min_delta`` in the metric's direction?"""

    def __init__(self, metric: str, greater_is_better: bool | None, min_delta: float = 0.0):
        self.metric = _metric_key(metric)
        self.greater_is_better = greater_is_better_for(metric) if greater_is_better is None else greater_is_better
        self.min_delta = min_delta

    def value(self, metrics: dict | None) -> float | None:
        if not metrics or self.metric not in metrics:
            return None
        value = float(metrics[self.metric])
        return value if math.isfinite(value) else None

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best + self.min_delta if self.greater_is_better else value < best - self.min_delta

    def missing_message(self, metrics: dict, who: str) -> str:
        known = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
        return f"{who}: metric {self.metric!r} is not among the evaluation metrics ({known}); pass one of those"


class MetricsLogger(TrainerCallback):
    """Append one CSV row per log event (train logs and evaluations) to ``path``.

    Columns: step, epoch, event ("train", "eval", or "summary" for the end-of-training totals), loss, learning_rate, grad_norm, weight_decay, GPU memory reserved
    and allocated in GB (0 on CPU), then every other metric the trainer reports (``eval_loss``, DPO's
    ``eval_rewards/accuracies``, ...), added as they first appear. Each row is flushed and fsynced, so a crash loses
    nothing already logged; on resume, rows after the checkpoint's step (logged in the lost part of the run) are
    dropped, so every step appears once. ``tensorboard=True`` also writes the scalars to ``<path dir>/tensorboard``.
    """

    def __init__(self, path: str | os.PathLike, tensorboard: bool = False):
        self.path = Path(path)
        self.tensorboard = tensorboard
        self._columns: list[str] | None = None
        self._writer = None
        # After a resume, transformers' end-of-training train_loss only sums the losses of the resumed part (divided
        # by all steps), and TRL's num_tokens restarts from zero: both are corrected from the rows already logged.
        self._loss_before_resume = 0.0
        self._tokens_before_resume: dict[str, float] = {}

    def _read(self) -> tuple[list[str], list[dict]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], []
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, columns: list[str], rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self._columns = columns

    def on_train_begin(self, args, state, control, **kwargs):
        columns, rows = self._read()
        kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) <= state.global_step]
        if columns and len(kept) != len(rows):
            if state.global_step == 0:
                say(f"MetricsLogger: fresh run; replacing {len(rows)} rows of an earlier run in {self.path}")
            else:
                say(f"MetricsLogger: resuming at step {state.global_step}; dropped {len(rows) - len(kept)} rows "
                    "logged after that checkpoint (they will be logged again)")
        self._rewrite(columns or list(CORE_COLUMNS), kept)
        self._loss_before_resume, self._tokens_before_resume = _totals_before(kept)
        if self.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        reserved, allocated = _gpu_memory_gb()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 6),
               "event": ("summary" if "train_runtime" in logs
                         else "eval" if any(k.startswith("eval_") for k in logs) else "train"),
               "gpu_mem_reserved_gb": round(reserved, 4), "gpu_mem_allocated_gb": round(allocated, 4)}
        self._carry_over_resumed_totals(logs, state)
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")})
        if self._columns is None:
            self._columns = self._read()[0] or list(CORE_COLUMNS)
        new = [k for k in row if k not in self._columns]
        if new:  # a metric seen for the first time: widen the header (rare: first train and first eval row)
            self._rewrite(self._columns + new, self._read()[1])
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self._columns, extrasaction="ignore").writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch", "event"):
                    self._writer.add_scalar(key, value, state.global_step)

    def _carry_over_resumed_totals(self, logs: dict, state) -> None:
        """Correct, in the logs every later callback sees, the totals a resumed trainer restarts from zero."""
        for key, before in self._tokens_before_resume.items():
            if isinstance(logs.get(key), (int, float)):
                logs[key] = logs[key] + before
        if "train_loss" in logs and self._loss_before_resume and state.global_step:
            logs["train_loss"] = logs["train_loss"] + self._loss_before_resume / state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class BestCheckpoint(TrainerCallback, ExportableState):
    """Save the model's adapters (and tokenizer) whenever ``metric`` improves; keep the ``keep`` best.

    Each save goes to a temporary directory first and is renamed into place, so a crash never leaves a half-written
    checkpoint; ``<directory>/best.json`` records the best step, value and path (written atomically) and the kept
    list. ``greater_is_better=None`` infers the direction from the name (losses lower, accuracies/rewards higher).
    """

    def __init__(self, directory: str, metric: str = "eval_loss", greater_is_better: bool | None = None,
                 keep: int = 1, best_value: float | None = None, best_step: int | None = None,
                 kept: list | None = None):
        if keep < 1:
            raise ValueError(f"BestCheckpoint(keep={keep}): keep at least 1 checkpoint")
        self.directory = os.path.abspath(directory)
        self.rule = _Improvement(metric, greater_is_better)
        self.keep = keep
        self.best_value = best_value
        self.best_step = best_step
        self.kept = list(kept or [])  # [{"step", "value", "path"}], best first

    @property
    def metric(self) -> str:
        return self.rule.metric

    def state(self) -> dict:
        return {"args": {"directory": self.directory, "metric": self.rule.metric,
                         "greater_is_better": self.rule.greater_is_better, "keep": self.keep},
                "attributes": {"best_value": self.best_value, "best_step": self.best_step, "kept": self.kept}}

    @property
    def best_path(self) -> str | None:
        return self.kept[0]["path"] if self.kept else None

    def on_train_begin(self, args, state, control, **kwargs):
        # Checkpoints from steps after the one we resume from belong to a run that was lost: remove them.
        root = Path(self.directory)
        if root.exists():
            valid = {Path(k["path"]).name for k in self.kept}
            for child in root.glob("step-*"):
                if child.name not in valid:
                    shutil.rmtree(child, ignore_errors=True)
            self._write_record()

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        value = self.rule.value(metrics)
        if value is None:
            if metrics and self.rule.metric not in metrics:
                raise KeyError(self.rule.missing_message(metrics, "BestCheckpoint"))
            return
        if not self.rule.better(value, self.best_value):
            return
        self.best_value, self.best_step = value, state.global_step
        root = Path(self.directory)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{state.global_step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            # A card written first says what this checkpoint is (and spares PEFT compiling its card template).
            (tmp / "README.md").write_text(
                "---\nlibrary_name: peft\n---\n"  # the metadata block PEFT's card loader expects
                f"# Best checkpoint by {self.rule.metric}\n\nstep {state.global_step}: {self.rule.metric} = {value:.6g} "
                f"({'higher' if self.rule.greater_is_better else 'lower'} is better). Written by llmft.BestCheckpoint; "
                "reload with `llmft.load_model(<this directory>)`.\n")
            save_active_adapter(model, tmp)
            if processing_class is not None:
                processing_class.save_pretrained(str(tmp))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.kept = [k for k in self.kept if k["path"] != str(final)]
        self.kept.insert(0, {"step": state.global_step, "value": value, "path": str(final)})
        for stale in self.kept[self.keep:]:
            shutil.rmtree(stale["path"], ignore_errors=True)
        self.kept = self.kept[: self.keep]
        self._write_record()

    def _write_record(self) -> None:
        root = Path(self.directory)
        root.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(root / "best.json", {
            "metric": self.rule.metric, "greater_is_better": self.rule.greater_is_better,
            "best_step": self.best_step, "best_value": self.best_value, "best_path": self.best_path,
            "kept": self.kept})


class EarlyStopping(TrainerCallback, ExportableState):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations in a row."""

    def __init__(self, patience: int = 3, metric: str = "eval_loss", greater_is_better: bool | None = None,
                 min_delta: float = 0.0, best_value: float | None = None, bad_evaluations: int = 0,
                 stopped_at_step: int | None = None):
        if patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience}): patience counts evaluations, at least 1")
        self.patience = patience
        self.rule = _Improvement(metric, greater_is_better, min_delta)
        self.best_value = best_value
        self.bad_evaluations = bad_evaluations
        self.stopped_at_step = stopped_at_step

    def state(self) -> dict:
        return {"args": {"patience": self.patience, "metric": self.rule.metric,
                         "greater_is_better": self.rule.greater_is_better, "min_delta": self.rule.min_delta},
                "attributes": {"best_value": self.best_value, "bad_evaluations": self.bad_evaluations,
                               "stopped_at_step": self.stopped_at_step}}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = self.rule.value(metrics)
        if value is None:
            if metrics and self.rule.metric not in metrics:
                raise KeyError(self.rule.missing_message(metrics, "EarlyStopping"))
            return
        if self.rule.better(value, self.best_value):
            self.best_value, self.bad_evaluations = value, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience and state.global_step < state.max_steps:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            say(f"EarlyStopping: {self.rule.metric} has not improved on {self.best_value:.6g} for "
                f"{self.bad_evaluations} evaluations; stopping at step {state.global_step}")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class NonFiniteLossGuard(TrainerCallback):
    """Stop training at the first NaN/inf loss (train or eval) and raise :class:`NonFiniteLossError` once the trainer
    has closed cleanly, naming the step and the likely cause. Logs and saved checkpoints up to that point are kept;
    no checkpoint is written from the broken weights."""

    def __init__(self):
        self.failure: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.failure:
            return
        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.failure = (
                    f"{key} became {value} at step {state.global_step}. Likely cause: an fp16 overflow (T4s have no "
                    f"bf16) or a learning rate too high (now {args.learning_rate:g}). Lower the learning rate, keep "
                    "max_grad_norm=1.0, or resume from the last good checkpoint.")
                control.should_training_stop = True
                control.should_save = False
                return

    def on_save(self, args, state, control, **kwargs):
        if self.failure:
            control.should_save = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.failure:
            raise NonFiniteLossError(self.failure)


class WeightDecayRamp(TrainerCallback, ExportableState):
    """Weight decay moving linearly from ``start`` to ``end`` over training (CodeMMLU report: decay that rises keeps a
    model from drifting far from its pretrained weights late in training). Parameter groups with zero decay (biases,
    norms) stay at zero. The value in use is added to the logs as ``weight_decay``."""

    def __init__(self, start: float = 0.0, end: float = 0.1):
        if start < 0 or end < 0:
            raise ValueError(f"WeightDecayRamp(start={start}, end={end}): weight decay cannot be negative")
        self.start, self.end = start, end
        self.current = start

    def state(self) -> dict:
        return {"args": {"start": self.start, "end": self.end}, "attributes": {}}

    def value_at(self, step: int, total: int) -> float:
        fraction = min(1.0, step / max(1, total - 1))
        return self.start + (self.end - self.start) * fraction

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        self.current = self.value_at(state.global_step, state.max_steps)
        for group in optimizer.param_groups:
            # Matrices decay; 1-D parameters (biases, norm scales) never do, as in transformers' own grouping.
            if all(p.ndim >= 2 for p in group["params"]):
                group["weight_decay"] = self.current

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["weight_decay"] = self.current


class KeepAdapterDtype(TrainerCallback):
    """Keep trainable (LoRA) weights in the dtype training started with, across a resume.

    TRL casts QLoRA adapters to bf16 when it builds the trainer (on a T4, and in Unsloth's CPU mode on bf16 CPUs), so
    checkpoints hold bf16 adapters; resuming, PEFT's ``load_adapter`` upcasts them to float32, and the resumed run
    would train (and save) in another precision than the uninterrupted one. At the start of training this casts
    them back, with the optimizer state loaded for them, so a resumed run is the uninterrupted run.
    """

    def __init__(self, model):
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        changed = {}
        for name, param in model.named_parameters():
            want = self.dtypes.get(name)
            if want is not None and param.dtype != want:
                param.data = param.data.to(want)
                changed[id(param)] = want
        if not changed or optimizer is None:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in changed:
                    for key, value in optimizer.state.get(param, {}).items():
                        if key != "step" and hasattr(value, "is_floating_point") and value.is_floating_point():
                            optimizer.state[param][key] = value.to(changed[id(param)])


def find_callback(trainer, kind: type):
    """The trainer's callback of type ``kind`` (after a resume, transformers replaces restored callbacks with new
    objects, so look them up instead of keeping references)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, kind):
            return callback
    return None
