"""``build_trainer``: a real TRL ``SFTTrainer`` with T4-safe defaults, every default overridable.

TRL owns the training loop and Unsloth owns the patches; this module picks the defaults (precision from the hardware,
8-bit AdamW on a GPU, gradient clipping, a bounded eval subset, loss on assistant responses only for chat data),
checks the dataset, and reports what it changed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from pathlib import Path

from llmft._unsloth import import_unsloth
from llmft import callbacks as cb
from llmft.data import DataError, count_overlong
from llmft.masking import mask_responses
from llmft.models import DEFAULT_SEED
from llmft.schedulers import resolve_schedule

SUPPORTED_COLUMNS = ("messages", "text")
# Arguments build_trainer and build_dpo_trainer share: passed to _shared_args and to attach_training_control.
SHARED_ARGS = ("output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "learning_rate", "warmup_steps", "lr_scheduler_type", "weight_decay",
               "max_grad_norm", "logging_steps", "eval_steps", "save_total_limit", "optim", "seed", "report_to")
CONTROL_OPTIONS = ("metric", "greater_is_better", "early_stopping_patience", "early_stopping_min_delta", "keep_best",
                   "metrics_csv", "tensorboard", "weight_decay_ramp", "scheduler", "scheduler_options",
                   "probes", "retain", "retain_patience")


def precision_flags() -> dict:
    """``{"fp16": ..., "bf16": ...}`` for this machine: bf16 on Ampere+, fp16 on a T4, neither on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"fp16": False, "bf16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"fp16": not bf16, "bf16": bf16}


def default_optim() -> str:
    """8-bit AdamW (bitsandbytes) on a GPU saves ~75% of optimizer memory; plain AdamW on a CPU."""
    import torch

    return "adamw_8bit" if torch.cuda.is_available() else "adamw_torch"


def _check_dataset(dataset, argument: str) -> str:
    columns = dataset.column_names
    if "conversations" in columns and "messages" not in columns:
        raise DataError(f"{argument}: has ShareGPT 'conversations' (from/value turns); convert it first with "
                        "llmft.data.sharegpt_to_messages(dataset)")
    for column in SUPPORTED_COLUMNS:
        if column in columns:
            return column
    raise DataError(f"{argument}: expected a 'messages' (chat) or 'text' column, got {columns}. "
                    "Use llmft.data.sharegpt_to_messages or alpaca_to_text to prepare it.")


def _planned_steps(n_rows: int, batch: int, accumulation: int, epochs: float, max_steps: int) -> int:
    if max_steps and max_steps > 0:
        return max_steps
    return max(1, math.ceil(math.ceil(n_rows / batch) / accumulation * epochs))


def _config(config_cls, builder: str, overrides: dict, **defaults):
    """``config_cls(**defaults, **overrides)``, with unknown option names reported and a close match suggested."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        raise TypeError(f"{builder}: unknown option(s) " + ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            + f". Options are {builder}'s own arguments or trl.{config_cls.__name__} fields.")
    return config_cls(**{**defaults, **overrides})


def _prepare(builder: str, tokenizer, train_dataset, eval_dataset, *, max_length: int, eval_max_samples: int | None,
             seed: int, verbose: bool):
    """Bound the eval set to a fixed random subset and count over-long rows; returns (eval_dataset, reports)."""
    reports = {"train": count_overlong(train_dataset, tokenizer, max_length, "train_dataset")}
    if eval_dataset is not None and eval_max_samples is not None and len(eval_dataset) > eval_max_samples:
        if verbose:
            print(f"{builder}: evaluating on a fixed random {eval_max_samples} of {len(eval_dataset)} eval rows "
                  "(eval_max_samples)")
        eval_dataset = eval_dataset.shuffle(seed=seed).select(range(eval_max_samples))
    if eval_dataset is not None:
        reports["eval"] = count_overlong(eval_dataset, tokenizer, max_length, "eval_dataset")
    if verbose:
        for report in reports.values():
            print(report)
    return eval_dataset, reports


def _shared_args(*, n_train: int, has_eval: bool, output_dir, max_steps, num_train_epochs, per_device_train_batch_size,
                 gradient_accumulation_steps, learning_rate, warmup_steps, lr_scheduler_type, weight_decay,
                 max_grad_norm, logging_steps, eval_steps, save_total_limit, optim, seed, report_to) -> dict:
    """The training arguments SFT and DPO share, with the T4 defaults filled in."""
    steps = _planned_steps(n_train, per_device_train_batch_size, gradient_accumulation_steps, num_train_epochs,
                           max_steps)
    if eval_steps is None:
        eval_steps = max(1, steps // 10)
    return dict(
        output_dir=output_dir, max_steps=max_steps, num_train_epochs=num_train_epochs,
        per_device_train_batch_size=per_device_train_batch_size, per_device_eval_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        warmup_steps=warmup_steps, lr_scheduler_type=lr_scheduler_type, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, logging_steps=logging_steps, eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps, save_total_limit=save_total_limit,
        optim=optim or default_optim(), seed=seed, data_seed=seed, report_to=report_to, **precision_flags())


def build_trainer(
    model,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    *,
    output_dir: str = "outputs",
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 2,
    gradient_accumulation_steps: int = 4,
    learning_rate: float = 2e-4,
    warmup_steps: float = 5,
    lr_scheduler_type: str = "linear",
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    max_seq_length: int | None = None,
    logging_steps: int = 1,
    eval_steps: int | None = None,
    eval_max_samples: int | None = 200,
    save_total_limit: int = 2,
    responses_only: bool | None = None,
    instruction_part: str | None = None,
    response_part: str | None = None,
    optim: str | None = None,
    seed: int = DEFAULT_SEED,
    report_to: str = "none",
    scheduler=None,
    scheduler_options: dict | None = None,
    metric: str = "eval_loss",
    greater_is_better: bool | None = None,
    early_stopping_patience: int | None = 3,
    early_stopping_min_delta: float = 0.0,
    keep_best: int = 2,
    metrics_csv: bool = True,
    tensorboard: bool = False,
    weight_decay_ramp: tuple[float, float] | None = None,
    probes: list | None = None,
    retain: dict | None = None,
    retain_patience: int | None = 2,
    callbacks: list | None = None,
    distill: DistillConfig | dict | bool | None = None,
    verbose: bool = True,
    **sft_config,
):
    """Return a TRL ``SFTTrainer`` for ``model`` (from :func:`llmft.load_model`) on ``train_dataset``.

    Datasets: a ``messages`` column (chat; see :func:`llmft.data.sharegpt_to_messages`) or a ``text`` column.

    Defaults, chosen for a 16 GB T4 and documented so they can be changed:

    - precision from the hardware (fp16 on a T4, bf16 on Ampere+), ``optim="adamw_8bit"`` on a GPU;
    - effective batch 2 x 4 (``per_device_train_batch_size`` x ``gradient_accumulation_steps``), lr 2e-4 with 5
      warmup steps and linear decay, weight decay 0.01, ``max_grad_norm=1.0`` (gradient clipping as in the seeds);
    - ``max_seq_length`` = the model's (from ``load_model``); over-long rows are counted and reported, then truncated;
    - ``responses_only``: for chat data the loss covers assistant turns only, each up to and including its
      end-of-turn token, located from the chat template's rendering; for ``text`` data it is on when both markers are
      given (e.g. "### Instruction:\\n" / "### Response:\\n" for Alpaca) and covers what follows ``response_part``.
      Responses are found in the text and mapped to tokens by character offsets (:mod:`llmft.masking`), which holds for
      every tokenizer family (a response starting with a newline keeps its loss); rows and turns left with no
      trainable token are reported by name (``trainer.llmft_reports``);
    - with an ``eval_dataset``: evaluate every ``eval_steps`` (default: a tenth of the run) on at most
      ``eval_max_samples`` rows (a fixed random subset), so evaluation never dominates a T4 session;
    - checkpoints every ``eval_steps`` into ``output_dir``, keeping ``save_total_limit``; resume with
      :func:`train` (``resume="auto"``) after a disconnect.

    Training control (see :mod:`llmft.callbacks`), wired by :func:`attach_training_control`:
    ``output_dir/metrics.csv`` (one row per log/eval event; ``tensorboard=True`` too), the ``keep_best`` best adapters
    by ``metric`` in ``output_dir/best`` (``best.json`` says which), early stopping after ``early_stopping_patience``
    evaluations without improvement (``None`` turns it off), a NaN/inf-loss guard, and optionally a weight-decay ramp
    ``weight_decay_ramp=(start, end)``. ``greater_is_better=None`` infers the direction from the metric's name.

    Live probes: ``probes=[llmft.probes.fibonacci_probe()]`` scores each probe at every evaluation (greedy, bounded:
    see :class:`llmft.callbacks.ProbeCallback`, which can be passed instead of the list to change the bounds) and
    reports ``eval_probe/<name>`` with the eval metrics (CSV, plots, best checkpoint, early stopping see it).
    ``retain={"fibonacci": 0.9}`` is a retention guard: the best checkpoint is chosen only among evaluations that
    keep each named probe at or above its threshold, and training stops once a retained probe has stayed below for
    ``retain_patience`` evaluations in a row (default 2, so one noisy dip does not stop a run; ``None``: never stop).

    ``scheduler``: a Chebyshev schedule by name ("chebyshev", "chebyshev_full", "chebyshev_steps",
    "chebyshev_fractal"; options in ``scheduler_options``) or a callable ``(optimizer, num_training_steps)`` returning
    a ``LambdaLR``; ``None`` keeps ``lr_scheduler_type``. Warmup (``warmup_steps``) applies to every schedule.

    ``distill``: a :class:`DistillConfig` (or its fields as a dict, or True for the defaults) adds knowledge
    distillation from the adapter-disabled model to the loss, against forgetting.

    Any other ``trl.SFTConfig`` field can be passed as a keyword (e.g. ``packing=True``).
    """
    options = dict(locals())
    import_unsloth()
    from trl import SFTConfig, SFTTrainer

    kind = _check_dataset(train_dataset, "train_dataset")
    if eval_dataset is not None and _check_dataset(eval_dataset, "eval_dataset") != kind:
        raise DataError(f"eval_dataset: must have the same '{kind}' column as train_dataset, "
                        f"got {eval_dataset.column_names}")
    if (instruction_part is None) != (response_part is None):
        raise ValueError("build_trainer: give both instruction_part and response_part, or neither")
    if responses_only is None:
        responses_only = kind == "messages" or response_part is not None
    if responses_only and kind == "text" and response_part is None:
        raise ValueError("build_trainer(responses_only=True) on 'text' data needs instruction_part and response_part "
                         "(for the Alpaca prompt: '### Instruction:\\n' and '### Response:\\n')")
    if max_seq_length is None:
        max_seq_length = getattr(model, "max_seq_length", None) or 2048

    eval_dataset, reports = _prepare("build_trainer", tokenizer, train_dataset, eval_dataset, max_length=max_seq_length,
                                     eval_max_samples=eval_max_samples, seed=seed, verbose=verbose)
    if responses_only:  # tokenized here, with the loss located by character offsets (see llmft.masking)
        parts = dict(instruction_part=instruction_part, response_part=response_part, max_length=max_seq_length)
        train_dataset, reports["train_masking"] = mask_responses(train_dataset, tokenizer, name="train_dataset", **parts)
        if eval_dataset is not None:
            eval_dataset, reports["eval_masking"] = mask_responses(eval_dataset, tokenizer, name="eval_dataset",
                                                                   **parts)
    args = _config(
        SFTConfig, "build_trainer", sft_config,
        **_shared_args(n_train=len(train_dataset), has_eval=eval_dataset is not None,
                       **{k: options[k] for k in SHARED_ARGS}),
        max_length=max_seq_length,
        dataset_text_field="text",
    )
    trainer_class = SFTTrainer
    if distill:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("build_trainer(distill=...): the teacher is the model with its LoRA adapter disabled, so "
                             "the model needs LoRA (llmft.load_model with lora_r set)")
        trainer_class = _distill_trainer_class(SFTTrainer)
        trainer_class.llmft_distill = (distill if isinstance(distill, DistillConfig)
                                       else DistillConfig(**distill) if isinstance(distill, dict) else DistillConfig())
    trainer = trainer_class(model=model, processing_class=tokenizer, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, args=args, callbacks=list(callbacks or []))
    attach_training_control(trainer, **{k: options[k] for k in CONTROL_OPTIONS})
    for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        report = reports.get(f"{split}_masking")
        if report is not None:
            report.dropped_by_trainer = report.rows - len(dataset)
            if verbose or report.dropped_by_trainer:
                print(report)
    trainer.llmft_reports = reports
    return trainer


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation against forgetting (seed 000): the SFT loss plus ``weight`` x KL(teacher || student)
    on response tokens, the teacher being the same model with its LoRA adapter disabled (the base model: no second
    model in memory).

    - ``weight``: λ, the KL term's weight (0.3 kept 86% of the Fibonacci probe in our tiny prototype);
    - ``temperature``: softens both distributions; the KL is scaled by T² so its gradient keeps its size;
    - ``only_where_teacher_right``: the seed's variant, distil only on tokens the teacher predicts correctly.
    """

    weight: float = 0.3
    temperature: float = 1.0
    only_where_teacher_right: bool = False

    def __post_init__(self):
        if self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"DistillConfig(weight={self.weight}, temperature={self.temperature}): need weight >= 0 "
                             "and temperature > 0")


def _response_positions(labels):
    """Positions whose next token is a response token (causal shift: logits[t] predict labels[t + 1])."""
    return labels[:, 1:] != -100


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 1.0,
            only_where_teacher_right: bool = False, reduction: str = "mean"):
    """T² · KL(softmax(teacher/T) || softmax(student/T)) over the response tokens (labels != -100, shifted as in
    causal LM training); zero when the student equals the teacher. ``reduction="mean"``: averaged over the response
    tokens; ``"sum"``: summed, for a caller that divides by its own token count (as the trainer does with
    ``num_items_in_batch``). With ``only_where_teacher_right`` the tokens the teacher gets wrong contribute 0 (they
    still count in the mean, as they do in the cross-entropy's)."""
    import torch
    import torch.nn.functional as F

    if reduction not in ("mean", "sum"):
        raise ValueError(f"kd_loss(reduction={reduction!r}): use 'mean' or 'sum'")
    mask = _response_positions(labels)
    student, teacher = student_logits[:, :-1][mask].float(), teacher_logits[:, :-1][mask].float()
    n_tokens = student.shape[0]
    if only_where_teacher_right:
        right = teacher.argmax(dim=-1) == labels[:, 1:][mask]
        student, teacher = student[right], teacher[right]
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = torch.sum(log_p_teacher.exp() * (log_p_teacher - log_p_student), dim=-1).sum() * temperature ** 2
    return kl if reduction == "sum" else kl / n_tokens


def _distill_trainer_class(base):
    """A subclass of the (Unsloth-patched) SFTTrainer whose loss adds the distillation term.

    TRL's own loss goes through a fused LM-head kernel that never materialises the logits, so this loss computes the
    cross-entropy itself from one student forward pass, on response positions only (a T4 cannot hold fp32 logits of
    every position of a 128k vocabulary), and runs one more forward pass with the adapter disabled for the teacher.
    """

    class DistillSFTTrainer(base):
        llmft_distill: DistillConfig = DistillConfig()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch
            import torch.nn.functional as F

            config = self.llmft_distill
            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            outputs = model(**forward)
            mask = _response_positions(labels)
            targets = labels[:, 1:][mask]
            ce = F.cross_entropy(outputs.logits[:, :-1][mask].float(), targets, reduction="sum")
            # Both terms are token sums divided by the same count. In training transformers passes
            # num_items_in_batch = the response tokens of the whole accumulation window and then does NOT divide by
            # the accumulation steps, so a per-micro-batch mean here would weigh the KL x accumulation steps.
            count = num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel())
            loss = ce / count
            if config.weight > 0:
                peft_model = self.accelerator.unwrap_model(model)
                with torch.no_grad(), peft_model.disable_adapter():
                    teacher_logits = peft_model(**forward).logits
                kd_sum = kd_loss(outputs.logits, teacher_logits, labels, config.temperature,
                                 config.only_where_teacher_right, reduction="sum")
                loss = loss + config.weight * kd_sum / count
                metrics = getattr(self, "_metrics", None)
                if isinstance(metrics, dict):
                    # Logged per micro-batch and averaged by TRL: scaled so the average over a window is that
                    # window's KL per response token (the same normalisation as the logged loss).
                    steps = 1
                    if num_items_in_batch is not None and model.training:
                        steps = getattr(self, "current_gradient_accumulation_steps", None) or 1
                    mode = "train" if model.training else "eval"
                    metrics.setdefault(mode, {}).setdefault("kd_loss", []).append(
                        float(kd_sum.detach() / count) * steps)
            return (loss, outputs) if return_outputs else loss

    return DistillSFTTrainer


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def build_dpo_trainer(
    model,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    *,
    output_dir: str = "outputs_dpo",
    beta: float = 0.1,
    learning_rate: float = 5e-6,
    max_length: int | None = None,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 2,
    gradient_accumulation_steps: int = 4,
    warmup_steps: float = 5,
    lr_scheduler_type: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    logging_steps: int = 1,
    eval_steps: int | None = None,
    eval_max_samples: int | None = 200,
    save_total_limit: int = 2,
    optim: str | None = None,
    seed: int = DEFAULT_SEED,
    report_to: str = "none",
    scheduler=None,
    scheduler_options: dict | None = None,
    metric: str = "eval_loss",
    greater_is_better: bool | None = None,
    early_stopping_patience: int | None = 3,
    early_stopping_min_delta: float = 0.0,
    keep_best: int = 2,
    metrics_csv: bool = True,
    tensorboard: bool = False,
    weight_decay_ramp: tuple[float, float] | None = None,
    probes: list | None = None,
    retain: dict | None = None,
    retain_patience: int | None = 2,
    callbacks: list | None = None,
    verbose: bool = True,
    **dpo_config,
):
    """Return a TRL ``DPOTrainer`` for ``model`` (from :func:`llmft.load_model`, LoRA on) on preference pairs
    (``prompt``/``chosen``/``rejected``; see :func:`llmft.data.orca_to_dpo` and :func:`llmft.data.preference_pairs`).

    The reference policy costs no second model: TRL copies the model's LoRA adapter into a frozen ``ref`` adapter when
    the trainer is built and computes reference log-probabilities through it. From a fresh LoRA (B = 0) that reference
    *is* the base model with its adapter disabled; from SFT adapters (``load_model("<sft adapters>")``) it is the SFT
    model, as DPO intends.

    Defaults as :func:`build_trainer` (precision from the hardware, 8-bit AdamW on a GPU, batch 2 x 4,
    ``max_grad_norm=1.0``, bounded eval subset, checkpoints for :func:`train` to resume, the same training control and
    schedules) with DPO's own: ``beta=0.1``, ``learning_rate=5e-6`` (DPO wants far smaller steps than SFT), no weight
    decay, ``max_length`` = the model's ``max_seq_length``. ``metric`` may be any DPO eval metric, e.g.
    ``"eval_rewards/accuracies"`` or ``"eval_rewards/margins"`` (higher is better, inferred from the name). Live probes
    and the retention guard (``probes``, ``retain``, ``retain_patience``) work as in :func:`build_trainer`. Any other
    ``trl.DPOConfig`` field can be passed as a keyword.
    """
    options = dict(locals())
    import_unsloth()
    from trl import DPOConfig, DPOTrainer

    for argument, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None and not set(PREFERENCE_COLUMNS) <= set(dataset.column_names):
            hint = (" Convert Intel/orca_dpo_pairs rows with llmft.data.orca_to_dpo." if "question" in
                    dataset.column_names else " Use llmft.data.preference_pairs to check and convert them.")
            raise DataError(f"{argument}: DPO needs prompt, chosen and rejected columns, got {dataset.column_names}."
                            + hint)
    if not hasattr(model, "peft_config"):
        raise ValueError("build_dpo_trainer: the model has no LoRA adapter; load it with llmft.load_model (lora_r "
                         "set, the default) so the reference is an adapter copy instead of a second model")
    if max_length is None:
        max_length = getattr(model, "max_seq_length", None) or 1024
    eval_dataset, reports = _prepare("build_dpo_trainer", tokenizer, train_dataset, eval_dataset,
                                     max_length=max_length, eval_max_samples=eval_max_samples, seed=seed,
                                     verbose=verbose)
    args = _config(
        DPOConfig, "build_dpo_trainer", dpo_config,
        **_shared_args(n_train=len(train_dataset), has_eval=eval_dataset is not None,
                       **{k: options[k] for k in SHARED_ARGS}),
        beta=beta,
        max_length=max_length,
    )
    trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=list(callbacks or []))
    attach_training_control(trainer, **{k: options[k] for k in CONTROL_OPTIONS})
    trainer.llmft_reports = reports
    return trainer


def attach_training_control(trainer, *, metric: str = "eval_loss", greater_is_better: bool | None = None,
                            early_stopping_patience: int | None = 3, early_stopping_min_delta: float = 0.0,
                            keep_best: int = 2, metrics_csv: bool = True, tensorboard: bool = False,
                            weight_decay_ramp: tuple[float, float] | None = None, scheduler=None,
                            scheduler_options: dict | None = None, probes=None, retain: dict | None = None,
                            retain_patience: int | None = 2):
    """Add llmft's training control to any transformers/TRL trainer (SFT, DPO, ...): metrics CSV, best checkpoint
    and early stopping (only when the trainer evaluates), the non-finite-loss guard, an optional weight-decay ramp,
    an optional custom LR schedule, and live probes with a retention guard (``probes``, ``retain``,
    ``retain_patience``: see :func:`build_trainer`). Returns the trainer."""
    out = Path(trainer.args.output_dir)
    evaluates = trainer.eval_dataset is not None and str(trainer.args.eval_strategy) not in ("no", "IntervalStrategy.NO")
    prober = _probe_callback(trainer, probes, retain, evaluates)
    if prober is not None:  # first of all: it adds eval_probe/* to the eval logs every later callback sees
        trainer.callback_handler.callbacks.insert(0, prober)
    if weight_decay_ramp is not None:  # before the logger, so the logged row carries the weight decay in use
        trainer.add_callback(cb.WeightDecayRamp(*weight_decay_ramp))
    if metrics_csv:
        trainer.add_callback(cb.MetricsLogger(out / "metrics.csv", tensorboard=tensorboard))
    if evaluates and keep_best:
        trainer.add_callback(cb.BestCheckpoint(str(out / "best"), metric, greater_is_better, keep=keep_best,
                                               retain=retain))
    if evaluates and early_stopping_patience:
        trainer.add_callback(cb.EarlyStopping(early_stopping_patience, metric, greater_is_better,
                                              early_stopping_min_delta))
    if retain and retain_patience:
        trainer.add_callback(cb.RetentionGuard(retain, retain_patience))
    trainer.add_callback(cb.NonFiniteLossGuard())
    trainer.add_callback(cb.KeepAdapterDtype(trainer.model))
    trainer.args.restore_callback_states_from_checkpoint = True
    if scheduler is not None:
        use_schedule(trainer, scheduler, **(scheduler_options or {}))
    return trainer


def _probe_callback(trainer, probes, retain, evaluates):
    """The :class:`llmft.callbacks.ProbeCallback` for ``probes`` (or ``probes`` itself when it is one), with
    ``retain`` checked against the probe names."""
    if not probes:
        if retain:
            raise ValueError(f"retain={retain!r} guards probes, but no probes were given: pass "
                             "probes=[llmft.probes.fibonacci_probe()] (or your own) as well")
        return None
    if not evaluates:
        raise ValueError("probes are scored at every evaluation, and this trainer never evaluates: give an "
                         "eval_dataset (evaluated every eval_steps), or score probes after training with "
                         "llmft.probes.run_probe / probe_checkpoints")
    prober = probes if isinstance(probes, cb.ProbeCallback) else cb.ProbeCallback(probes, trainer.processing_class)
    names = [p.name for p in prober.probes]
    for name in cb._check_retain(retain, "retain"):
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"retain: no probe named {name!r} among probes {names}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return prober


def use_schedule(trainer, scheduler, **options):
    """Make ``trainer`` build its LR scheduler from ``scheduler`` (a name from :data:`llmft.schedulers.SCHEDULES` or
    a factory), with the trainer's warmup. Overrides ``Trainer.create_scheduler`` on this instance only (the hook
    transformers documents for custom schedules)."""
    factory = resolve_schedule(scheduler, **options)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            kwargs = {"warmup_steps": warmup} if warmup else {}
            self.lr_scheduler = factory(optimizer or self.optimizer, num_training_steps, **kwargs)
        return self.lr_scheduler

    trainer.create_scheduler = types.MethodType(create_scheduler, trainer)
    trainer.llmft_scheduler = scheduler if isinstance(scheduler, str) else getattr(scheduler, "__name__", "custom")
    return trainer


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (one whose trainer_state.json was written), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            candidates.append((int(suffix), path))
    return str(max(candidates)[1]) if candidates else None


def train(trainer, resume: bool | str | None = "auto"):
    """Train, resuming after a disconnect: ``resume="auto"`` continues from the newest complete checkpoint in the
    trainer's ``output_dir`` when there is one (optimizer, scheduler, RNG, callback state and the metrics CSV all carry
    over) and starts fresh otherwise; ``True`` requires a checkpoint; a path resumes from that checkpoint;
    ``False``/``None`` always starts fresh."""
    checkpoint = None
    if resume in ("auto", True):
        checkpoint = latest_checkpoint(trainer.args.output_dir)
        if checkpoint is None and resume is True:
            raise FileNotFoundError(f"train(resume=True): no complete checkpoint-* in {trainer.args.output_dir}; "
                                    "use resume='auto' to start fresh when there is none")
    elif isinstance(resume, (str, os.PathLike)):
        checkpoint = str(resume)
        if not (Path(checkpoint) / "trainer_state.json").exists():
            raise FileNotFoundError(f"train(resume={checkpoint!r}): not a complete checkpoint (no trainer_state.json)")
    if checkpoint:
        print(f"llmft.train: resuming from {checkpoint}")
    return trainer.train(resume_from_checkpoint=checkpoint)
