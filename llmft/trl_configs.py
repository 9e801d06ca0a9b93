"""The trainers' configs: TRL's ``SFTConfig`` / ``DPOConfig`` with llmft's fields, one object from the keywords to
the checkpoints.

As TRL's ``SFTConfig`` subclasses transformers' ``TrainingArguments`` and changes some of its defaults,
:class:`LlmftSFTConfig` subclasses ``trl.SFTConfig`` with the fields of :class:`llmft.configs.SFTRunConfig` (T4
defaults, training control, probes, retention, distillation; written there once, with their help, importable without
torch) and :class:`LlmftDPOConfig` ``trl.DPOConfig`` with :class:`llmft.configs.DPORunConfig`'s. llmft's checks run
first (a bad value is a :class:`~llmft.configs.ConfigError` naming the field; numbers written as strings are numbers),
then TRL's and transformers'.

What ``None`` leaves to the hardware is filled in when the config is made (precision, optimizer, evaluation batch,
data seed); what it leaves to the data when the trainer is built (:meth:`LlmftTRLConfig.for_run`: evaluation only
with an eval set, every tenth of the run, a checkpoint at each). The object :func:`llmft.build_trainer` makes is the
trainer's ``args`` and ``llmft_options``, and what ``output_dir/llmft_config.json`` records.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

from llmft._unsloth import import_unsloth

import_unsloth()  # TRL after Unsloth, which patches it

from trl import DPOConfig, SFTConfig  # noqa: E402

from llmft.configs import (  # noqa: E402
    DPORunConfig, SFTRunConfig, check_names, field_names, jsonable, save_config,
)
from llmft.models import pick_dtype  # noqa: E402

# llmft's fields that may hold live objects (a scheduler callable or lambda, a ProbeCallback holding the tokenizer):
# described, not pickled, in the copy transformers saves in every checkpoint (training_args.bin).
RUNTIME_FIELDS = ("scheduler", "probes")
# Left to the data while None: the builder sets them (for_run); TRL validates these stand-ins until then.
_DATA_STAND_INS = {"eval_strategy": "no", "save_steps": 500}


def precision_flags() -> dict:
    """``{"fp16": ..., "bf16": ...}`` for TRL's config, from the one precision policy, :func:`llmft.models.pick_dtype`
    (bf16 on Ampere+, fp16 on a T4, neither on a CPU, where Unsloth's CPU mode picks the dtype)."""
    import torch

    dtype = pick_dtype()
    return {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}


def default_optim() -> str:
    """8-bit AdamW (bitsandbytes) on a GPU saves ~75% of optimizer memory; plain AdamW on a CPU."""
    import torch

    return "adamw_8bit" if torch.cuda.is_available() else "adamw_torch"


def planned_steps(n_rows: int, batch: int, accumulation: int, epochs: float, max_steps: int) -> int:
    if max_steps and max_steps > 0:
        return max_steps
    return max(1, math.ceil(math.ceil(n_rows / batch) / accumulation * epochs))


class LlmftTRLConfig:
    """What llmft adds to a TRL config class (mixed in before it, after llmft's light fields)."""

    llmft_fields: type  # the light dataclass of llmft's fields (llmft.configs)
    trl_class: type  # the TRL config class

    def __post_init__(self):
        self._check_llmft()  # llmft's checks and number conversion first: they name the field
        hardware = {"optim": default_optim, "data_seed": lambda: self.seed,
                    "per_device_eval_batch_size": lambda: self.per_device_train_batch_size}
        resolved = [name for name in (*hardware, "fp16", "bf16") if getattr(self, name) is None]
        flags = precision_flags() if {"fp16", "bf16"} & set(resolved) else {}
        for name in resolved:
            setattr(self, name, flags[name] if name in flags else hardware[name]())
        self._llmft_resolved = frozenset(resolved)  # given again as None when the config is remade
        pending = [name for name in _DATA_STAND_INS if getattr(self, name) is None]
        for name in pending:
            setattr(self, name, _DATA_STAND_INS[name])
        self.trl_class.__post_init__(self)
        for name in pending:
            setattr(self, name, None)

    def given(self) -> dict:
        """The values this config was made from (what it computed itself given back as None), to remake it."""
        resolved = getattr(self, "_llmft_resolved", frozenset())
        return {f.name: None if f.name in resolved else getattr(self, f.name)
                for f in dataclasses.fields(self) if f.init}

    def for_run(self, n_train: int, has_eval: bool, **changes):
        """A copy with what ``None`` leaves to the data set: with an eval set ``eval_strategy="steps"``, every
        ``eval_steps`` (a tenth of the planned run), else none; a checkpoint at every evaluation (``save_steps``);
        ``changes``: more fields the builder sets."""
        steps = planned_steps(n_train, self.per_device_train_batch_size, self.gradient_accumulation_steps,
                              self.num_train_epochs, self.max_steps)
        eval_steps = self.eval_steps if self.eval_steps is not None else max(1, steps // 10)
        data = {"eval_steps": eval_steps}
        if self.eval_strategy is None:
            data["eval_strategy"] = "steps" if has_eval else "no"
        if self.save_steps is None:
            data["save_steps"] = eval_steps
        run = type(self)(**{**self.given(), **data, **changes})
        # what was left to the data (or the model) is left to them again when this config is passed back in
        run._llmft_resolved |= {name for name in {**data, **changes} if getattr(self, name) is None}
        return run

    def trl_dict(self) -> dict:
        """TRL's and transformers' fields of this config, JSON-ready."""
        ours = set(field_names(self.llmft_fields))
        return {k: v for k, v in self.to_dict().items() if k not in ours}

    def save(self, kind: str) -> None:
        """Write ``output_dir/llmft_config.json``: llmft's fields under "options", TRL's under "trl"."""
        save_config(self.output_dir, self, self.trl_dict(), kind=kind, fields=field_names(self.llmft_fields))

    def to_dict(self) -> dict:
        """transformers' JSON form (integrations log it), with llmft's objects (probes, a schedule callable,
        :class:`~llmft.configs.DistillConfig`) as data or names."""
        d = self.trl_class.to_dict(self)
        d.update({name: jsonable(getattr(self, name)) for name in field_names(self.llmft_fields)})
        return d

    def __str__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(self.to_dict().items()))})"

    __repr__ = __str__

    def __getstate__(self):
        """Pickled (transformers saves ``args`` in every checkpoint) with llmft's live objects as their
        descriptions: a lambda cannot be pickled, and probes hold the tokenizer."""
        state = dict(self.__dict__)
        for name in RUNTIME_FIELDS:
            if state.get(name) is not None and not isinstance(state[name], str):
                state[name] = jsonable(state[name])
        return state

    def __deepcopy__(self, memo):
        """A deep copy that shares llmft's live objects (probes, a schedule) instead of copying them."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = value if name in RUNTIME_FIELDS else copy.deepcopy(value, memo)
        return new


@dataclass(repr=False)
class LlmftSFTConfig(LlmftTRLConfig, SFTRunConfig, SFTConfig):
    """``trl.SFTConfig`` with llmft's fields and T4 defaults (:class:`llmft.configs.SFTRunConfig`): the ``args`` of
    the trainers :func:`llmft.build_trainer` returns."""

    llmft_fields = SFTRunConfig
    trl_class = SFTConfig


@dataclass(repr=False)
class LlmftDPOConfig(LlmftTRLConfig, DPORunConfig, DPOConfig):
    """``trl.DPOConfig`` with llmft's fields and DPO defaults (:class:`llmft.configs.DPORunConfig`): the ``args`` of
    the trainers :func:`llmft.build_dpo_trainer` returns."""

    llmft_fields = DPORunConfig
    trl_class = DPOConfig


def config_from(config_cls, builder: str, config=None, options: dict | None = None):
    """A ``config_cls`` (:class:`LlmftSFTConfig` or :class:`LlmftDPOConfig`) from ``config`` (an instance of it, of
    its light half such as :class:`llmft.configs.SFTRunConfig`, or a dict of fields; a recipe's section) overridden
    by the keywords ``options``; misspelt names are refused with the closest one suggested."""
    options = dict(options or {})
    if isinstance(config, LlmftTRLConfig):
        base = config.given()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    else:
        base = dict(config or {})
        check_names(base, field_names(config_cls), builder, _hint(config_cls, builder))
    check_names(options, field_names(config_cls), builder, _hint(config_cls, builder))
    return config_cls(**{**base, **options})


def _hint(config_cls, builder: str) -> str:
    return (f"Options are {builder}'s own (llmft.configs.{config_cls.llmft_fields.__name__}) or "
            f"trl.{config_cls.trl_class.__name__} fields.")
