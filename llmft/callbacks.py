"""Training control that works for any trainer built on transformers' ``Trainer`` (TRL's SFTTrainer, DPOTrainer, ...).

The callbacks rely only on what every trainer reports — ``on_log`` and ``on_evaluate(metrics=...)`` — and never compute
a loss of their own (only :class:`ProbeCallback` runs the model, to generate), so the same objects serve SFT and DPO
(the NTUA lab report's callback broke under DPO because its own evaluation fed SFT-shaped inputs to a DPO model).

- :class:`MetricsLogger`: one CSV row per log/eval event, with GPU memory; safe against crashes and resumes.
- :class:`BestCheckpoint`: saves the adapters when the chosen metric improves, keeps the K best, atomically.
- :class:`EarlyStopping`: patience counted in evaluations, ``min_delta``, any metric and direction.
- :class:`NonFiniteLossGuard`: stops on a NaN/inf loss and says where and why.
- :class:`WeightDecayRamp`: weight decay rising from ``start`` to ``end`` over training (CodeMMLU report).
- :class:`ProbeCallback`: forgetting probes scored at every evaluation (greedy generation), reported as
  ``eval_probe/<name>`` with the eval metrics.
- :class:`RetentionGuard`: stops training when a retained probe stays below its threshold (with
  ``BestCheckpoint(retain=...)``, the retention guard).

Stateful callbacks implement transformers' ``ExportableState``: their state is saved in every checkpoint and restored
on resume (``build_trainer`` sets ``restore_callback_states_from_checkpoint=True``).

Several processes (data parallel under ``torchrun`` / ``accelerate launch``): every process runs every callback, on
the same numbers — transformers gathers the logged training loss over the processes (``nested_gather(tr_loss)
.mean()``) and the evaluation's predictions and losses (``gather_for_metrics``), TRL gathers its own metrics (DPO's
rewards, token accuracy) the same way, and :class:`ProbeCallback` gathers the probe answers — so each keeps the same
state; only the main process (:func:`llmft.runtime.is_main_process` with the trainer's args, i.e. transformers'
``args.should_save``) writes files. Stop decisions are or-ed over the processes (:func:`llmft.runtime.any_process`)
as well, so a value that is not gathered (a custom trainer's own log) can never stop one process alone and leave the
others waiting in the next gradient all-reduce.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_callback import ExportableState

from llmft.log import say
from llmft.models import save_active_adapter
from llmft.probes import PROBE_PREFIX, probe_metric  # noqa: F401  (also llmft.callbacks.*)
from llmft.environment import any_process, is_main_process

CORE_COLUMNS = ["step", "epoch", "event", "loss", "learning_rate", "grad_norm", "weight_decay",
                "gpu_mem_reserved_gb", "gpu_mem_allocated_gb"]
LOWER_IS_BETTER_HINTS = ("loss", "perplexity", "error")


def greater_is_better_for(metric: str) -> bool:
    """Direction of a metric by name: losses (and perplexity, error) are better lower, everything else higher
    (accuracies, rewards, margins, BLEU...)."""
    return not any(hint in metric.lower() for hint in LOWER_IS_BETTER_HINTS)


def _metric_key(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _below_threshold(metrics: dict, retain: dict, who: str) -> dict[str, float]:
    """The retained probes below their thresholds in ``metrics`` ({metric: value}); a retained probe missing from an
    evaluation is an error naming the probes that were reported."""
    below = {}
    for name, threshold in retain.items():
        key = probe_metric(name)
        if key not in metrics:
            known = sorted(k for k in metrics if k.startswith(PROBE_PREFIX))
            raise KeyError(f"{who}: retained probe {key!r} is not among the evaluation metrics (probes reported: "
                           f"{known or 'none'}); pass the probe itself in probes=[...] or remove it from retain")
        if not float(metrics[key]) >= threshold:  # NaN counts as below
            below[key] = float(metrics[key])
    return below


def _check_retain(retain: dict | None, who: str) -> dict[str, float]:
    """``retain`` as ``{probe name: threshold}`` with thresholds checked (probe scores are accuracies in [0, 1])."""
    if not retain:
        return {}
    if not isinstance(retain, dict):
        raise TypeError(f"{who}(retain={retain!r}): pass a dict {{probe name: threshold}}, e.g. {{'fibonacci': 0.9}}")
    checked = {}
    for name, threshold in retain.items():
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{who}(retain={{{name!r}: {threshold!r}}}): a threshold is a probe accuracy in [0, 1]")
        checked[probe_metric(str(name))[len(PROBE_PREFIX):]] = float(threshold)
    return checked


def _gpu_memory_gb() -> tuple[float, float]:
    import torch

    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.memory_reserved() / 2**30, torch.cuda.memory_allocated() / 2**30


def _write_json_atomically(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


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
    With several processes only the main one writes. The totals a resumed trainer would restart (``train_loss``,
    ``num_tokens``) are restored in the trainer itself (:class:`llmft.trainers.RunningTotals`), so the rows carry them.
    """

    def __init__(self, path: str | os.PathLike, tensorboard: bool = False):
        self.path = Path(path)
        self.tensorboard = tensorboard
        self._columns: list[str] | None = None
        self._writer = None

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
        self._columns = columns or list(CORE_COLUMNS)
        if not is_main_process(args):
            return
        self._rewrite(self._columns, kept)
        if self.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if not is_main_process(args):
            return
        reserved, allocated = _gpu_memory_gb()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 6),
               "event": ("summary" if "train_runtime" in logs
                         else "eval" if any(k.startswith("eval_") for k in logs) else "train"),
               "gpu_mem_reserved_gb": round(reserved, 4), "gpu_mem_allocated_gb": round(allocated, 4)}
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

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class BestCheckpoint(TrainerCallback, ExportableState):
    """Save the model's adapters (and tokenizer) whenever ``metric`` improves; keep the ``keep`` best.

    Each save goes to a temporary directory first and is renamed into place, so a crash never leaves a half-written
    checkpoint; ``<directory>/best.json`` records the best step, value and path (written atomically) and the kept
    list. ``greater_is_better=None`` infers the direction from the name (losses lower, accuracies/rewards higher).

    ``retain={"fibonacci": 0.9}`` (a retention guard, with :class:`ProbeCallback`): only evaluations where every
    retained probe (``eval_probe/<name>``) is at or above its threshold can be saved or chosen as the best; the steps
    passed over are listed in ``best.json`` (``skipped``). With several processes only the main one writes.
    """

    def __init__(self, directory: str, metric: str = "eval_loss", greater_is_better: bool | None = None,
                 keep: int = 1, best_value: float | None = None, best_step: int | None = None,
                 kept: list | None = None, retain: dict | None = None, skipped: list | None = None):
        if keep < 1:
            raise ValueError(f"BestCheckpoint(keep={keep}): keep at least 1 checkpoint")
        self.directory = os.path.abspath(directory)
        self.rule = _Improvement(metric, greater_is_better)
        self.keep = keep
        self.retain = _check_retain(retain, "BestCheckpoint")
        self.skipped = list(skipped or [])  # [{"step", "below": {metric: value}}]: evaluations the guard passed over
        self.best_value = best_value
        self.best_step = best_step
        self.kept = list(kept or [])  # [{"step", "value", "path"}], best first

    @property
    def metric(self) -> str:
        return self.rule.metric

    def state(self) -> dict:
        return {"args": {"directory": self.directory, "metric": self.rule.metric,
                         "greater_is_better": self.rule.greater_is_better, "keep": self.keep, "retain": self.retain},
                "attributes": {"best_value": self.best_value, "best_step": self.best_step, "kept": self.kept,
                               "skipped": self.skipped}}

    @property
    def best_path(self) -> str | None:
        return self.kept[0]["path"] if self.kept else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped = [s for s in self.skipped if s["step"] <= state.global_step]
        root = Path(self.directory)
        if root.exists() and is_main_process(args):
            # Checkpoints from steps after the one we resume from belong to a run that was lost: remove them.
            valid = {Path(k["path"]).name for k in self.kept}
            for child in root.glob("step-*"):
                if child.name not in valid:
                    shutil.rmtree(child, ignore_errors=True)
            self._write_record()

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        # Every process keeps the same bookkeeping (the metrics are gathered); only the main one writes.
        writes = is_main_process(args)
        value = self.rule.value(metrics)
        if value is None:
            if metrics and self.rule.metric not in metrics:
                raise KeyError(self.rule.missing_message(metrics, "BestCheckpoint"))
            return
        below = _below_threshold(metrics, self.retain, "BestCheckpoint") if self.retain else {}
        if below:
            self.skipped = [s for s in self.skipped if s["step"] != state.global_step]
            self.skipped.append({"step": state.global_step, "below": below})
            if writes:
                self._write_record()
            return
        if not self.rule.better(value, self.best_value):
            return
        self.best_value, self.best_step = value, state.global_step
        final = Path(self.directory) / f"step-{state.global_step:06d}"
        if writes:
            self._save(final, value, state.global_step, model, processing_class)
        self.kept = [k for k in self.kept if k["path"] != str(final)]
        self.kept.insert(0, {"step": state.global_step, "value": value, "path": str(final)})
        stale, self.kept = self.kept[self.keep:], self.kept[: self.keep]
        if writes:
            for checkpoint in stale:
                shutil.rmtree(checkpoint["path"], ignore_errors=True)
            self._write_record()

    def _save(self, final: Path, value: float, step: int, model, processing_class) -> None:
        """The adapters (and tokenizer) into ``final``, through a temporary directory renamed into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            # A card written first says what this checkpoint is (and spares PEFT compiling its card template).
            (tmp / "README.md").write_text(
                "---\nlibrary_name: peft\n---\n"  # the metadata block PEFT's card loader expects
                f"# Best checkpoint by {self.rule.metric}\n\nstep {step}: {self.rule.metric} = {value:.6g} "
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

    def record(self) -> dict:
        """What ``best.json`` holds: the metric and its direction, the best step, value and path, the kept list and
        the evaluations the retention guard passed over."""
        return {"metric": self.rule.metric, "greater_is_better": self.rule.greater_is_better,
                "best_step": self.best_step, "best_value": self.best_value, "best_path": self.best_path,
                "kept": self.kept, "retain": self.retain, "skipped": self.skipped}

    def _write_record(self) -> None:
        root = Path(self.directory)
        root.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(root / "best.json", self.record())


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
        if value is None and metrics and self.rule.metric not in metrics:
            raise KeyError(self.rule.missing_message(metrics, "EarlyStopping"))
        if value is not None and self.rule.better(value, self.best_value):
            self.best_value, self.bad_evaluations = value, 0
        elif value is not None:
            self.bad_evaluations += 1
        stop = value is not None and self.bad_evaluations >= self.patience and state.global_step < state.max_steps
        if any_process(stop):  # called at every evaluation by every process: they all stop at the same step
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            why = (f"{self.rule.metric} has not improved on {self.best_value:.6g} for {self.bad_evaluations} "
                   "evaluations" if stop else "another process reached the patience")
            say(f"EarlyStopping: {why}; stopping at step {state.global_step}")


class ProbeCallback(TrainerCallback):
    """Score forgetting probes (:class:`llmft.probes.Probe`, e.g. :func:`llmft.probes.fibonacci_probe`) on the current
    weights at every evaluation and report each as ``eval_probe/<name>`` (accuracy in [0, 1]) with the other eval
    metrics, plus ``eval_probe_runtime`` (seconds spent probing).

    It acts on the evaluation's ``on_log`` event, where transformers hands every callback the very dict that becomes
    the evaluation metrics: added there, the scores reach the metrics CSV (:class:`MetricsLogger`), TensorBoard,
    ``trainer.state.log_history``, and then ``on_evaluate`` (:class:`BestCheckpoint`, :class:`EarlyStopping`,
    :class:`RetentionGuard`). So it must come before :class:`MetricsLogger` among the trainer's callbacks:
    :func:`llmft.attach_training_control` puts it first. It keeps no state, so a resume does not move it.

    Cost is bounded: the first ``max_items`` items of each probe (the headline item first), greedy, batched
    ``batch_size`` at a time, at most ``max_new_tokens`` new tokens. Unsloth's inference mode is used for the
    generation and the model is put back in training mode (gradient checkpointing included) afterwards.
    The last scored answers are kept in ``last_tables`` ({probe name: DataFrame}) to see *how* a probe fails.

    With several processes (torchrun), each answers its share of the items and the answers are gathered
    (:func:`llmft.generate_batch` with ``across_processes=True``), so every process holds the same table and scores —
    the stop and best-checkpoint decisions that read them agree — in 1/N of the time. The answers may differ from a
    single process's where batching changes greedy decoding (in bf16 on a CPU 46 of 64 batched answers equalled the
    one-by-one ones, 64 of 64 in fp32), never between processes.
    """

    def __init__(self, probes, tokenizer=None, *, max_items: int | None = 32, max_new_tokens: int = 8,
                 batch_size: int = 32):
        from llmft.probes import Probe, named_probe

        probes = [probes] if isinstance(probes, (Probe, str)) else list(probes)
        if not probes:
            raise TypeError("ProbeCallback(probes=[]): pass llmft.probes.Probe objects, e.g. "
                            "[llmft.probes.fibonacci_probe()] or llmft.probes.custom_probe(name, pairs)")
        probes = [named_probe(p) for p in probes]
        names = [p.name for p in probes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ProbeCallback: probe names must be unique (each is a metric), got {duplicates} twice")
        if max_items is not None and max_items < 1:
            raise ValueError(f"ProbeCallback(max_items={max_items}): score at least 1 item, or None for all")
        self.probes = [self._bounded(p, max_items) for p in probes]
        self.tokenizer = tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.last_tables: dict = {}
        self._training = False

    @staticmethod
    def _bounded(probe, max_items):
        if max_items is None or len(probe.prompts) <= max_items:
            return probe
        return probe.subset(range(max_items))

    @property
    def metrics(self) -> list[str]:
        return [probe_metric(p.name) for p in self.probes]

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def score(self, model, tokenizer) -> dict[str, float]:
        """``{eval_probe/<name>: accuracy}`` for the model as it is now (with several processes, every one must call
        it: they share the items)."""
        from llmft.generation import inference_mode
        from llmft.probes import run_probe

        scores = {}
        try:
            with inference_mode(model):
                for probe in self.probes:
                    table = run_probe(model, tokenizer, probe, max_new_tokens=self.max_new_tokens,
                                      batch_size=self.batch_size, progress=False, across_processes=True)
                    self.last_tables[probe.name] = table
                    scores[probe_metric(probe.name)] = float(table["correct"].mean())
        finally:
            if self._training:  # evaluation left the model in eval mode; the next step expects training mode
                from unsloth import FastLanguageModel

                FastLanguageModel.for_training(model)
        return scores

    def _add_scores(self, metrics: dict, state, model, processing_class) -> None:
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if model is None or tokenizer is None:
            raise ValueError("ProbeCallback: the trainer passed no model or tokenizer to its callbacks; give the "
                             "tokenizer explicitly: ProbeCallback(probes, tokenizer)")
        start = time.perf_counter()
        metrics.update(self.score(model, tokenizer))
        metrics["eval_probe_runtime"] = round(time.perf_counter() - start, 4)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "eval_runtime" in history[-1]:
            history[-1].update({k: metrics[k] for k in (*self.metrics, "eval_probe_runtime")})

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        # An evaluation's logs carry eval_runtime; train logs and the end-of-training summary do not.
        if logs is not None and "eval_runtime" in logs and not all(k in logs for k in self.metrics):
            self._add_scores(logs, state, model, processing_class)

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        # Normally on_log has filled these in (same dict); a trainer whose log() copies its logs would miss them.
        if metrics is not None and not all(k in metrics for k in self.metrics):
            self._add_scores(metrics, state, model, processing_class)


class RetentionGuard(TrainerCallback, ExportableState):
    """Stop training when a retained probe has been below its threshold for ``patience`` evaluations in a row
    (``retain={"fibonacci": 0.9}``: keep ``eval_probe/fibonacci`` >= 0.9; see :class:`ProbeCallback`).

    Early stopping on the eval loss does not prevent forgetting (Kalajdzievski 2024: forgetting grows as the
    fine-tuning loss falls), so this stops on the forgetting itself. ``patience=1`` stops at the first evaluation
    below; a larger value tolerates a noisy probe (few items) dipping once. Counts are per probe and reset when it is
    back at or above its threshold.
    """

    def __init__(self, retain: dict, patience: int = 1, below_for: dict | None = None,
                 stopped_at_step: int | None = None, stopped_by: dict | None = None):
        if patience < 1:
            raise ValueError(f"RetentionGuard(patience={patience}): patience counts evaluations, at least 1")
        self.retain = _check_retain(retain, "RetentionGuard")
        if not self.retain:
            raise ValueError("RetentionGuard(retain={}): name at least one probe and its threshold")
        self.patience = patience
        self.below_for = dict(below_for or {})  # {probe metric: evaluations in a row below its threshold}
        self.stopped_at_step = stopped_at_step
        self.stopped_by = stopped_by  # {probe metric: value} at the stop

    def state(self) -> dict:
        return {"args": {"retain": self.retain, "patience": self.patience},
                "attributes": {"below_for": self.below_for, "stopped_at_step": self.stopped_at_step,
                               "stopped_by": self.stopped_by}}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics:
            return
        below = _below_threshold(metrics, self.retain, "RetentionGuard")
        self.below_for = {key: self.below_for.get(key, 0) + 1 for key in below}
        over = {key: below[key] for key, count in self.below_for.items() if count >= self.patience}
        if any_process(bool(over) and state.global_step < state.max_steps):  # every process stops at the same step
            self.stopped_at_step, self.stopped_by = state.global_step, over
            control.should_training_stop = True
            why = ", ".join(f"{key} = {value:.3g} < {self.retain[key[len(PROBE_PREFIX):]]:g}"
                            for key, value in over.items()) or "another process's retained probe"
            say(f"RetentionGuard: {why} for {self.patience} evaluation(s); stopping at step {state.global_step} "
                "(the best checkpoint is chosen among evaluations that kept every retained probe)")


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
        bad = [f"{key} became {logs[key]}" for key in ("loss", "eval_loss")
               if isinstance(logs.get(key), (int, float)) and not math.isfinite(logs[key])]
        if any_process(bool(bad)):  # every process stops at the same step, even if only one saw the bad value
            self.failure = (
                f"{bad[0] if bad else 'the loss became non-finite in another process'} at step {state.global_step}. "
                f"Likely cause: an fp16 overflow (T4s have no bf16) or a learning rate too high (now "
                f"{args.learning_rate:g}). Lower the learning rate, keep max_grad_norm=1.0, or resume from the last "
                "good checkpoint.")
            control.should_training_stop = True
            control.should_save = False

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
    would train (and save) in another precision than the uninterrupted one. :meth:`restore` casts them back; a
    trainer built on :class:`llmft.trainers.TrainerMixin` calls it when it creates the optimizer, right after the
    checkpoint is loaded and before the model is wrapped for DDP (whose gradient buckets keep the dtypes they were
    built with: cast later, the processes silently stop averaging gradients — measured, the replicas' weights
    diverged from the first step after a resume). For any other trainer it happens at the start of training, with
    the optimizer state loaded for the weights; there a DDP run stops with an error instead.
    """

    def __init__(self, model):
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}

    def restore(self, model) -> dict:
        """Cast ``model``'s trainable weights back to the dtypes training started with; ``{id(param): dtype}`` of
        those it changed."""
        changed = {}
        for name, param in model.named_parameters():
            want = self.dtypes.get(name)
            if want is not None and param.dtype != want:
                param.data = param.data.to(want)
                changed[id(param)] = want
        return changed

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        changed = self.restore(model)
        if changed and args.world_size > 1:
            raise RuntimeError(
                f"KeepAdapterDtype: {len(changed)} adapter weights came back from the checkpoint in another dtype "
                "after the model was wrapped for DistributedDataParallel, which would stop averaging their gradients. "
                "Build the trainer with llmft.build_trainer / build_dpo_trainer (or on llmft.trainers.TrainerMixin), "
                "which restores the dtypes before the model is wrapped.")
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


class QuietProgress(ProgressCallback):
    """transformers' progress bar without the dict it prints at every log (the metrics CSV keeps them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def quiet_console(trainer, progress: bool = True):
    """One progress bar (``progress=True``) or nothing on the console while ``trainer`` trains, instead of a printed
    dict per logging step (transformers' ``PrinterCallback`` / ``ProgressCallback``). Returns the trainer."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(QuietProgress())
    return trainer
