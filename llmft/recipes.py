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
so a continuous-integration job runs the very recipe on tiny local assets; its names and values are checked on every
run, with or without ``--smoke``. Values are checked before anything loads too (a learning rate of "abc", a batch of
0, an ``output_dir`` that is a file, an unknown split of a built-in dataset, a YAML syntax error given as
file:line:column), and the data is read and converted before the model loads, so bad data fails in seconds. The run
writes, in ``output_dir``:
``metrics.csv``, ``best/``, ``llmft_config.json`` (the trainer options), ``recipe.json`` (the recipe as resolved),
``training.png`` and ``adapters/``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from llmft.configs import ConfigError, DPOOptions, SFTOptions, check_names, field_names, options_from
from llmft.data import DataError
from llmft.log import say
from llmft.models import DEFAULT_SEED
from llmft.runtime import is_main_process

SECTIONS = ("model", "data", "training", "smoke")
TESTING_MODEL = "testing:tiny_model"
TESTING_DATASETS = {"testing:finetome": "tiny_finetome", "testing:orca_dpo": "tiny_orca_dpo",
                    "testing:oasst1": "tiny_oasst1", "testing:codemmlu": "tiny_codemmlu"}
TESTING_SPLITS = ("train",)  # llmft.testing's datasets are built whole: one split
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
            raise ConfigError("data.format", self.format, f"use one of {list(FORMATS)}")
        if self.dataset.startswith("testing:"):
            if self.dataset not in TESTING_DATASETS:
                close = difflib.get_close_matches(self.dataset, TESTING_DATASETS, n=1)
                raise ConfigError("data.dataset", self.dataset, f"the built-in datasets are {sorted(TESTING_DATASETS)}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
            if self.split not in TESTING_SPLITS:
                raise ConfigError("data.split", self.split,
                                  f"{self.dataset} has only the split(s) {list(TESTING_SPLITS)}")
        if self.rows is not None and self.rows < 1:
            raise ConfigError("data.rows", self.rows, "give a positive number of rows, or null for all")
        if self.eval_rows < 0:
            raise ConfigError("data.eval_rows", self.eval_rows, "give 0 (no evaluation) or more")


def load_recipe(source, *, smoke: bool = False) -> dict:
    """Read a recipe (a YAML path or a dict), apply its ``smoke`` overrides when asked, and check every name.
    Returns the resolved recipe (``model``, ``data``, ``training`` sections) and checks nothing is loaded yet."""
    where = str(source) if not isinstance(source, dict) else "recipe"
    if isinstance(source, dict):
        recipe = copy.deepcopy(source)
    else:
        recipe = _read_yaml(Path(source)) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: a recipe is a mapping with sections {list(SECTIONS[:3])}")
    check_names(recipe, SECTIONS, where, f"A recipe has the sections {list(SECTIONS)}.")
    overrides = recipe.pop("smoke", None) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} [smoke]: a mapping with sections {list(SECTIONS[:3])}, got {overrides!r:.60}")
    check_names(overrides, SECTIONS[:3], f"{where} [smoke]", f"smoke overrides the sections {list(SECTIONS[:3])}.")
    for section in SECTIONS[:3]:
        for name, values in ((where, recipe.get(section)), (f"{where} [smoke]", overrides.get(section))):
            if values is not None and not isinstance(values, dict):
                raise ValueError(f"{name} [{section}]: a mapping of field: value, got {values!r:.60}")
    if smoke:
        for section, values in overrides.items():
            recipe[section] = {**(recipe.get(section) or {}), **(values or {})}
    for section in SECTIONS[:3]:
        recipe[section] = dict(recipe.get(section) or {})
    if overrides and not smoke:  # kept unapplied, so check_recipe checks them on every run
        recipe["smoke"] = overrides
    return recipe


def _read_yaml(path: Path):
    """The YAML file's content; a syntax error (a tab, a bad indent, an unclosed quote) is one line naming the file,
    line and column."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        hint = "; YAML indents with spaces, never tabs" if "\\t" in problem else ""
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path),
                          fix=f"YAML syntax error: {problem}{hint}") from None


def check_recipe(recipe: dict, command: str, where: str = "recipe") -> None:
    """Check every name of every section against what it is passed to (a :class:`TypeError` naming the closest one)
    and the data and training values (a :class:`~llmft.configs.ConfigError` naming the option and the fix), of the
    recipe and of its unapplied ``smoke`` section alike, before anything loads."""
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
    for section, check in (("data", lambda values: DataConfig(**values)),
                           ("training", lambda values: options_from(options_cls, command, trl_cls, values))):
        try:
            check(recipe[section])
        except TypeError as exc:  # a required field left out
            raise TypeError(f"{where} [{section}]: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where} [{section}]: {exc.option}", exc.value, exc.fix) from None
    if recipe.get("smoke"):  # not applied on this run: checked all the same, so a typo there shows today
        check_recipe(load_recipe(recipe, smoke=True), command, f"{where} [smoke]")


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
        try:
            if path.is_file():
                raw = load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path),
                                   split=data.split)
            else:
                raw = load_dataset(data.dataset, split=data.split)
        except ValueError as exc:
            if "unknown split" not in str(exc).lower():
                raise
            raise ConfigError("data.split", data.split, f"{data.dataset}: {exc}") from None
    if len(raw) == 0:
        raise DataError(f"data: {data.dataset} split {data.split!r} has no rows")
    raw = raw.shuffle(seed=data.seed)
    if data.rows is not None:
        raw = raw.select(range(min(len(raw), data.rows)))
    convert = {"sharegpt": adapters.sharegpt_to_messages, "orca_dpo": lambda d: adapters.orca_to_dpo(d, strict=False),
               "preference": adapters.preference_pairs}.get(data.format)
    rows = convert(raw) if convert else raw
    if not data.eval_rows:
        return rows, None
    if len(rows) < 2:
        raise DataError(f"data: {len(rows)} usable row(s) from {data.dataset}: too few to hold out eval_rows="
                        f"{data.eval_rows} and still train; give more rows, or eval_rows: 0")
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
    train_rows, eval_rows = load_rows(data)  # before the model: bad data fails in seconds
    model, tokenizer = llmft.load_model(name, **model_options)
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
