"""Recipe files: a whole run (load → data → build → train → plots → adapters) from one YAML file.

    python -m llmft train recipes/01_sft.yaml            # SFT, as notebook 01
    python -m llmft dpo recipes/02_dpo.yaml              # DPO, as notebook 02
    python -m llmft train recipes/01_sft.yaml --smoke    # the same on llmft.testing's tiny offline assets

A recipe has three sections whose fields are llmft's own, checked by name before anything loads (a misspelt field
gets the same "did you mean" message as a misspelt keyword):

- ``model``: ``name`` (hub id, local directory or ``testing:tiny_model``) and any :func:`llmft.load_model` keyword;
- ``data``: the fields of :class:`DataConfig` (dataset, split, format, rows, eval_rows, seed);
- ``training``: the fields of :class:`llmft.configs.SFTOptions` (``train``) or :class:`llmft.configs.DPOOptions`
  (``dpo``), plus any ``trl.SFTConfig`` / ``trl.DPOConfig`` field.

An optional ``smoke`` section holds the same three sections' overrides, applied by ``--smoke`` (or ``LLMFT_SMOKE=1``)
so a continuous-integration job runs the very recipe on tiny local assets. The run writes, in ``output_dir``:
``metrics.csv``, ``best/``, ``llmft_config.json`` (the trainer options), ``recipe.json`` (the recipe as resolved),
``training.png`` and ``adapters/``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from llmft.configs import DPOOptions, SFTOptions, check_names, field_names
from llmft.log import say
from llmft.environment import DEFAULT_SEED
from llmft.environment import is_main_process

SECTIONS = ("model", "data", "training", "smoke")
TESTING_MODEL = "testing:tiny_model"
TESTING_DATASETS = {"testing:finetome": "tiny_finetome", "testing:orca_dpo": "tiny_orca_dpo",
                    "testing:oasst1": "tiny_oasst1", "testing:codemmlu": "tiny_codemmlu"}
FORMATS = ("sharegpt", "messages", "text", "orca_dpo", "preference")


@dataclass
class DataConfig:
    """A recipe's ``data`` section: where the rows come from and how they become trainer-ready."""

    dataset: str = dataclasses.field(metadata={"help": "Hub dataset id, a local data file/directory "
                                               "(datasets.load_dataset), or testing:finetome / testing:orca_dpo."})
    format: str = dataclasses.field(metadata={"help": "sharegpt (conversations → messages), messages, text, "
                                              "orca_dpo (Intel/orca_dpo_pairs → DPO pairs) or preference."})
    split: str = dataclasses.field(default="train", metadata={"help": "The dataset split to read."})
    rows: int | None = dataclasses.field(default=None, metadata={
        "help": "Rows to use after a seeded shuffle (train + eval); None: all."})
    eval_rows: int = dataclasses.field(default=200, metadata={"help": "Rows held out for evaluation (0: none)."})
    seed: int = dataclasses.field(default=DEFAULT_SEED,
                                  metadata={"help": "Seed of the shuffle and the train/eval split."})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}: use one of {list(FORMATS)}")


def load_recipe(source, *, smoke: bool = False) -> dict:
    """Read a recipe (a YAML path or a dict), apply its ``smoke`` overrides when asked, and check every name.
    Returns the resolved recipe (``model``, ``data``, ``training`` sections) and checks nothing is loaded yet."""
    where = str(source) if not isinstance(source, dict) else "recipe"
    if isinstance(source, dict):
        recipe = copy.deepcopy(source)
    else:
        import yaml

        recipe = yaml.safe_load(Path(source).read_text()) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{where}: a recipe is a mapping with sections {list(SECTIONS[:3])}")
    check_names(recipe, SECTIONS, where, f"A recipe has the sections {list(SECTIONS)}.")
    overrides = recipe.pop("smoke", None) or {}
    check_names(overrides, SECTIONS[:3], f"{where} [smoke]", f"smoke overrides the sections {list(SECTIONS[:3])}.")
    if smoke:
        for section, values in overrides.items():
            recipe[section] = {**(recipe.get(section) or {}), **(values or {})}
    for section in SECTIONS[:3]:
        recipe[section] = dict(recipe.get(section) or {})
    return recipe


def check_recipe(recipe: dict, command: str, where: str = "recipe") -> None:
    """Check every name of every section against what it is passed to; raise TypeError naming the closest one."""
    from llmft.models import load_model

    options_cls, trl_cls = _options(command)
    model_known = set(inspect.signature(load_model).parameters) - {"model_name", "from_pretrained_kwargs"} | {"name"}
    check_names(recipe["model"], model_known, f"{where} [model]", "Fields are `name` and llmft.load_model keywords.")
    if "name" not in recipe["model"]:
        raise ValueError(f"{where} [model]: `name` is required (a hub id, a local directory or {TESTING_MODEL})")
    check_names(recipe["data"], field_names(DataConfig), f"{where} [data]",
                f"Fields are llmft.recipes.DataConfig's: {field_names(DataConfig)}.")
    training_known = set(field_names(options_cls)) | set(field_names(trl_cls))
    check_names(recipe["training"], training_known, f"{where} [training]",
                f"Fields are llmft.configs.{options_cls.__name__}'s or trl.{trl_cls.__name__}'s.")


def _options(command: str):
    if command == "train":
        from trl import SFTConfig

        return SFTOptions, SFTConfig
    if command == "dpo":
        from trl import DPOConfig

        return DPOOptions, DPOConfig
    raise ValueError(f"command={command!r}: use 'train' (SFT) or 'dpo'")


def load_rows(data: DataConfig):
    """The ``data`` section's dataset, shuffled, cut to ``rows`` and converted to the trainer's format."""
    from llmft import data as adapters, testing

    if data.dataset in TESTING_DATASETS:
        raw = getattr(testing, TESTING_DATASETS[data.dataset])(data.rows or 64)
    else:
        from datasets import load_dataset

        path = Path(data.dataset)
        if path.is_file():
            raw = load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path),
                               split=data.split)
        else:
            raw = load_dataset(data.dataset, split=data.split)
    raw = raw.shuffle(seed=data.seed)
    if data.rows is not None:
        raw = raw.select(range(min(len(raw), data.rows)))
    convert = {"sharegpt": adapters.sharegpt_to_messages, "orca_dpo": lambda d: adapters.orca_to_dpo(d, strict=False),
               "preference": adapters.preference_pairs}.get(data.format)
    rows = convert(raw) if convert else raw
    if not data.eval_rows:
        return rows, None
    split = rows.train_test_split(test_size=min(data.eval_rows, len(rows) // 5 or 1), seed=data.seed)
    return split["train"], split["test"]


def run_recipe(source, command: str = "train", *, smoke: bool | None = None, callbacks: list | None = None) -> dict:
    """Run a recipe (YAML path or dict) end to end: load the model, read the data, build the trainer, train (resuming
    from ``output_dir`` after a disconnect), plot and save the adapters. ``smoke=None`` follows ``LLMFT_SMOKE``;
    ``callbacks``: more ``TrainerCallback`` objects for the trainer. Returns a summary: output_dir, steps, final/best
    metric, and the paths written.

    It runs unchanged as one of several processes (``torchrun --nproc_per_node=N -m llmft train recipe.yaml``, or
    ``accelerate launch --multi_gpu``): transformers trains data parallel, every process returns the same summary, and
    only the main one writes files."""
    import llmft
    from llmft import plots, testing
    from llmft.callbacks import BestCheckpoint, find_callback

    where = str(source) if not isinstance(source, dict) else "recipe"
    smoke = testing.smoke_mode() if smoke is None else smoke
    recipe = load_recipe(source, smoke=smoke)
    check_recipe(recipe, command, where)
    options_cls, _ = _options(command)
    model_options = dict(recipe["model"])
    name = model_options.pop("name")
    if name == TESTING_MODEL:
        name = str(testing.tiny_model_dir())
    data = DataConfig(**recipe["data"])
    say(f"llmft {command}: {where} (smoke={smoke}): model {name}, data {data.dataset}")
    model, tokenizer = llmft.load_model(name, **model_options)
    train_rows, eval_rows = load_rows(data)
    build = llmft.build_trainer if command == "train" else llmft.build_dpo_trainer
    trainer = build(model, tokenizer, train_rows, eval_rows, callbacks=callbacks, **recipe["training"])
    out = Path(trainer.args.output_dir)
    writes = is_main_process(trainer.args)
    if writes:
        (out / "recipe.json").write_text(json.dumps({"command": command, "smoke": smoke, **recipe}, indent=2,
                                                    default=str) + "\n")
    result = llmft.train(trainer, resume="auto")
    if writes:
        plot = plots.plot_training if command == "train" else plots.plot_dpo
        import matplotlib.pyplot as plt

        plt.close(plot(out, path=out / "training.png", title=command.upper()))
    adapters = llmft.save_adapters(model, tokenizer, out / "adapters")
    summary = {"output_dir": str(out), "global_step": result.global_step, "train_loss": result.training_loss,
               "config": str(out / "llmft_config.json"), "metrics": str(out / "metrics.csv"),
               "adapters": str(adapters), "plot": str(out / "training.png")}
    best = find_callback(trainer, BestCheckpoint)  # in memory: the same in every process (best.json is its copy)
    if best is not None:
        summary["best"] = best.record()
    if writes:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say(f"llmft {command}: {result.global_step} steps; results in {out}")
    return summary
