"""llmft: fine-tune LLMs on a free Colab/Kaggle T4 with Unsloth + TRL, and trust the result.

``import llmft`` is light: it imports no torch, Unsloth or transformers. Each public name below is loaded from its
module on first use (PEP 562), so ``python -m llmft --help``, ``llmft.kaggle`` and ``llmft.configs`` start in a
moment. What ``import llmft`` guarantees at once:

- Unsloth is imported before transformers, TRL and PEFT, whoever imports them first (it must patch them before they
  load; TRL 1.15 on a CPU even fails in SFT/DPO otherwise): see :func:`llmft._unsloth.unsloth_before_transformers`.
- On Kaggle's 2xT4, training is pinned to GPU 0 before torch starts, unless CUDA_VISIBLE_DEVICES is already set.
- In a worker started by torchrun, Linux is first asked to end the process when torchrun ends
  (:func:`llmft.environment.die_with_launcher`).
"""
from llmft.environment import die_with_launcher as _die_with_launcher

_die_with_launcher()  # a torchrun worker goes down with its launcher (torchrun gives each worker its own session)

from llmft._unsloth import pin_single_gpu_on_kaggle as _pin_single_gpu_on_kaggle  # noqa: E402
from llmft._unsloth import unsloth_before_transformers as _unsloth_before_transformers  # noqa: E402

_pin_single_gpu_on_kaggle()
_unsloth_before_transformers()

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "models": ("load_model", "save_adapters", "export_merged", "pick_dtype"),
    "export": ("export_gguf",),
    "runtime": ("output_dir", "previous_adapters", "preflight", "NoGPUError"),
    "recipes": ("torchrun_recipe",),
    "analysis": ("intruder_dimensions", "plot_intruders", "reduce_intruders", "repair_sweep"),
    "trainers": ("build_trainer", "build_sft_trainer", "build_dpo_trainer", "train", "attach_training_control", "DistillConfig",
                 "DistillSFTTrainer"),
    "configs": ("SFTOptions", "DPOOptions", "SFTRunConfig", "DPORunConfig", "TrainingControlConfig", "ModelConfig"),
    "trl_configs": ("LlmftSFTConfig", "LlmftDPOConfig"),
    "experiments": ("run_experiment",),
    "callbacks": ("MetricsLogger", "BestCheckpoint", "EarlyStopping", "NonFiniteLossGuard", "NonFiniteLossError",
                  "WeightDecayRamp", "ProbeCallback", "RetentionGuard"),
    "schedulers": ("chebyshev_schedule", "chebyshev_step_schedule"),
    "plots": ("plot_training", "plot_dpo", "plot_schedule", "load_metrics"),
    "generation": ("generate_response", "generate_batch"),
    "data": ("sharegpt_to_messages", "alpaca_to_text", "orca_to_dpo", "preference_pairs", "mcq_rows",
             "count_overlong", "DataError", "DataReport"),
    "templates": ("apply_chat_template", "format_alpaca", "format_mcq"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _HOME:
        value = getattr(importlib.import_module(f"llmft.{_HOME[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"llmft.{name}") is not None:
        value = importlib.import_module(f"llmft.{name}")  # a module, as notebooks use them: llmft.evaluation, ...
    else:
        raise AttributeError(f"module 'llmft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    import pkgutil

    return sorted(set(globals()) | set(__all__) | {info.name for info in pkgutil.iter_modules(__path__)})
