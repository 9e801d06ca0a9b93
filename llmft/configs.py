"""Typed configs: every option of llmft's trainers, its T4 default and its meaning, written once.

As TRL's ``SFTConfig``: a dataclass per concept, each field with ``metadata={"help": ...}``.

- :class:`TrainingControlConfig`: metrics CSV, best checkpoint, early stopping, weight-decay ramp, LR schedule
  (:func:`llmft.attach_training_control`);
- :class:`SFTRunConfig` / :class:`DPORunConfig` (first named ``SFTOptions`` / ``DPOOptions``, still aliases): llmft's
  fields of a run (the control fields included), with their own defaults where SFT and DPO differ. The trainers'
  config, :class:`llmft.trl_configs.LlmftSFTConfig` / ``LlmftDPOConfig``, is TRL's ``SFTConfig`` / ``DPOConfig`` with
  these fields; kept here apart so they import without torch (``--help``, recipe checks, Kaggle tooling);
- :class:`DistillConfig`: knowledge distillation against forgetting (:class:`llmft.trainers.DistillSFTTrainer`);
- :class:`ModelConfig`: :func:`llmft.load_model`'s arguments (a recipe's ``model`` section), typed.

Options that are neither llmft's nor TRL's are refused with the closest name suggested (:func:`check_names`); values
that cannot work (a learning rate of "abc" or 0, a batch of 0, ``max_steps=-5``, an ``output_dir`` that is a file, ...)
are refused when the options are built, before any model loads, with a :class:`ConfigError` naming the option and the
fix (:func:`check_values`). Numbers written as strings, as PyYAML reads ``2e-4``, are taken as numbers. The builders
write the options they used to ``output_dir/llmft_config.json`` (:func:`save_config`), so every run
records its settings, and a recipe file (:mod:`llmft.recipes`) is these same fields in YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llmft.environment import DEFAULT_SEED

CONFIG_FILE = "llmft_config.json"
# All attention and MLP projections of Llama/Qwen/Mistral/Gemma-style blocks (the NTUA lab report's "QKV, O and MLP").
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _help(text: str, default: Any = None, **kwargs):
    if "default_factory" in kwargs:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text})


def check_names(given: Iterable[str], known: Iterable[str], where: str, hint: str) -> None:
    """Raise ``TypeError`` naming every name in ``given`` that is not in ``known``, with the closest known name."""
    known = sorted(set(known))
    unknown = [name for name in given if name not in known]
    if unknown:
        described = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"{where}: unknown option(s) {', '.join(described)}. {hint}")


def field_names(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


_NO_VALUE = object()


class ConfigError(ValueError):
    """An option whose value cannot work (or a config file that cannot be read): the message names the option (or
    file:line:column), the value and the fix, also kept as ``option``, ``value`` and ``fix``."""

    def __init__(self, option: str, value=_NO_VALUE, fix: str = ""):
        self.option, self.value, self.fix = option, value, fix
        super().__init__(f"{option}: {fix}" if value is _NO_VALUE else f"{option}={value!r}: {fix}")


_NUMBER_PARTS = {"int", "float", "None", "NoneType"}


def _number_type(annotation) -> type | None:
    """``float`` or ``int`` for a field annotated as a plain number (``float``, ``int | None``, ``Optional[float]``),
    else None (strings, containers, unions with ``str``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    parts = {part for part in re.split(r"[\s|,\[\]]+", text.replace("typing.", "").replace("Optional", "")) if part}
    if not parts or not parts <= _NUMBER_PARTS:
        return None
    return float if "float" in parts else int if "int" in parts else None


def number(option: str, value, kind: type = float, example=None):
    """``value`` as a finite ``kind`` (``float`` or ``int``). A numeric string is converted: PyYAML reads ``2e-4`` as
    the string "2e-4" (YAML 1.1 wants ``2.0e-4``). Anything else is a :class:`ConfigError` naming ``option``."""
    example = f"; e.g. {option}={example!r}" if example is not None else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(option, value, f"expected a number{example}")
    given = value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(option, given, f"not a number{example}") from None
    if not math.isfinite(value):
        raise ConfigError(option, given, f"expected a finite number{example}")
    if kind is int:
        if value != int(value):
            raise ConfigError(option, given, f"expected a whole number{example}")
        return int(value)
    return value  # a float field keeps an int as given (5 warmup steps stay 5)


def coerce_numbers(config, fields=None) -> None:
    """Convert, in place, the number fields of a dataclass instance (or of a dict, with ``fields`` the dataclass
    fields that type it) from numeric strings; refuse non-numbers with a :class:`ConfigError`. ``None`` is left
    alone."""
    is_dict = isinstance(config, dict)
    for f in fields if fields is not None else dataclasses.fields(config):
        kind = _number_type(f.type)
        if kind is None or (f.name not in config if is_dict else False):
            continue
        value = config[f.name] if is_dict else getattr(config, f.name)
        if value is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        value = number(f.name, value, kind, default)
        if is_dict:
            config[f.name] = value
        else:
            setattr(config, f.name, value)


def check_flags(config, prefix: str = "") -> None:
    """Refuse, naming the field, a non-boolean value in a dataclass field annotated ``bool`` (or ``bool | None``):
    ``load_in_4bit: "no"`` would be true."""
    for f in dataclasses.fields(config):
        text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        value = getattr(config, f.name)
        if text.replace(" ", "") in ("bool", "bool|None") and value is not None and not isinstance(value, bool):
            raise ConfigError(prefix + f.name, value, "expected true or false")


def check_values(options) -> None:
    """The checks of the options every run shares (:class:`SFTOptions`, :class:`DPOOptions`): each bad value is a
    :class:`ConfigError` naming the option and the fix. One home, so the checks can move with the options."""
    o = options
    if o.max_steps == 0 or o.max_steps < -1:
        raise ConfigError("max_steps", o.max_steps, "give a positive number of optimizer steps, or -1 to train for "
                                                    "num_train_epochs")
    if o.max_steps == -1 and o.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs", o.num_train_epochs,
                          "with max_steps=-1 the run lasts num_train_epochs: give a positive number (fractions "
                          "allowed, e.g. 0.2), or set max_steps")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(o, name) < 1:
            raise ConfigError(name, getattr(o, name), "must be at least 1")
    for name in ("eval_steps", "eval_max_samples"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise ConfigError(name, getattr(o, name), "must be at least 1, or None")
    if o.learning_rate <= 0:
        raise ConfigError("learning_rate", o.learning_rate,
                          "must be > 0 (LoRA SFT typically 2e-4, DPO 5e-6); to train nothing, do not train")
    for name in ("warmup_steps", "weight_decay"):
        if getattr(o, name) < 0:
            raise ConfigError(name, getattr(o, name), "must be >= 0")
    if o.output_dir and Path(o.output_dir).exists() and not Path(o.output_dir).is_dir():
        raise ConfigError("output_dir", o.output_dir, "is a file; checkpoints, metrics.csv and best/ go in a "
                                                      "directory: name a new or existing directory")


@dataclass
class ModelConfig:
    """A recipe's ``model`` section: :func:`llmft.load_model`'s arguments, typed, with their defaults (written here
    once; ``load_model`` takes them from this class) and help. Bad values are refused naming the field before anything
    loads."""

    name: str = field(metadata={"help": "Hub id, local model directory, a directory of saved LoRA adapters, or "
                                        "testing:tiny_model (recipes)."})
    max_seq_length: int = _help("Longest sequence in tokens the model is set up for (RoPE scaling beyond its own).",
                                2048)
    load_in_4bit: bool = _help("QLoRA: the frozen base in 4-bit NF4 (Dettmers et al. 2023); false: 16-bit.", True)
    dtype: Any = _help("Compute dtype (e.g. 'bfloat16'); None: bf16 on Ampere+, fp16 on a T4, float32 on a CPU.")
    lora_r: int | None = _help("LoRA rank (Hu et al. 2021); None: no adapter (a frozen model, for inference).", 16)
    lora_alpha: int | None = _help("LoRA scale numerator; None: lora_r (scale 1).")
    lora_dropout: float = _help("Dropout on the LoRA path (0 lets Unsloth use its fast kernels).", 0.0)
    target_modules: Any = _help("Modules that get adapters (a list of names, or PEFT's 'all-linear').",
                                DEFAULT_TARGET_MODULES)
    use_rslora: bool = _help("Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023).",
                             False)
    use_gradient_checkpointing: bool | str = _help("'unsloth' (offloaded, Unsloth's), true (transformers') or false.",
                                                   "unsloth")
    chat_template: str | None = _help("An Unsloth chat template name for the tokenizer (e.g. 'llama-3.1', 'chatml'); "
                                      "None: the tokenizer's own.")
    seed: int = _help("Seed of the LoRA initialisation.", DEFAULT_SEED)
    token: str | None = _help("Hub token for gated models; None: HF_TOKEN or the Colab/Kaggle secret.")
    allow_cpu: bool | None = _help("Load a hub model without a CUDA GPU; None: only in smoke mode or with "
                                   "LLMFT_ALLOW_CPU=1.")

    def __post_init__(self):
        coerce_numbers(self)
        check_flags(self)
        if not isinstance(self.name, (str, os.PathLike)):
            raise ConfigError("name", self.name, "a hub id or a local directory")
        if self.lora_r is not None and self.lora_r <= 0:
            raise ConfigError("lora_r", self.lora_r, "the LoRA rank must be positive, or None for no LoRA")
        if self.max_seq_length < 1:
            raise ConfigError("max_seq_length", self.max_seq_length, "must be at least 1")


@dataclass
class DistillConfig:
    """Knowledge distillation against forgetting (CodeMMLU report): the SFT loss plus ``weight`` x KL(teacher ||
    student) on response tokens, the teacher being the same model with its LoRA adapter disabled (the base model: no
    second model in memory)."""

    weight: float = _help("λ, the KL term's weight (0.3 kept 86% of the Fibonacci probe in `python -m llmft demo`).",
                          0.3)
    temperature: float = _help("Softens both distributions; the KL is scaled by T² so its gradient keeps its size.",
                               1.0)
    only_where_teacher_right: bool = _help(
        "The CodeMMLU report's variant: distil only on tokens the teacher predicts correctly.", False)

    def __post_init__(self):
        coerce_numbers(self)
        if self.weight < 0:
            raise ConfigError("distill.weight", self.weight,
                              "DistillConfig needs weight >= 0 (0.3 is a good start; 0: no KL term)")
        if self.temperature <= 0:
            raise ConfigError("distill.temperature", self.temperature,
                              "DistillConfig needs temperature > 0 (1.0: unsoftened)")

    @classmethod
    def coerce(cls, value) -> "DistillConfig | None":
        """``None``/``False`` → no distillation; ``True`` → the defaults; a dict → its fields (names checked)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            check_names(value, field_names(cls), "distill", f"DistillConfig fields are {field_names(cls)}.")
            return cls(**value)
        raise TypeError(f"distill={value!r}: use a DistillConfig, a dict of its fields, True or None")


@dataclass
class TrainingControlConfig:
    """What :func:`llmft.attach_training_control` adds to a trainer (see :mod:`llmft.callbacks`)."""

    metric: str = _help("Eval metric that picks the best checkpoint and drives early stopping, e.g. 'eval_loss' or "
                        "'eval_rewards/accuracies' for DPO.", "eval_loss")
    greater_is_better: bool | None = _help("Direction of `metric`; None infers it from the name (losses lower).")
    early_stopping_patience: int | None = _help("Stop after this many evaluations without improvement; None: off.", 3)
    early_stopping_min_delta: float = _help("Smallest change of `metric` that counts as an improvement.", 0.0)
    keep_best: int = _help("How many best adapters to keep in output_dir/best (best.json says which); 0: none.", 2)
    metrics_csv: bool = _help("Write output_dir/metrics.csv, one row per log/eval event (resume-safe).", True)
    tensorboard: bool = _help("Also write TensorBoard events next to the CSV.", False)
    weight_decay_ramp: tuple[float, float] | None = _help(
        "(start, end): weight decay rising linearly over training (CodeMMLU report); None: constant.")
    scheduler: Any = _help("LR schedule: 'chebyshev', 'chebyshev_full', 'chebyshev_steps', 'chebyshev_fractal' or a "
                           "callable (optimizer, num_training_steps) -> LambdaLR; None keeps lr_scheduler_type.")
    scheduler_options: dict | None = _help("Keyword options of `scheduler` (e.g. cos_coeffs, min_ratio).")
    probes: Any = _help("Live probes scored at every evaluation and reported as eval_probe/<name>: a list of "
                        "llmft.probes.Probe (e.g. [llmft.probes.fibonacci_probe()]) or an llmft.ProbeCallback (to "
                        "change its bounds: 32 items, 8 new tokens); None: off.")
    retain: dict | None = _help("Retention guard {probe name: threshold}, e.g. {'fibonacci': 0.9}: the best "
                                "checkpoint is chosen only among evaluations that keep every retained probe at or "
                                "above its threshold.")
    retain_patience: int | None = _help("Stop training once a retained probe has stayed below its threshold for this "
                                        "many evaluations in a row (2: one noisy dip does not stop a run); None: "
                                        "never stop.", 2)

    def __post_init__(self):
        coerce_numbers(self)
        if self.weight_decay_ramp is not None:
            self.weight_decay_ramp = tuple(self.weight_decay_ramp)
            if len(self.weight_decay_ramp) != 2:
                raise ConfigError("weight_decay_ramp", self.weight_decay_ramp, "give (start, end)")
            self.weight_decay_ramp = tuple(number("weight_decay_ramp", v) for v in self.weight_decay_ramp)

    def control(self) -> "TrainingControlConfig":
        """Only the control fields (of a subclass instance such as :class:`SFTOptions`)."""
        return TrainingControlConfig(**{name: getattr(self, name) for name in field_names(TrainingControlConfig)})


@dataclass
class _RunConfig:
    """The ``transformers.TrainingArguments`` fields whose defaults llmft changes for a T4 (as TRL's ``SFTConfig``
    changes some of transformers'), with what llmft adds to them. ``None`` marks what is computed when the trainer is
    built: from the hardware (precision, optimizer) or from the data (evaluation and checkpoint cadence)."""

    output_dir: str = _help("Checkpoints, metrics.csv, best/ and llmft_config.json go here.", "outputs")
    max_steps: int = _help("Optimizer steps; -1: run num_train_epochs.", -1)
    num_train_epochs: float = _help("Epochs when max_steps is -1 (fractions allowed, e.g. 0.2).", 1.0)
    per_device_train_batch_size: int = _help("Rows per micro-batch (a T4 holds 2 for a 3B model at 2k tokens).", 2)
    per_device_eval_batch_size: int | None = _help("Rows per evaluation batch; None: per_device_train_batch_size.")
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step: effective batch = batch x this.", 4)
    learning_rate: float = _help("Peak learning rate.", 2e-4)
    warmup_steps: float = _help("Linear warmup steps (a float < 1 is a fraction of the run); every schedule.", 5)
    lr_scheduler_type: str = _help("transformers' schedule name ('linear', 'cosine', ...) when scheduler is None.",
                                   "linear")
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    max_grad_norm: float = _help("Gradient clipping (the CodeMMLU report's 1.0).", 1.0)
    logging_steps: int = _help("Log (and write a metrics.csv row) every this many steps.", 1)
    eval_strategy: str | None = _help("'steps', 'epoch' or 'no'; None: 'steps' when the trainer gets an eval set, "
                                      "else 'no'.")
    eval_steps: int | None = _help("Evaluate and checkpoint every this many steps; None: a tenth of the run.")
    eval_max_samples: int | None = _help("Evaluate on a fixed random subset of at most this many rows; None: all.",
                                         200)
    save_steps: float | None = _help("Checkpoint every this many steps; None: eval_steps (a checkpoint at every "
                                     "evaluation).")
    save_total_limit: int | None = _help("Checkpoints kept for resuming (best/ is kept apart).", 2)
    optim: str | None = _help("Optimizer; None: 'adamw_8bit' on a GPU, 'adamw_torch' on a CPU.")
    fp16: bool | None = _help("fp16 mixed precision; None: from the hardware (on a T4, which has no bf16).")
    bf16: bool | None = _help("bf16 mixed precision; None: from the hardware (on Ampere and newer GPUs).")
    seed: int = _help("Random seed.", DEFAULT_SEED)
    data_seed: int | None = _help("Seed of the data order; None: seed.")
    report_to: str = _help("transformers' integrations ('none', 'tensorboard', 'wandb', ...).", "none")

    def __post_init__(self):
        self._check_llmft()

    def _check_llmft(self):
        """llmft's checks, run before TRL's own when this is part of a TRL config (:mod:`llmft.trl_configs`)."""
        coerce_numbers(self)
        check_flags(self)
        check_values(self)


@dataclass
class SFTRunConfig(TrainingControlConfig, _RunConfig):
    """llmft's fields of an SFT run (T4 defaults, training control, distillation): everything
    :func:`llmft.build_trainer` takes as keywords besides TRL's other ``SFTConfig`` fields. Light (no torch): the
    trainer's config, :class:`llmft.trl_configs.LlmftSFTConfig`, is ``trl.SFTConfig`` with these fields."""

    max_seq_length: int | None = _help("Longest row in tokens; None: the model's (from load_model).")
    max_length: int | None = _help("TRL's name of the same bound; None: max_seq_length.")
    responses_only: bool | None = _help("Loss on responses only; None: on for chat and prompt/completion data, and "
                                        "for text data when instruction_part and response_part are given.")
    instruction_part: str | None = _help("Text data: the marker before each instruction, e.g. '### Instruction:\\n'.")
    response_part: str | None = _help("Text data: the marker before each response, e.g. '### Response:\\n'.")
    distill: DistillConfig | None = _help("Knowledge distillation from the adapter-disabled model (a DistillConfig, "
                                          "its fields as a dict, or True for the defaults); None: off.")

    def __post_init__(self):
        self._check_llmft()

    def _check_llmft(self):
        TrainingControlConfig.__post_init__(self)
        _RunConfig._check_llmft(self)
        self.distill = DistillConfig.coerce(self.distill)
        if (self.instruction_part is None) != (self.response_part is None):
            raise ValueError("build_trainer: give both instruction_part and response_part, or neither")


@dataclass
class DPORunConfig(TrainingControlConfig, _RunConfig):
    """llmft's fields of a DPO run (Rafailov et al. 2023): DPO wants far smaller steps than SFT and no weight decay.
    Light (no torch): the trainer's config, :class:`llmft.trl_configs.LlmftDPOConfig`, is ``trl.DPOConfig`` with
    these fields."""

    output_dir: str = _help("Checkpoints, metrics.csv, best/ and llmft_config.json go here.", "outputs_dpo")
    learning_rate: float = _help("Peak learning rate (DPO wants far smaller steps than SFT).", 5e-6)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    beta: float = _help("DPO's β: how far the policy may move from the reference.", 0.1)
    max_length: int | None = _help("Longest prompt + response in tokens; None: the model's max_seq_length.")

    def __post_init__(self):
        self._check_llmft()

    def _check_llmft(self):
        TrainingControlConfig.__post_init__(self)
        _RunConfig._check_llmft(self)
        if self.beta <= 0:
            raise ConfigError("beta", self.beta, "DPO's beta must be > 0 (0.1 is usual; larger keeps the policy "
                                                 "closer to the reference)")


SFTOptions = SFTRunConfig  # the names notebooks and recipes used first
DPOOptions = DPORunConfig


def options_from(config_cls, builder: str, given: dict, base=None):
    """A ``config_cls`` instance from keyword options ``given`` over ``base`` (an instance or a dict of its fields);
    unknown names get a suggestion. (The trainers' configs, which add TRL's fields, are made by
    :func:`llmft.trl_configs.config_from`.)"""
    if isinstance(base, dict):  # a recipe's section: its names are checked like keywords
        given, base = {**base, **given}, None
    ours = set(field_names(config_cls))
    check_names(given, ours, builder, f"Options are {builder}'s own (llmft.configs.{config_cls.__name__}).")
    if isinstance(base, config_cls):
        base = {name: getattr(base, name) for name in ours}
    return config_cls(**{**(base or {}), **given})


def jsonable(value):
    """``value`` as JSON-ready data: dataclasses as dicts, callables and other objects as their names."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


def config_dict(options, trl_args: dict | None = None, kind: str | None = None, fields=None) -> dict:
    """The JSON-ready record of a run's settings: ``{"kind", "options", "trl"}``; ``fields``: the names of
    ``options`` recorded under "options" (default: all its fields)."""
    names = field_names(options) if fields is None else fields
    return {"kind": kind or type(options).__name__,
            "options": {name: jsonable(getattr(options, name)) for name in names}, "trl": jsonable(trl_args or {})}


def save_config(output_dir: str | os.PathLike, options, trl_args: dict | None = None, kind: str | None = None,
                fields=None) -> Path:
    """Write ``output_dir/llmft_config.json`` atomically (by the main process only under torchrun); returns its path."""
    from llmft.environment import is_main_process

    out = Path(output_dir)
    path = out / CONFIG_FILE
    if not is_main_process():
        return path
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config_dict(options, trl_args, kind, fields), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def help_table(config_cls) -> str:
    """``name (default): help`` for every field, one a line (for docs and ``--help``)."""
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else "…"
        lines.append(f"{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
