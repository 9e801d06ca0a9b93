"""Typed configs: one default per option (the dataclass), the builders' keywords are its fields, every run records
its settings, and the distillation trainer is a real module-level class."""
import dataclasses
import inspect
import json
import os
import pickle
import subprocess
import sys

import pytest

import llmft
from llmft import configs, trainers
from llmft.configs import DistillConfig, DPOOptions, SFTOptions, TrainingControlConfig

from conftest import REPO


@pytest.mark.parametrize("cls", [SFTOptions, DPOOptions, TrainingControlConfig, DistillConfig])
def test_every_field_is_documented(cls):
    for field in dataclasses.fields(cls):
        assert len(field.metadata.get("help", "")) > 10, f"{cls.__name__}.{field.name} has no help"


@pytest.mark.parametrize("builder,cls", [(llmft.build_trainer, SFTOptions), (llmft.build_dpo_trainer, DPOOptions)])
def test_builder_keywords_are_the_config_fields_with_its_defaults(builder, cls):
    parameters = inspect.signature(builder).parameters
    for field in dataclasses.fields(cls):
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[field.name].default == field.default
    assert SFTOptions().learning_rate == 2e-4 and DPOOptions().learning_rate == 5e-6  # where SFT and DPO differ
    assert DPOOptions().weight_decay == 0.0 and DPOOptions().output_dir == "outputs_dpo"
    # the control options are the one TrainingControlConfig's, with the same defaults
    for field in dataclasses.fields(TrainingControlConfig):
        assert parameters[field.name].default == field.default


def test_config_validation_errors_name_the_fix():
    with pytest.raises(ValueError, match="give both instruction_part and response_part"):
        SFTOptions(instruction_part="### Instruction:\n")
    with pytest.raises(TypeError, match=r"distill: unknown option\(s\) 'wieght' \(did you mean 'weight'\?\)"):
        SFTOptions(distill={"wieght": 0.3})
    assert SFTOptions(distill=True).distill == DistillConfig() and SFTOptions(distill=False).distill is None
    with pytest.raises(ValueError, match=r"weight_decay_ramp=\(0.1,\): give \(start, end\)"):
        TrainingControlConfig(weight_decay_ramp=[0.1])


def test_build_records_its_settings_and_accepts_a_config(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    base = SFTOptions(output_dir=str(tmp_path / "a"), learning_rate=1e-3, max_steps=3, weight_decay_ramp=(0.0, 0.1))
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, config=base, max_steps=4, packing=False,
                                  verbose=False)
    assert isinstance(trainer, trainers.LlmftSFTTrainer)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.max_steps == 4  # the keyword overrides the config
    assert trainer.llmft_options.max_steps == 4 and base.max_steps == 3  # the caller's config is not changed
    record = json.loads((tmp_path / "a" / configs.CONFIG_FILE).read_text())
    assert record["kind"] == "build_trainer" and record["trl"]["packing"] is False
    assert "learning_rate" not in record["trl"] and record["options"]["max_length"] == 128  # as the trainer has it
    assert record["options"]["learning_rate"] == 1e-3 and record["options"]["weight_decay_ramp"] == [0.0, 0.1]
    assert set(record["options"]) == {f.name for f in dataclasses.fields(SFTOptions)}
    with pytest.raises(TypeError, match=r"build_trainer: unknown option\(s\) 'learning_rte' \(did you mean "
                                        r"'learning_rate'\?\)"):
        llmft.build_trainer(model, tokenizer, chat_dataset, config={"learning_rte": 1e-3})


def test_attach_training_control_checks_names_and_schedule_hook(lora_model, chat_dataset, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = lora_model
    plain = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=chat_dataset,
                       args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none",
                                      **trainers.precision_flags()))
    with pytest.raises(TypeError, match=r"'early_stoping_patience' \(did you mean 'early_stopping_patience'\?\)"):
        llmft.attach_training_control(plain, early_stoping_patience=2)
    with pytest.raises(TypeError, match="no schedule hook.*TrainerMixin"):
        llmft.attach_training_control(plain, scheduler="chebyshev")


def test_distill_trainer_is_a_module_level_class():
    assert trainers.DistillSFTTrainer.__module__ == "llmft.trainers"
    assert pickle.loads(pickle.dumps(trainers.DistillSFTTrainer)) is trainers.DistillSFTTrainer
    from trl import SFTTrainer

    assert issubclass(trainers.DistillSFTTrainer, SFTTrainer)
    # configured per instance (not through a class attribute), and subclassable
    assert "distill" in inspect.signature(trainers.DistillSFTTrainer.__init__).parameters
    assert not hasattr(trainers.DistillSFTTrainer, "llmft_distill")

    class Mine(trainers.DistillSFTTrainer):
        pass

    assert issubclass(Mine, trainers.TrainerMixin)


@pytest.mark.slow
def test_offline_switch_reaches_libraries_that_were_already_imported(tmp_path):
    code = ("import llmft, huggingface_hub.constants as hub, datasets.config as ds\n"
            "before = hub.is_offline_mode()\n"
            "from llmft.__main__ import set_offline\n"
            "set_offline()\n"
            "print('OFFLINE', before, hub.is_offline_mode(), ds.HF_HUB_OFFLINE)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    line = next(line for line in out.stdout.splitlines() if line.startswith("OFFLINE"))
    assert line == "OFFLINE False True True", out.stderr[-2000:]


@pytest.mark.parametrize("cls", [SFTOptions, DPOOptions])
@pytest.mark.parametrize("option, value, message", [
    ("learning_rate", "abc", r"learning_rate='abc': not a number"),
    ("learning_rate", 0, r"learning_rate=0: must be > 0"),
    ("learning_rate", -1e-4, r"learning_rate=-0.0001: must be > 0"),
    ("learning_rate", True, r"learning_rate=True: expected a number"),
    ("learning_rate", "nan", r"learning_rate='nan': expected a finite number"),
    ("max_steps", -5, r"max_steps=-5: .*or -1 to train for num_train_epochs"),
    ("max_steps", 0, r"max_steps=0: .*or -1 to train for num_train_epochs"),
    ("max_steps", 2.5, r"max_steps=2.5: expected a whole number"),
    ("num_train_epochs", 0, r"num_train_epochs=0: with max_steps=-1 the run lasts num_train_epochs"),
    ("per_device_train_batch_size", 0, r"per_device_train_batch_size=0: must be at least 1"),
    ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps=0: must be at least 1"),
    ("eval_steps", 0, r"eval_steps=0: must be at least 1, or None"),
    ("warmup_steps", -1, r"warmup_steps=-1: must be >= 0"),
])
def test_bad_values_are_refused_naming_the_option(cls, option, value, message):
    with pytest.raises(configs.ConfigError, match=message) as caught:
        cls(**{option: value})
    assert caught.value.option == option and isinstance(caught.value, ValueError)


def test_numbers_written_as_strings_are_numbers():
    # PyYAML reads 2e-4 as the string "2e-4" (YAML 1.1 wants a dot): the option takes it as the number it is
    options = SFTOptions(learning_rate="2e-4", max_steps="10", num_train_epochs="0.2", weight_decay_ramp=["0", "0.1"])
    assert options.learning_rate == 2e-4 and options.max_steps == 10 and options.num_train_epochs == 0.2
    assert options.weight_decay_ramp == (0.0, 0.1) and DistillConfig(weight="0.5").weight == 0.5
    assert SFTOptions(max_steps=5, num_train_epochs=0).max_steps == 5  # epochs only count with max_steps=-1
    assert SFTOptions(max_steps=-1).max_steps == -1 and DPOOptions(beta="0.2").beta == 0.2
    from llmft.trl_configs import LlmftSFTConfig, config_from

    # TRL's own numbers too, in the trainer's config
    passthrough = config_from(LlmftSFTConfig, "build_trainer", None, {"adam_epsilon": "1e-8"})
    assert passthrough.adam_epsilon == 1e-8
    with pytest.raises(configs.ConfigError, match=r"adam_beta2='x': not a number"):
        config_from(LlmftSFTConfig, "build_trainer", None, {"adam_beta2": "x"})


@pytest.mark.parametrize("beta", [0, -0.1, "0"])
def test_dpo_beta_must_be_positive(beta):
    with pytest.raises(configs.ConfigError, match=r"beta=.*DPO's beta must be > 0"):
        DPOOptions(beta=beta)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a file")
    with pytest.raises(configs.ConfigError, match=r"output_dir='.*notes.txt': is a file"):
        SFTOptions(output_dir=str(path))
    with pytest.raises(configs.ConfigError, match="is a file"):
        llmft.build_trainer(None, None, None, output_dir=str(path))  # before the model or data is touched
    assert SFTOptions(output_dir=str(tmp_path)).output_dir == str(tmp_path)


def test_one_config_object_from_keywords_to_trainer_and_record(lora_model, chat_dataset, tmp_path):
    import trl

    from llmft import trl_configs

    model, tokenizer = lora_model
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, chat_dataset.select(range(8)),
                                  output_dir=str(tmp_path), learning_rate="2e-4", max_steps=20, seed=7,
                                  per_device_train_batch_size=4, packing=False, verbose=False)
    args = trainer.args
    assert type(args) is trl_configs.LlmftSFTConfig and isinstance(args, trl.SFTConfig)
    assert issubclass(trl_configs.LlmftSFTConfig, configs.SFTRunConfig)
    assert trainer.llmft_options is args  # the same object: recipe/keywords -> builder -> trainer
    assert args.learning_rate == 2e-4 and isinstance(args.learning_rate, float)  # "2e-4" as YAML reads it
    # computed when built: from the hardware, and from the data (a tenth of the run, a checkpoint at each eval)
    assert (args.eval_strategy, args.eval_steps, args.save_steps) == ("steps", 2, 2)
    assert (args.per_device_eval_batch_size, args.data_seed, args.fp16, args.bf16) == (4, 7, False, False)
    record = json.loads((tmp_path / configs.CONFIG_FILE).read_text())
    assert record["options"] == {name: configs.jsonable(getattr(args, name))
                                 for name in configs.field_names(configs.SFTRunConfig)}
    assert record["options"]["eval_steps"] == 2 and record["trl"]["packing"] is False and "adam_beta1" in record["trl"]
    # a whole config passed back in: its own values, what it computed (data_seed, eval batch) computed again
    again = llmft.build_trainer(model, tokenizer, chat_dataset, config=args, seed=9, per_device_train_batch_size=2,
                                verbose=False)
    assert (again.args.data_seed, again.args.per_device_eval_batch_size, again.args.max_steps) == (9, 2, 20)
    assert again.args is not args and args.seed == 7
    with pytest.raises(configs.ConfigError, match=r"learning_rate='abc': not a number"):
        trl_configs.LlmftSFTConfig(learning_rate="abc")


def test_checkpoints_save_a_config_holding_a_lambda_schedule_and_live_probes(lora_model, chat_dataset, tmp_path):
    """transformers pickles args into every checkpoint (training_args.bin) and integrations log args.to_dict():
    llmft's live objects (a lambda schedule, a ProbeCallback holding the tokenizer) go in as their descriptions."""
    import torch

    from llmft import callbacks, probes

    model, tokenizer = lora_model
    prober = callbacks.ProbeCallback([probes.fibonacci_probe(max_items=2)], max_new_tokens=4)
    schedule = lambda optimizer, steps, **kw: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # noqa: E731
    report_to = "tensorboard" if _installed("tensorboard") else "none"
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset.select(range(16)), chat_dataset.select(range(4)),
                                  output_dir=str(tmp_path), max_steps=2, eval_steps=1, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=1, scheduler=schedule, probes=prober,
                                  report_to=report_to, verbose=False, disable_tqdm=True)
    trainer.train()
    saved = torch.load(tmp_path / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert type(saved) is type(trainer.args) and saved.max_steps == 2
    assert isinstance(saved.scheduler, str) and "lambda" in saved.scheduler and isinstance(saved.probes, str)
    assert trainer.args.scheduler is schedule and trainer.args.probes is prober  # the live objects stay live
    assert json.loads(trainer.args.to_json_string())["scheduler"] == saved.scheduler
    assert any(r.get("eval_probe/fibonacci") is not None for r in trainer.state.log_history)
    if report_to == "tensorboard":
        assert any((tmp_path / "runs").rglob("events.out.tfevents.*")) or any(tmp_path.rglob("events.out.*"))


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
