"""llmft: fine-tune LLMs on a free Colab/Kaggle T4 with Unsloth + TRL, and trust the result.

Importing llmft imports Unsloth first (it must patch transformers/TRL/PEFT before they load) and, on Kaggle's
2xT4, pins training to GPU 0 unless CUDA_VISIBLE_DEVICES is already set. In a worker started by torchrun it first asks
Linux to end the process when torchrun ends (:func:`llmft.runtime.die_with_launcher`).
"""
from llmft.runtime import die_with_launcher as _die_with_launcher

_die_with_launcher()  # a torchrun worker goes down with its launcher (torchrun gives each worker its own session)

from llmft._unsloth import import_unsloth as _import_unsloth  # noqa: E402

_import_unsloth()  # before anything below imports trl/transformers

from llmft.callbacks import (  # noqa: E402
    BestCheckpoint, EarlyStopping, MetricsLogger, NonFiniteLossError, NonFiniteLossGuard, ProbeCallback,
    RetentionGuard, WeightDecayRamp,
)
from llmft.data import (  # noqa: E402
    DataError, DataReport, alpaca_to_text, count_overlong, mcq_rows, orca_to_dpo, preference_pairs,
    sharegpt_to_messages,
)
from llmft import analysis, evaluation, experiments, mcq, probes, recipes  # noqa: E402,F401  (modules)
from llmft.analysis import intruder_dimensions, plot_intruders, reduce_intruders, repair_sweep  # noqa: E402
from llmft.configs import DPOOptions, SFTOptions, TrainingControlConfig  # noqa: E402
from llmft.experiments import run_experiment  # noqa: E402
from llmft.generation import generate_batch, generate_response  # noqa: E402
from llmft.models import export_merged, load_model, pick_dtype, save_adapters  # noqa: E402
from llmft.runtime import NoGPUError, output_dir, preflight, torchrun_recipe  # noqa: E402
from llmft.plots import load_metrics, plot_dpo, plot_schedule, plot_training  # noqa: E402
from llmft.schedulers import chebyshev_schedule, chebyshev_step_schedule  # noqa: E402
from llmft.templates import apply_chat_template, format_alpaca, format_mcq  # noqa: E402
from llmft.trainers import (  # noqa: E402
    DistillConfig, DistillSFTTrainer, attach_training_control, build_dpo_trainer, build_trainer, train,
)

__version__ = "0.1.0"
__all__ = [
    "load_model", "save_adapters", "export_merged", "pick_dtype",
    "output_dir", "preflight", "NoGPUError", "torchrun_recipe",
    "intruder_dimensions", "plot_intruders", "reduce_intruders", "repair_sweep",
    "build_trainer", "build_dpo_trainer", "train", "attach_training_control", "DistillConfig", "DistillSFTTrainer",
    "SFTOptions", "DPOOptions", "TrainingControlConfig", "run_experiment",
    "MetricsLogger", "BestCheckpoint", "EarlyStopping", "NonFiniteLossGuard", "NonFiniteLossError", "WeightDecayRamp",
    "ProbeCallback", "RetentionGuard",
    "chebyshev_schedule", "chebyshev_step_schedule",
    "plot_training", "plot_dpo", "plot_schedule", "load_metrics",
    "generate_response", "generate_batch",
    "sharegpt_to_messages", "alpaca_to_text", "orca_to_dpo", "preference_pairs", "mcq_rows", "count_overlong",
    "DataError",
    "DataReport",
    "apply_chat_template", "format_alpaca", "format_mcq",
]
