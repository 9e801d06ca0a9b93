"""``build_trainer``: a real TRL ``SFTTrainer`` with T4-safe defaults, every default overridable.

TRL owns the training loop and Unsloth owns the patches; this module picks the defaults (precision from the hardware,
8-bit AdamW on a GPU, gradient clipping, a bounded eval subset, loss on assistant responses only for chat data),
checks the dataset, and reports what it changed. The defaults live in :mod:`llmft.configs` (one dataclass field
each, with its help); the builders' keywords are those fields and TRL's, made into one
:class:`~llmft.trl_configs.LlmftSFTConfig` / :class:`~llmft.trl_configs.LlmftDPOConfig` (a ``trl.SFTConfig`` /
``trl.DPOConfig``) that is the trainer's ``args`` and is recorded in ``output_dir/llmft_config.json``.

The trainers are TRL's, subclassed thinly at module level (importable, subclassable):
:class:`LlmftSFTTrainer` / :class:`LlmftDPOTrainer` add a custom LR schedule through ``create_scheduler`` (the hook
transformers documents for it) and keep the data reports; :class:`DistillSFTTrainer` adds knowledge distillation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import inspect
import os
import weakref
from pathlib import Path

from llmft._unsloth import import_unsloth

import_unsloth()  # the SFTTrainer subclassed below must be the one Unsloth patched

from transformers import TrainerCallback  # noqa: E402
from trl import DPOTrainer, SFTTrainer  # noqa: E402

from llmft import callbacks as cb  # noqa: E402
from llmft.checkpoints import checkpoint_problem, checkpoints, latest_checkpoint  # noqa: E402,F401  (also llmft.trainers.*)
from llmft.configs import DistillConfig, DPORunConfig, SFTRunConfig, TrainingControlConfig, options_from  # noqa: E402
from llmft.data import PREFERENCE_COLUMNS, DataError, check_preference_rows, count_overlong  # noqa: E402
from llmft.log import say  # noqa: E402
from llmft.masking import completion_report, mask_responses  # noqa: E402
from llmft.environment import is_main_process  # noqa: E402
from llmft.schedulers import resolve_schedule  # noqa: E402
from llmft.trl_configs import (  # noqa: E402,F401  (precision_flags, default_optim: also llmft.trainers.*)
    LlmftDPOConfig, LlmftSFTConfig, config_from, default_optim, precision_flags,
)

__all__ = ["build_trainer", "build_sft_trainer", "build_dpo_trainer", "attach_training_control", "train",
           "resume_checkpoint", "latest_checkpoint", "LlmftSFTTrainer", "LlmftDPOTrainer", "DistillSFTTrainer",
           "DistillConfig", "LlmftSFTConfig", "LlmftDPOConfig", "kd_loss"]

PROMPT_COMPLETION = "prompt/completion"


def _check_dataset(dataset, argument: str) -> str:
    """The kind of SFT data, as TRL reads it: "prompt/completion" (TRL takes ``prompt`` first), "messages" or
    "text"; a :class:`DataError` for an empty dataset or columns TRL would misread."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise DataError(f"{argument}: empty (0 rows); give at least one row (check the split, filters and `rows`)")
    if "conversations" in columns and "messages" not in columns:
        raise DataError(f"{argument}: has ShareGPT 'conversations' (from/value turns); convert it first with "
                        "llmft.data.sharegpt_to_messages(dataset)")
    if "prompt" in columns:
        if "completion" in columns:
            return PROMPT_COMPLETION
        raise DataError(f"{argument}: has 'prompt' but no 'completion' (columns {columns}); TRL reads a 'prompt' "
                        "column as prompt/completion data. Add the 'completion' column, or drop 'prompt' "
                        "(dataset.remove_columns('prompt')) to train on "
                        + ("'text'" if "text" in columns else "'messages'" if "messages" in columns else "the text"))
    for column in ("messages", "text"):
        if column in columns:
            return column
    raise DataError(f"{argument}: expected a 'messages' (chat), 'text' or 'prompt' + 'completion' column, got "
                    f"{columns}. Use llmft.data.sharegpt_to_messages, alpaca_to_text or mcq_rows to prepare it.")


def _prepare(builder: str, tokenizer, train_dataset, eval_dataset, *, max_length: int, eval_max_samples: int | None,
             seed: int, verbose: bool):
    """Bound the eval set to a fixed random subset and count over-long rows; returns (eval_dataset, reports)."""
    reports = {"train": count_overlong(train_dataset, tokenizer, max_length, "train_dataset")}
    if eval_dataset is not None and eval_max_samples is not None and len(eval_dataset) > eval_max_samples:
        say(f"{builder}: evaluating on a fixed random {eval_max_samples} of {len(eval_dataset)} eval rows "
            "(eval_max_samples)", verbose)
        eval_dataset = eval_dataset.shuffle(seed=seed).select(range(eval_max_samples))
    if eval_dataset is not None:
        reports["eval"] = count_overlong(eval_dataset, tokenizer, max_length, "eval_dataset")
    for report in reports.values():
        say(report, verbose)
    return eval_dataset, reports


def _keyword_signature(function, options_cls, trl_name: str):
    """Show ``options_cls``'s fields (with their defaults) as ``function``'s keyword-only parameters, so ``help()``
    and editors list them; the defaults stay written once, in the dataclass."""
    signature = inspect.signature(function)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in fixed}
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in dataclasses.fields(options_cls) if f.name not in taken]
    extra = inspect.Parameter(trl_name, inspect.Parameter.VAR_KEYWORD)
    function.__signature__ = signature.replace(parameters=fixed + fields + [extra])
    return function


class TrainerMixin:
    """What llmft adds to a transformers/TRL trainer class, through documented hooks only.

    - ``lr_schedule``: a factory ``(optimizer, num_training_steps, warmup_steps=...) -> LambdaLR`` (see
      :mod:`llmft.schedulers`), used by :meth:`create_scheduler`, transformers' hook for custom schedules; None keeps
      ``args.lr_scheduler_type``. Set it at construction or with :func:`attach_training_control`.
    - ``llmft_reports``: the data reports of the build (over-long rows, response masking), by split.
    - ``llmft_options``: the config the trainer was built with, its ``args`` (None when built by hand).
    - :meth:`create_optimizer` (transformers' hook) first restores the adapters' training dtype after a resume
      (:class:`llmft.callbacks.KeepAdapterDtype`), before the model is wrapped for DDP.
    - :meth:`train` resumes as :func:`llmft.train` does: ``trainer.train(resume_from_checkpoint=True | "auto" |
      path)``, TRL's and Unsloth's spelling, skips incomplete checkpoints and reloads the DPO policy adapter.
    """

    def __init__(self, *args, lr_schedule=None, **kwargs):
        self.lr_schedule = lr_schedule
        self.llmft_reports: dict = {}
        self.llmft_options = None
        super().__init__(*args, **kwargs)

    def train(self, resume_from_checkpoint: bool | str | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """transformers' ``Trainer.train``, resuming as :func:`llmft.train` does: ``resume_from_checkpoint=True`` the
        newest *complete* checkpoint in ``output_dir`` (one a kill or a full disk left incomplete is skipped, naming
        why; an error when there is none), ``"auto"`` the same or a fresh start when there is none, a path that
        checkpoint (refused when incomplete), ``None``/``False`` a fresh start. Beyond transformers' own resume: the
        DPO policy adapter is reloaded, the adapters keep their training dtype, the running loss and token totals
        carry over, and a full disk is reported as such."""
        return self._train_resuming(resume_from_checkpoint, f"{type(self).__name__}.train(resume_from_checkpoint",
                                    f"{type(self).__name__}.train", trial=trial,
                                    ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _train_resuming(self, resume, caller: str, who: str, **kwargs):
        checkpoint = resume_checkpoint(self.args.output_dir, resume, caller)
        return _train_from(self, checkpoint, lambda c: super(TrainerMixin, self).train(resume_from_checkpoint=c,
                                                                                        **kwargs), who)

    def create_optimizer(self, *args, **kwargs):
        # Resuming, transformers has just loaded the checkpoint's adapters (PEFT upcasts them) and wraps the model for
        # DDP next: their training dtype must be back before that (see llmft.callbacks.KeepAdapterDtype).
        keeper = cb.find_callback(self, cb.KeepAdapterDtype)
        if keeper is not None:
            keeper.restore(self.model)
        return super().create_optimizer(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        kwargs = {"warmup_steps": warmup} if warmup else {}
        self.lr_scheduler = self.lr_schedule(optimizer or self.optimizer, num_training_steps, **kwargs)
        self._created_lr_scheduler = True  # transformers rebuilds it on the next train(), as for its own schedules
        return self.lr_scheduler


class LlmftSFTTrainer(TrainerMixin, SFTTrainer):
    """TRL's (Unsloth-patched) ``SFTTrainer`` with :class:`TrainerMixin`: what :func:`build_trainer` returns."""


class LlmftDPOTrainer(TrainerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with :class:`TrainerMixin`: what :func:`build_dpo_trainer` returns.

    Built again on a model that already holds TRL's frozen ``ref`` adapter (a notebook cell re-run), it keeps that
    reference: TRL would refuse to add it twice, and a fresh copy of a policy trained since would be the wrong
    reference."""

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        with _keeping_reference(model):
            super().__init__(*args, **kwargs)


REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer gives its frozen copy of the policy's adapter


@contextlib.contextmanager
def _keeping_reference(model):
    """Around a DPOTrainer's construction: if ``model`` already has TRL's ``ref`` adapter, set its weights aside,
    let TRL add the adapter anew (PEFT refuses a second adapter of one name), and put the weights back."""
    if REFERENCE_ADAPTER not in (getattr(model, "peft_config", None) or {}):
        yield
        return
    marker = f".{REFERENCE_ADAPTER}."
    kept = {name: p.detach().clone() for name, p in model.named_parameters() if marker in name}
    say(f"LlmftDPOTrainer: the model already holds the '{REFERENCE_ADAPTER}' adapter of an earlier DPO trainer (a "
        "re-run cell?); keeping it as the reference policy")
    config = model.peft_config[REFERENCE_ADAPTER]
    model.delete_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        import torch

        if REFERENCE_ADAPTER not in model.peft_config:  # the trainer failed before adding it: the model keeps it
            model.add_adapter(REFERENCE_ADAPTER, config)
        restored = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in kept.items():
                restored[name].copy_(value)


def build_trainer(model, tokenizer, train_dataset, eval_dataset=None, *,
                  config: LlmftSFTConfig | SFTRunConfig | dict | None = None,
                  callbacks: list | None = None, verbose: bool = True, **options):
    """Return a TRL ``SFTTrainer`` (an :class:`LlmftSFTTrainer`) for ``model`` (from :func:`llmft.load_model`) on
    ``train_dataset``.

    Datasets: a ``messages`` column (chat; see :func:`llmft.data.sharegpt_to_messages`), a ``text`` column, or
    ``prompt`` and ``completion`` columns (e.g. :func:`llmft.data.mcq_rows`; TRL tokenizes the prompt alone and the loss
    covers the completion). An empty dataset is refused before the model is touched.

    Every keyword is a field of :class:`llmft.trl_configs.LlmftSFTConfig`: llmft's own, of
    :class:`llmft.configs.SFTRunConfig` (their defaults and help are there), or any other ``trl.SFTConfig`` field
    (e.g. ``packing=True``); ``config=`` takes a whole ``LlmftSFTConfig`` (or ``SFTRunConfig``, or a dict) and
    keywords override it. A misspelt name is refused with the closest one suggested. The config made is the
    trainer's ``args`` (and ``llmft_options``), written to ``output_dir/llmft_config.json``. Defaults, chosen for a
    16 GB T4:

    - precision from the hardware (fp16 on a T4, bf16 on Ampere+), ``optim="adamw_8bit"`` on a GPU;
    - effective batch 2 x 4 (``per_device_train_batch_size`` x ``gradient_accumulation_steps``), lr 2e-4 with 5
      warmup steps and linear decay, weight decay 0.01, ``max_grad_norm=1.0`` (gradient clipping as in the CodeMMLU
      report);
    - ``max_seq_length`` = the model's (from ``load_model``); over-long rows are counted and reported, then truncated;
    - ``responses_only``: for chat data the loss covers assistant turns only, each up to and including its
      end-of-turn token, located from the chat template's rendering; for ``text`` data it is on when both markers are
      given (e.g. "### Instruction:\\n" / "### Response:\\n" for Alpaca) and covers what follows ``response_part``.
      Responses are found in the text and mapped to tokens by character offsets (:mod:`llmft.masking`), which holds for
      every tokenizer family (a response starting with a newline keeps its loss); rows and turns left with no
      trainable token are reported by name (``trainer.llmft_reports``). Chat rows are tokenized by llmft with
      ``responses_only=False`` too: a message holding the text of a control token (``<|eot_id|>``, ``[INST]``)
      trains it as text, never as the control token; markers are matched by the template's structure;
    - with an ``eval_dataset``: evaluate every ``eval_steps`` (default: a tenth of the run) on at most
      ``eval_max_samples`` rows (a fixed random subset), so evaluation never dominates a T4 session;
    - checkpoints every ``eval_steps`` into ``output_dir``, keeping ``save_total_limit``; resume with
      :func:`train` (``resume="auto"``) after a disconnect.

    Training control (:class:`llmft.configs.TrainingControlConfig`, wired by :func:`attach_training_control`):
    ``output_dir/metrics.csv`` (one row per log/eval event; ``tensorboard=True`` too), the ``keep_best`` best adapters
    by ``metric`` in ``output_dir/best`` (``best.json`` says which), early stopping after ``early_stopping_patience``
    evaluations without improvement (``None`` turns it off), a NaN/inf-loss guard, and optionally a weight-decay ramp
    ``weight_decay_ramp=(start, end)``. ``greater_is_better=None`` infers the direction from the metric's name.

    Live probes: ``probes=[llmft.probes.fibonacci_probe()]`` scores each probe at every evaluation (greedy, bounded:
    see :class:`llmft.callbacks.ProbeCallback`, which can be passed instead of the list to change the bounds) and
    reports ``eval_probe/<name>`` with the eval metrics (CSV, plots, best checkpoint, early stopping see it).
    ``retain={"fibonacci": 0.9}`` is a retention guard: the best checkpoint is chosen only among evaluations that
    keep each named probe at or above its threshold, and training stops once a retained probe has stayed below for
    ``retain_patience`` evaluations in a row (default 2; ``None``: never stop).

    ``scheduler``: a Chebyshev schedule by name ("chebyshev", "chebyshev_full", "chebyshev_steps",
    "chebyshev_fractal"; options in ``scheduler_options``) or a callable ``(optimizer, num_training_steps)`` returning
    a ``LambdaLR``; ``None`` keeps ``lr_scheduler_type``. Warmup (``warmup_steps``) applies to every schedule.

    ``distill``: a :class:`DistillConfig` (or its fields as a dict, or True for the defaults) makes the trainer a
    :class:`DistillSFTTrainer`: knowledge distillation from the adapter-disabled model is added to the loss, against
    forgetting.
    """
    o = config_from(LlmftSFTConfig, "build_trainer", config, options)
    kind = _check_dataset(train_dataset, "train_dataset")
    if eval_dataset is not None and _check_dataset(eval_dataset, "eval_dataset") != kind:
        raise DataError(f"eval_dataset: must have the same '{kind}' column as train_dataset, "
                        f"got {eval_dataset.column_names}")
    responses_only = o.responses_only
    if responses_only is None:
        responses_only = kind in ("messages", PROMPT_COMPLETION) or o.response_part is not None
    if responses_only and kind == "text" and o.response_part is None:
        raise ValueError("build_trainer(responses_only=True) on 'text' data needs instruction_part and response_part "
                         "(for the Alpaca prompt: '### Instruction:\\n' and '### Response:\\n')")
    if kind == PROMPT_COMPLETION and o.response_part is not None:
        raise ValueError("build_trainer: prompt/completion rows need no instruction_part/response_part: the "
                         "completion is the response (the loss is on it alone unless responses_only=False)")
    max_seq_length = o.max_length or o.max_seq_length or getattr(model, "max_seq_length", None) or 2048

    eval_dataset, reports = _prepare("build_trainer", tokenizer, train_dataset, eval_dataset, max_length=max_seq_length,
                                     eval_max_samples=o.eval_max_samples, seed=o.seed, verbose=verbose)
    build = {"max_length": max_seq_length}
    if kind == PROMPT_COMPLETION:  # TRL tokenizes the prompt alone and masks it (completion_only_loss)
        if o.completion_only_loss is None:
            build["completion_only_loss"] = responses_only
        if responses_only:
            reports["train_masking"] = completion_report(train_dataset, tokenizer, max_length=max_seq_length,
                                                         name="train_dataset")
            if eval_dataset is not None:
                reports["eval_masking"] = completion_report(eval_dataset, tokenizer, max_length=max_seq_length,
                                                            name="eval_dataset")
    elif responses_only or kind == "messages":  # tokenized here: content as data, loss by offsets (llmft.masking)
        parts = dict(instruction_part=o.instruction_part, response_part=o.response_part, max_length=max_seq_length,
                     responses_only=responses_only)
        train_dataset, reports["train_masking"] = mask_responses(train_dataset, tokenizer, name="train_dataset",
                                                                 **parts)
        if eval_dataset is not None:
            eval_dataset, reports["eval_masking"] = mask_responses(eval_dataset, tokenizer, name="eval_dataset",
                                                                   **parts)
    args = o.for_run(len(train_dataset), eval_dataset is not None, **build)
    trainer_class, extra = LlmftSFTTrainer, {}
    if o.distill is not None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("build_trainer(distill=...): the teacher is the model with its LoRA adapter disabled, so "
                             "the model needs LoRA (llmft.load_model with lora_r set)")
        trainer_class, extra = DistillSFTTrainer, {"distill": args.distill}
    trainer = trainer_class(model=model, processing_class=tokenizer, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, args=args, callbacks=list(callbacks or []), **extra)
    attach_training_control(trainer, args.control())
    for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        report = reports.get(f"{split}_masking")
        if report is not None:
            report.dropped_by_trainer = report.rows - len(dataset)
            say(report, verbose or bool(report.dropped_by_trainer))
    trainer.llmft_reports, trainer.llmft_options = reports, trainer.args
    trainer.args.save(kind="build_trainer")
    return trainer


_keyword_signature(build_trainer, SFTRunConfig, "sft_config")
build_sft_trainer = build_trainer  # the same function, named as build_dpo_trainer is


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


class DistillSFTTrainer(LlmftSFTTrainer):
    """SFT plus knowledge distillation against forgetting (CodeMMLU report): loss = CE + ``distill.weight`` x KL(teacher
    || student) on response tokens, the teacher being the model with its LoRA adapter disabled (no second model).

    ``DistillSFTTrainer(..., distill=DistillConfig(...))``; the model needs a LoRA adapter. TRL's own loss goes through
    a fused LM-head kernel that never materialises the logits, so :meth:`compute_loss` computes the cross-entropy
    itself from one student forward pass, on response positions only (a T4 cannot hold fp32 logits of every position
    of a 128k vocabulary), and runs one more forward pass with the adapter disabled for the teacher. The KL term is
    logged as ``kd_loss`` (``eval_kd_loss`` in evaluation) through :meth:`log`.
    """

    def __init__(self, *args, distill: DistillConfig | dict | bool | None = True, **kwargs):
        self.distill = DistillConfig.coerce(distill) or DistillConfig(weight=0.0)
        self._kd_logged = {"train": [], "eval": []}
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch
        import torch.nn.functional as F

        config = self.distill
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
        # Under DDP that count is every process's (transformers gathers it) while DDP averages the gradients over
        # the processes: Trainer.compute_loss multiplies by the process count then, and so does this one.
        scale = 1
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            scale = self.accelerator.num_processes
        loss = ce / count * scale
        if config.weight > 0:
            peft_model = self.accelerator.unwrap_model(model)
            with torch.no_grad(), peft_model.disable_adapter():
                teacher_logits = peft_model(**forward).logits
            kd_sum = kd_loss(outputs.logits, teacher_logits, labels, config.temperature,
                             config.only_where_teacher_right, reduction="sum")
            loss = loss + config.weight * kd_sum / count * scale
            # Averaged over the micro-batches since the last log in log(): scaled so that average is the window's KL
            # per response token (the same normalisation as the logged loss).
            steps = 1
            if num_items_in_batch is not None and model.training:
                steps = getattr(self, "current_gradient_accumulation_steps", None) or 1
            self._kd_logged["train" if model.training else "eval"].append(
                float(kd_sum.detach() / count) * steps * scale)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the mean ``kd_loss`` since the last log (``eval_kd_loss`` for an evaluation, so it is among the metrics
        ``evaluate`` returns and callbacks see), then logs as usual. Under DDP each process holds its own share: the
        logged value is their mean, as for transformers' loss."""
        import torch

        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        values = self._kd_logged[mode]
        if values:
            value = sum(values) / len(values)
            if self.args.world_size > 1:  # every process logs here, with as many values: a symmetric all-gather
                value = self.accelerator.gather(torch.tensor([value], device=self.args.device)).mean().item()
            logs["eval_kd_loss" if mode == "eval" else "kd_loss"] = value  # in place: evaluate() passes its metrics
            values.clear()
        return super().log(logs, *args, **kwargs)


def build_dpo_trainer(model, tokenizer, train_dataset, eval_dataset=None, *,
                      config: LlmftDPOConfig | DPORunConfig | dict | None = None,
                      callbacks: list | None = None, verbose: bool = True, **options):
    """Return a TRL ``DPOTrainer`` (an :class:`LlmftDPOTrainer`) for ``model`` (from :func:`llmft.load_model`, LoRA
    on) on preference pairs (``prompt``/``chosen``/``rejected``; see :func:`llmft.data.orca_to_dpo` and
    :func:`llmft.data.preference_pairs`).

    The reference policy costs no second model: TRL copies the model's LoRA adapter into a frozen ``ref`` adapter when
    the trainer is built and computes reference log-probabilities through it. From a fresh LoRA (B = 0) that reference
    *is* the base model with its adapter disabled; from SFT adapters (``load_model("<sft adapters>")``) it is the SFT
    model, as DPO intends.

    Every keyword is a field of :class:`llmft.trl_configs.LlmftDPOConfig`: llmft's own, of
    :class:`llmft.configs.DPORunConfig` (defaults and help there), or any other ``trl.DPOConfig`` field; ``config=``
    takes a whole ``LlmftDPOConfig`` (or ``DPORunConfig``, or a dict). The config made is the trainer's ``args``.
    Defaults as :func:`build_trainer` (precision from the
    hardware, 8-bit AdamW on a GPU, batch 2 x 4, ``max_grad_norm=1.0``, bounded eval subset, checkpoints for
    :func:`train` to resume, the same training control and schedules) with DPO's own: ``beta=0.1``,
    ``learning_rate=5e-6`` (DPO wants far smaller steps than SFT), no weight decay, ``max_length`` = the model's
    ``max_seq_length``. ``metric`` may be any DPO eval metric, e.g. ``"eval_rewards/accuracies"`` or
    ``"eval_rewards/margins"`` (higher is better, inferred from the name). Live probes and the retention guard
    (``probes``, ``retain``, ``retain_patience``) work as in :func:`build_trainer`.

    Pairs are conversational (message lists, chat template applied by TRL) or plain text (strings, trained as they are,
    without the chat template). Before the model is touched, an empty dataset, rows mixing the two forms and pairs
    carrying no preference (empty answer, chosen == rejected: the check of :func:`llmft.data.preference_pairs`) are
    refused by row. Built again on the same model (a re-run cell), the trainer keeps the frozen ``ref`` adapter of the
    first build as the reference (see :class:`LlmftDPOTrainer`).
    """
    o = config_from(LlmftDPOConfig, "build_dpo_trainer", config, options)
    forms = []
    for argument, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is None:
            continue
        if not set(PREFERENCE_COLUMNS) <= set(dataset.column_names):
            hint = (" Convert Intel/orca_dpo_pairs rows with llmft.data.orca_to_dpo." if "question" in
                    dataset.column_names else " Use llmft.data.preference_pairs to check and convert them.")
            raise DataError(f"{argument}: DPO needs prompt, chosen and rejected columns, got {dataset.column_names}."
                            + hint)
        forms.append(check_preference_rows(dataset, argument))
    if len(set(forms)) > 1:
        raise DataError(f"train_dataset is {forms[0]} and eval_dataset {forms[1]}; give both in one form "
                        "(llmft.data.preference_pairs converts string rows to chat turns)")
    if forms[0] == "text":
        say("build_dpo_trainer: plain-text pairs: prompt + answer are trained as they are, without the chat template "
            "(llmft.data.preference_pairs makes them chat turns)", verbose)
    if not hasattr(model, "peft_config"):
        raise ValueError("build_dpo_trainer: the model has no LoRA adapter; load it with llmft.load_model (lora_r "
                         "set, the default) so the reference is an adapter copy instead of a second model")
    max_length = o.max_length or getattr(model, "max_seq_length", None) or 1024
    eval_dataset, reports = _prepare("build_dpo_trainer", tokenizer, train_dataset, eval_dataset,
                                     max_length=max_length, eval_max_samples=o.eval_max_samples, seed=o.seed,
                                     verbose=verbose)
    args = o.for_run(len(train_dataset), eval_dataset is not None, max_length=max_length)
    trainer = LlmftDPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                              train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=list(callbacks or []))
    attach_training_control(trainer, args.control())
    trainer.llmft_reports, trainer.llmft_options = reports, trainer.args
    trainer.args.save(kind="build_dpo_trainer")
    return trainer


_keyword_signature(build_dpo_trainer, DPORunConfig, "dpo_config")


class RunningTotals(TrainerCallback):
    """Resume the running totals that transformers and TRL keep only in memory, from the resumed checkpoint's
    ``trainer_state.json`` (its ``log_history``, which transformers saves and restores):

    - the loss sum behind ``train_loss`` (``TrainOutput.training_loss`` and the end-of-run log): transformers restarts
      it at 0 in every ``train()`` call and divides by all steps, so a run resumed at half-way reported about half its
      loss; it is the sum over the logged losses, each a mean over the steps since the log before it;
    - TRL's token count (``num_tokens`` in the train logs, ``eval_num_tokens`` in the evaluations), which restarted
      at 0: its last logged value.

    Both are exact when a log falls on the checkpoint's step, so a log is requested at every save (with
    ``logging_steps=1``, llmft's default, there is one anyway). Under DDP the logged values are gathered, the same in
    every process. ``trainer``: the trainer this callback is added to (:func:`attach_training_control` does)."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)  # the trainer holds its callbacks: no cycle

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    on_epoch_end = on_step_end

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is None or not state.global_step:
            return
        loss_sum, previous, tokens = 0.0, 0, None
        for entry in state.log_history:  # the checkpoint's, in order; restored with the trainer state
            step = int(entry.get("step", 0))
            if "loss" in entry and step <= state.global_step:
                loss_sum += float(entry["loss"]) * (step - previous)
                previous = step
                tokens = entry.get("num_tokens", tokens)
        # transformers zeroes these just before on_train_begin (Trainer._inner_training_loop): add what came before
        if hasattr(trainer, "_total_loss_scalar"):
            trainer._total_loss_scalar += loss_sum
        if tokens is not None and hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = type(trainer._total_train_tokens)(tokens)


def attach_training_control(trainer, config: TrainingControlConfig | None = None, **options):
    """Add llmft's training control to any transformers/TRL trainer (SFT, DPO, ...): metrics CSV, best checkpoint
    and early stopping (only when the trainer evaluates), the non-finite-loss guard, an optional weight-decay ramp,
    an optional custom LR schedule, and live probes with a retention guard (``probes``, ``retain``,
    ``retain_patience``). Options: a :class:`~llmft.configs.TrainingControlConfig` and/or its fields as
    keywords (``metric=``, ``early_stopping_patience=``, ...). Returns the trainer.

    A ``scheduler`` needs a trainer built on :class:`TrainerMixin` (what :func:`build_trainer` and
    :func:`build_dpo_trainer` return), whose ``create_scheduler`` uses it."""
    c = options_from(TrainingControlConfig, "attach_training_control", options, base=config)
    out = Path(trainer.args.output_dir)
    evaluates = (trainer.eval_dataset is not None
                 and str(trainer.args.eval_strategy) not in ("no", "IntervalStrategy.NO"))
    if c.scheduler is not None:
        if not isinstance(trainer, TrainerMixin):
            raise TypeError(f"attach_training_control(scheduler={c.scheduler!r}): {type(trainer).__name__} has no "
                            "schedule hook; build it with llmft.build_trainer / build_dpo_trainer, or use a class "
                            "deriving from llmft.trainers.TrainerMixin")
        trainer.lr_schedule = resolve_schedule(c.scheduler, **(c.scheduler_options or {}))
    prober = _probe_callback(trainer, c.probes, c.retain, evaluates)
    if prober is not None:  # first of all: it adds eval_probe/* to the eval logs every later callback sees
        trainer.callback_handler.callbacks.insert(0, prober)
    if c.weight_decay_ramp is not None:  # before the logger, so the logged row carries the weight decay in use
        trainer.add_callback(cb.WeightDecayRamp(*c.weight_decay_ramp))
    if c.metrics_csv:
        trainer.add_callback(cb.MetricsLogger(out / "metrics.csv", tensorboard=c.tensorboard))
    if evaluates and c.keep_best:
        trainer.add_callback(cb.BestCheckpoint(str(out / "best"), c.metric, c.greater_is_better, keep=c.keep_best,
                                               retain=c.retain))
    if evaluates and c.early_stopping_patience:
        trainer.add_callback(cb.EarlyStopping(c.early_stopping_patience, c.metric, c.greater_is_better,
                                              c.early_stopping_min_delta))
    if c.retain and c.retain_patience:
        trainer.add_callback(cb.RetentionGuard(c.retain, c.retain_patience))
    trainer.add_callback(cb.NonFiniteLossGuard())
    trainer.add_callback(cb.KeepAdapterDtype(trainer.model))
    trainer.add_callback(RunningTotals(trainer))
    trainer.args.restore_callback_states_from_checkpoint = True
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


_indexed_cpu_registered = False


def _restore_on_indexed_cpu(storage, location: str):
    return storage if location.startswith("cpu:") and location[4:].isdigit() else None


def _allow_indexed_cpu_map_location() -> None:
    """Several processes on CPUs only (gloo): accelerate gives each the device ``cpu:0``, transformers' resume passes
    ``map_location=args.device`` to ``torch.load`` for the optimizer state when ``world_size > 1``, and torch knows no
    ``cpu:0`` location ("don't know how to restore data location ... (tagged with cpu:0)"). A deserializer registered
    through torch's public ``torch.serialization.register_package`` keeps such storages on the CPU. (On GPUs the
    location is ``cuda:N``, which torch restores.)"""
    global _indexed_cpu_registered
    if not _indexed_cpu_registered:
        import torch.serialization

        torch.serialization.register_package(11, lambda storage: None, _restore_on_indexed_cpu)
        _indexed_cpu_registered = True


def _load_root_adapter(trainer, checkpoint: str) -> None:
    """Resuming a PEFT model with several adapters, transformers (``Trainer._load_from_checkpoint``) loads only the
    adapters in the checkpoint's subdirectories; PEFT saves the one named ``default`` at the checkpoint's root. With
    TRL's DPO reference copy (``ref/``) the trained policy would restart from its initialisation while the optimizer,
    schedule and step resume (measured: the DPO loss back at ln 2 on the first resumed step). Load it with PEFT's
    ``load_adapter``, as transformers does when there is a single adapter."""
    from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

    def saved(folder: Path) -> bool:
        return any((folder / name).exists() for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME))

    root, model = Path(checkpoint), trainer.model
    if ("default" in getattr(model, "peft_config", {}) and saved(root)
            and any(saved(child) for child in root.iterdir() if child.is_dir())):
        model.load_adapter(str(root), "default", is_trainable=True)


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer reports a failed write (a full disk among them) without the errno: "[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598", "basic_ios::clear: iostream error" (both seen on a full tmpfs).
TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "iostream error")


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _checkpoint_bytes(trainer, output_dir: Path) -> int:
    """About what one checkpoint takes: the newest complete one's size, else the trainable weights in their dtype
    plus AdamW's two float32 moments per weight."""
    newest = latest_checkpoint(output_dir, verbose=False)
    if newest:
        return _folder_bytes(Path(newest))
    return sum(p.numel() * (p.element_size() + 8) for p in trainer.model.parameters() if p.requires_grad)


def _no_space_error(trainer, exc: BaseException) -> OSError | None:
    """When ``exc`` comes from a full disk (an ENOSPC/EDQUOT anywhere in its chain, safetensors' "No space left on
    device (os error 28)", or torch's failed zip write with less free space than a checkpoint takes), the error to
    raise instead: where, how much is free, how much a checkpoint needs, what to do. A checkpoint left incomplete by
    the failure is removed (it cannot be resumed from and holds the space the next save needs)."""
    import shutil

    out = Path(trainer.args.output_dir)
    texts = [str(e) for e in _causes(exc)]
    full = any(isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS for e in _causes(exc)) or any(
        "No space left on device" in t or "os error 28" in t or "Disk quota exceeded" in t for t in texts)
    torch_write = any(marker in t for t in texts for marker in TORCH_WRITE_FAILED)
    if not (full or torch_write) or not out.is_dir():
        return None
    need = _checkpoint_bytes(trainer, out)
    if not full and shutil.disk_usage(out).free >= need:
        return None  # a failed write with room to spare: not a full disk, leave the error as it is
    step = trainer.state.global_step
    partial, removed = out / f"checkpoint-{step}", ""
    if partial.is_dir() and checkpoint_problem(partial) and is_main_process(trainer.args):
        shutil.rmtree(partial, ignore_errors=True)
        removed = f"; the incomplete {partial.name} it was writing was removed"
    free = shutil.disk_usage(out).free
    newest = latest_checkpoint(out, verbose=False)
    then = f"resumes from {Path(newest).name}" if newest else "starts from the beginning (no complete checkpoint)"
    return OSError(errno.ENOSPC, f"no space left on {out}: {free / 1e6:.1f} MB free, a checkpoint needs about "
                                 f"{need / 1e6:.1f} MB. Training stopped at step {step}{removed}; metrics.csv and the "
                                 "complete checkpoints are intact. Free some space (older runs' folders, a lower "
                                 "save_total_limit) or give an output_dir on a larger disk, then run llmft.train again: "
                                 f"in the same output_dir it {then}.")


def resume_checkpoint(output_dir, resume, caller: str = "llmft.train(resume") -> str | None:
    """The checkpoint a run resumes from: ``"auto"`` the newest complete one in ``output_dir`` or None; ``True`` the
    newest complete one (an error when there is none); a path that checkpoint, refused (naming the broken file) when a
    kill or a full disk left it incomplete; ``False``/``None``: None (start fresh). ``caller`` (e.g.
    ``"llmft.train(resume"``) names the argument in the errors."""
    if resume is None or resume is False:
        return None
    if resume in ("auto", True):
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None and resume is True:
            raise FileNotFoundError(f"{caller}=True): no complete checkpoint-* in {output_dir}; use 'auto' to start "
                                    "fresh when there is none")
        return checkpoint
    if not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"{caller}={resume!r}): give 'auto', True, False/None or a checkpoint folder")
    checkpoint = str(resume)
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"{caller}={checkpoint!r}): no such checkpoint folder")
    problem = checkpoint_problem(checkpoint)
    if problem:
        newest = latest_checkpoint(Path(checkpoint).parent, verbose=False)
        hint = (f"resume from {newest} (the newest complete one)" if newest and newest != checkpoint
                else "start fresh with False")
        raise FileNotFoundError(f"{caller}={checkpoint!r}): not a complete checkpoint: {problem}; {hint}, or 'auto' "
                                "to take the newest complete one")
    return checkpoint


def _train_from(trainer, checkpoint: str | None, run, who: str):
    """Run ``run(checkpoint)`` (a trainer's own ``train``) after what a resume needs beyond transformers' own: the
    DPO policy adapter at the checkpoint's root (:func:`_load_root_adapter`), CPU storages tagged ``cpu:N`` under
    several processes; a full disk becomes the ``OSError`` of :func:`_no_space_error`."""
    if checkpoint:
        say(f"{who}: resuming from {checkpoint}")
        _load_root_adapter(trainer, checkpoint)
        if trainer.args.world_size > 1 and trainer.args.device.type == "cpu":
            _allow_indexed_cpu_map_location()
    try:
        return run(checkpoint)
    except Exception as exc:
        no_space = _no_space_error(trainer, exc)
        if no_space is None:
            raise
        raise no_space from exc


def train(trainer, resume: bool | str | None = "auto"):
    """Train, resuming after a disconnect: ``resume="auto"`` continues from the newest complete checkpoint in the
    trainer's ``output_dir`` when there is one (optimizer, scheduler, RNG, callback state and the metrics CSV all carry
    over) and starts fresh otherwise; ``True`` requires a checkpoint; a path resumes from that checkpoint;
    ``False``/``None`` always starts fresh. Under torchrun every process resumes from the same checkpoint (its own RNG
    state included).

    On llmft's trainers this is ``trainer.train(resume_from_checkpoint=resume)`` (:meth:`TrainerMixin.train`, the
    same resume in TRL's spelling); other transformers trainers get the same checks and fixes here.

    A checkpoint a kill or a full disk left incomplete (see :func:`checkpoint_problem`) is skipped with a warning naming
    it and why; a path to one is refused, naming the file. The ``train_loss`` returned and logged, and TRL's token
    counts, are the whole run's (:class:`RunningTotals`). A full disk stops training with an ``OSError`` (ENOSPC)
    saying where, how much is free and about how much a checkpoint needs, and removes the checkpoint it left
    half-written."""
    if isinstance(trainer, TrainerMixin):
        return trainer._train_resuming(resume, "llmft.train(resume", "llmft.train")
    checkpoint = resume_checkpoint(trainer.args.output_dir, resume)
    return _train_from(trainer, checkpoint, lambda c: trainer.train(resume_from_checkpoint=c), "llmft.train")
