"""Recipe files: a whole run (load → data → build → train → plots → adapters) from one YAML file.

    python -m llmft train recipes/01_sft.yaml            # SFT, as notebook 01
    python -m llmft dpo recipes/02_dpo.yaml              # DPO, as notebook 02
    python -m llmft train recipes/01_sft.yaml --smoke    # the same on llmft.testing's tiny offline assets

A recipe has three sections whose fields are llmft's own, checked by name before anything loads (a misspelt field
gets the same "did you mean" message as a misspelt keyword):

- ``model``: the fields of :class:`llmft.configs.ModelConfig`: ``name`` (hub id, local directory or
  ``testing:tiny_model``) and :func:`llmft.load_model`'s keywords, typed (``lora_r: abc`` is refused naming it);
- ``data``: the fields of :class:`DataConfig` (dataset, split, format, rows, eval_rows, seed);
- ``training``: the fields of :class:`llmft.trl_configs.LlmftSFTConfig` (``train``) or
  :class:`~llmft.trl_configs.LlmftDPOConfig` (``dpo``): llmft's own (:class:`llmft.configs.SFTRunConfig` /
  :class:`~llmft.configs.DPORunConfig`) and every ``trl.SFTConfig`` / ``trl.DPOConfig`` field.

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
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmft.configs import ConfigError, ModelConfig, check_names, field_names
from llmft.data import DataError
from llmft.log import say
from llmft.environment import DEFAULT_SEED, is_main_process

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
    light = _light_options(command)
    ours = set(field_names(light))
    check_names(recipe["model"], field_names(ModelConfig), f"{where} [model]",
                f"Fields are llmft.configs.ModelConfig's (llmft.load_model's): {field_names(ModelConfig)}.")
    if "name" not in recipe["model"]:
        raise ValueError(f"{where} [model]: `name` is required (a hub id, a local directory or {TESTING_MODEL})")
    check_names(recipe["data"], field_names(DataConfig), f"{where} [data]",
                f"Fields are llmft.recipes.DataConfig's: {field_names(DataConfig)}.")

    def trl_checks(values):  # TRL's names and values: imports torch, TRL and Unsloth (seconds), so they come last
        from llmft.trl_configs import config_from

        config_cls = _options(command)
        check_names(values, field_names(config_cls), f"{where} [training]",
                    f"Fields are llmft.configs.{light.__name__}'s or trl.{config_cls.trl_class.__name__}'s.")
        config_from(config_cls, command, values)

    # llmft's own values first, with the light configs: `learning_rate: abc` is refused before torch is imported
    for section, check in (("model", lambda values: ModelConfig(**values)),
                           ("data", lambda values: DataConfig(**values)),
                           ("training", lambda values: light(**{k: v for k, v in values.items() if k in ours})),
                           ("training", trl_checks)):
        try:
            check(recipe[section])
        except TypeError as exc:  # a required field left out
            raise TypeError(f"{where} [{section}]: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where} [{section}]: {exc.option}", exc.value, exc.fix) from None
    if recipe.get("smoke"):  # not applied on this run: checked all the same, so a typo there shows today
        check_recipe(load_recipe(recipe, smoke=True), command, f"{where} [smoke]")


def known_fields(command: str) -> dict[str, set[str]]:
    """The fields each section of a ``command`` recipe takes: ``model``: :class:`~llmft.configs.ModelConfig`'s
    (``name`` and :func:`llmft.load_model`'s keywords); ``data``: :class:`DataConfig`'s; ``training``: llmft's
    options and TRL's config fields."""
    return {"model": set(field_names(ModelConfig)), "data": set(field_names(DataConfig)),
            "training": set(field_names(_options(command)))}


def apply_overrides(recipe: dict, arguments, command: str = "train") -> dict:
    """A recipe with command-line overrides applied (after its smoke section, so they win): ``--name value``,
    ``--name=value`` or ``--section.name value``, as ``trl sft --config r.yaml --learning_rate 1e-4`` takes them. A bare
    name goes to the one section that has it (``training`` first: ``seed`` is a training field); values are read as
    YAML (``30``, ``1e-4``, ``true``, ``[a, b]``) and then checked like the file's. An unknown name is a
    :class:`TypeError` with the closest known one."""
    import yaml

    recipe = copy.deepcopy(recipe)
    # llmft's own fields need no TRL import; TRL's are looked up only for a name that is none of them
    known = {"model": set(field_names(ModelConfig)), "data": set(field_names(DataConfig)),
             "training": set(field_names(_light_options(command)))}
    arguments, i = list(arguments), 0
    while i < len(arguments):
        token = arguments[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"command line: {token!r} is not an override; write --name value (e.g. --learning_rate "
                             "1e-4 or --model.lora_r 32)")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(arguments) or (arguments[i + 1].startswith("--") and len(arguments[i + 1]) > 2
                                            and not arguments[i + 1][2].isdigit()):
                raise ValueError(f"command line: --{name} needs a value (e.g. --{name} 1e-4)")
            value, i = arguments[i + 1], i + 1
        i += 1
        section, dot, field = name.partition(".")
        if dot:
            check_names([section], SECTIONS[:3], "command line", f"Sections are {list(SECTIONS[:3])}.")
            if section == "training" and field not in known[section]:
                known = known_fields(command)
            check_names([field], known[section], f"command line [{section}]", f"Fields of [{section}].")
        else:
            field = name.replace("-", "_")
            if not any(field in names for names in known.values()):
                known = known_fields(command)
            owners = [part for part in ("training", "model", "data") if field in known[part]]
            if not owners:
                check_names([field], set().union(*known.values()), "command line",
                            "Overrides name a field of the recipe's sections (or --section.name).")
            section = owners[0]
        parsed = yaml.safe_load(value) if value.strip() else value
        recipe[section] = {**recipe.get(section, {}), field: parsed}
    return recipe


def _light_options(command: str):
    """llmft's own fields of ``command``'s training section (light: no torch)."""
    from llmft.configs import DPORunConfig, SFTRunConfig

    if command not in ("train", "dpo"):
        raise ValueError(f"command={command!r}: use 'train' (SFT) or 'dpo'")
    return SFTRunConfig if command == "train" else DPORunConfig


def _options(command: str):
    """The trainer config class of ``command``."""
    from llmft import trl_configs

    if command == "train":
        return trl_configs.LlmftSFTConfig
    if command == "dpo":
        return trl_configs.LlmftDPOConfig
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
    from llmft.models import load_model, save_adapters
    from llmft.trainers import build_dpo_trainer, build_trainer, train
    from llmft import plots, testing
    from llmft.callbacks import BestCheckpoint, find_callback

    where = str(source) if not isinstance(source, dict) else "recipe"
    smoke = testing.smoke_mode() if smoke is None else smoke
    recipe = load_recipe(source, smoke=smoke)
    check_recipe(recipe, command, where)
    model_options = dict(recipe["model"])
    name = model_options.pop("name")
    if name == TESTING_MODEL:
        name = str(testing.tiny_model_dir())
    data = DataConfig(**recipe["data"])
    say(f"llmft {command}: {where} (smoke={smoke}): model {name}, data {data.dataset}")
    train_rows, eval_rows = load_rows(data)  # before the model: bad data fails in seconds
    model, tokenizer = load_model(name, **model_options)
    build = build_trainer if command == "train" else build_dpo_trainer
    trainer = build(model, tokenizer, train_rows, eval_rows, callbacks=callbacks, **recipe["training"])
    out = Path(trainer.args.output_dir)
    writes = is_main_process(trainer.args)
    if writes:
        (out / "recipe.json").write_text(json.dumps({"command": command, "smoke": smoke, **recipe}, indent=2,
                                                    default=str) + "\n")
    result = train(trainer, resume="auto")
    if writes:
        plot = plots.plot_training if command == "train" else plots.plot_dpo
        import matplotlib.pyplot as plt

        plt.close(plot(out, path=out / "training.png", title=command.upper()))
    adapters = save_adapters(model, tokenizer, out / "adapters")
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


def torchrun_recipe(recipe: str | os.PathLike, command: str = "train", *, processes: int = 2, smoke: bool = False,
                    check: bool = True, stop_timeout: float = 30.0) -> int:
    """Run a recipe file on ``processes`` GPUs from a notebook cell: ``python -m torch.distributed.run --standalone
    --nproc_per_node=N -m llmft COMMAND RECIPE`` (that is, ``torchrun``), one process per GPU, its output printed as it
    comes. Returns the exit status; ``check`` raises when it fails (a ``!torchrun`` line in a cell does not stop the
    notebook when it fails).

    The processes go down with the cell: an interrupt stops torchrun, which stops its workers (SIGTERM; SIGKILL
    after ``stop_timeout`` seconds); when this process dies (a kernel restart or crash, a kill), Linux sends torchrun
    SIGTERM, and each worker gets SIGKILL when torchrun dies (:func:`die_with_launcher`, set up by ``import llmft`` in
    the workers).

    In a Kaggle kernel where ``import llmft`` pinned GPU 0 (``CUDA_VISIBLE_DEVICES=0``), the child processes would
    inherit the pin and share that one GPU: the pin is left out of their environment (a value you set yourself is
    kept)."""
    import signal
    import subprocess

    from llmft._unsloth import pinned_gpu
    from llmft.environment import _pdeathsig_setter

    env = dict(os.environ)
    if pinned_gpu() is not None and env.get("CUDA_VISIBLE_DEVICES") == pinned_gpu():
        del env["CUDA_VISIBLE_DEVICES"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "llmft", command, str(recipe), *(["--smoke"] if smoke else [])]
    print("llmft: torchrun " + " ".join(args[3:]), flush=True)
    setter, parent = _pdeathsig_setter(), os.getpid()

    def die_with_this_process():  # in the child, before exec; torchrun's SIGTERM handler stops its workers
        if setter(signal.SIGTERM) and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=die_with_this_process if setter else None) as child:
        try:
            for line in child.stdout:  # a notebook shows a child's output only when the kernel prints it
                print(line, end="", flush=True)
        except BaseException:  # an interrupt (KeyboardInterrupt) or a failure here: the job must not outlive it
            _stop(child, stop_timeout)
            raise
    if check and child.returncode != 0:
        raise RuntimeError(f"torchrun_recipe({str(recipe)!r}, {command!r}): the {processes} processes exited with "
                           f"status {child.returncode}; the lines above say why (the first traceback is the cause)")
    return child.returncode


def _stop(child, timeout: float) -> None:
    """Stop a torchrun launcher and so its workers: it may be stopping already (an interrupt in a notebook reaches
    the kernel's whole process group), else SIGTERM, which torchrun passes on to its workers; SIGKILL when it has
    not exited within ``timeout`` seconds (its workers then die with it, see :func:`die_with_launcher`)."""
    import subprocess

    for stop, wait in ((None, 3.0), (child.terminate, timeout), (child.kill, None)):
        if child.poll() is not None:
            return
        if stop is not None:
            stop()
        try:
            child.wait(wait)
        except subprocess.TimeoutExpired:
            continue
