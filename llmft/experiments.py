"""Several fine-tuning runs from one base, compared in one table: the loop behind the CodeMMLU report's findings
(0.2 vs 1 epoch, knowledge distillation, the Chebyshev schedule) and ``python -m llmft demo``.

:func:`run_experiment` takes a base model, named variants (each a dict of :func:`llmft.build_trainer` keywords that
override the shared ones), the training (and evaluation) data, probes (:mod:`llmft.probes`) and scorers (callables
``(model, tokenizer) -> value``). It evaluates the base (adapter disabled), then for each variant loads the base afresh
with a new LoRA adapter, trains it, probes and scores it, saves its adapters, and returns one tidy table: a row per
run with its steps, training time, probe accuracies, scores and the paths of its adapters and metrics.
"""
from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llmft.log import repeats_hidden, say
from llmft.environment import DEFAULT_SEED


@dataclass
class Experiment:
    """What :func:`run_experiment` returns."""

    table: "object"  # pandas.DataFrame: one row per run (the base first)
    answers: "object"  # pandas.DataFrame: every probe answer of every run (a ``run`` column)
    runs: dict = field(default_factory=dict)  # run name -> {"output_dir", "adapters", "metrics", "steps"}
    model: "object" = None  # the last run's trained model, still loaded (to generate with, or to free)
    tokenizer: "object" = None


def run_slug(name: str) -> str:
    """A run's folder name: "1 epoch + KD" -> "1_epoch_plus_KD", "0.2 epoch" -> "0p2_epoch"."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.replace("+", "plus").replace(".", "p")).strip("_")


def mcq_accuracy(rows, *, batch_size: int = 8, progress: bool = False) -> Callable:
    """A scorer: the accuracy of :func:`llmft.mcq.score_choices` on MCQ ``rows`` (from :func:`llmft.mcq_rows`)."""
    from llmft import mcq

    def score(model, tokenizer) -> float:
        scores = mcq.score_choices(model, tokenizer, list(rows["prompt"]), list(rows["n_choices"]),
                                   batch_size=batch_size, progress=progress)
        return float(mcq.accuracy(scores["prediction"], list(rows["answer"])).loc["all", "accuracy"])

    return score


def summarize(table, columns: Sequence[str], by: str = "run"):
    """Mean, standard deviation (across seeds; 0 for a single run) and count of ``columns`` per ``by`` value, in the
    order the runs first appear: ``<column>_mean``, ``<column>_sd``, ``n``."""
    import pandas as pd

    groups = table.groupby(by, sort=False)[list(columns)]
    summary = pd.concat({"mean": groups.mean(), "sd": groups.std(ddof=1).fillna(0.0)}, axis=1)
    summary.columns = [f"{column}_{stat}" for stat, column in summary.columns]
    summary["n"] = groups.size()
    return summary.reset_index()


def repair_hook(run: str, probe, task: Callable, lambdas: Sequence[float] = (1.0, 0.5, 0.0), *,
                sweeps: dict | None = None, save: bool = False) -> Callable:
    """An ``on_run`` hook for :func:`run_experiment`: sweeps the intruder-dimension repair
    (:func:`llmft.analysis.repair_sweep`) of run ``run``'s adapter while it is loaded and adds ``repair_lambda``,
    ``repair_probe`` and ``repair_task`` (the chosen λ and its scores) to that run's row. ``sweeps`` (a dict) receives
    each :class:`~llmft.analysis.RepairResult` by seed; ``save`` writes the chosen adapter to ``<run dir>/repaired``."""
    from llmft import analysis

    def hook(name, model, tokenizer, trainer):
        if name != run:
            return None
        result = analysis.repair_sweep(model, tokenizer, probe, task, lambdas=lambdas,
                                       save_dir=f"{trainer.args.output_dir}/repaired" if save else None)
        if sweeps is not None:
            sweeps[trainer.args.seed] = result
        chosen = result.table[result.table["chosen"]].iloc[0]
        return {"repair_lambda": float(chosen["mitigation_lambda"]), "repair_probe": float(chosen["probe"]),
                "repair_task": float(chosen["task"])}

    return hook


def with_repaired(table, run: str, task: str, name: str | None = None, probe: str = "probe_accuracy"):
    """``table`` plus one row per repaired ``run`` (from :func:`repair_hook`'s columns) as a run of its own, named
    ``name`` (default "<run> + intruder repair"), with the repaired scores in the ``probe`` and ``task`` columns."""
    import pandas as pd

    repaired = table[table["run"] == run].assign(run=name or f"{run} + intruder repair")
    repaired[probe], repaired[task] = repaired["repair_probe"], repaired["repair_task"]
    return pd.concat([table, repaired], ignore_index=True)


def _evaluate(name: str, model, tokenizer, probes: dict, scorers: dict, progress: bool):
    from llmft.probes import run_probe

    row, answers = {}, []
    for probe_name, probe in probes.items():
        table = run_probe(model, tokenizer, probe, model_name=name, progress=progress)
        row[f"{probe_name}_accuracy"] = float(table["correct"].mean())
        row[f"{probe_name}_headline"] = table.loc[0, "answer"]
        answers.append(table.assign(run=name, probe=probe_name))
    for score_name, scorer in scorers.items():
        row[score_name] = scorer(model, tokenizer)
    return row, answers


def _free(model) -> None:
    del model
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_experiment(base: str, variants: dict[str, dict], train_dataset, eval_dataset=None, *, output_dir: str,
                   load_options: dict | None = None, trainer_options: dict | None = None,
                   probes: dict | None = None, scorers: dict[str, Callable] | None = None,
                   include_base: bool = True, base_name: str = "base", on_run: Callable | None = None,
                   loaded: tuple | None = None,
                   seeds: Sequence[int] | None = None, resume: bool | str | None = "auto",
                   save_adapters: bool = True, progress: bool = True, verbose: bool = True) -> Experiment:
    """Train every variant from the same ``base`` and compare them.

    - ``base``: what :func:`llmft.load_model` loads (hub id or directory), with ``load_options`` (LoRA on: each run
      gets a fresh adapter on the same base);
    - ``variants``: ``{"0.2 epoch": {"num_train_epochs": 0.2}, "1 epoch + KD": {"distill": {"weight": 0.3}}, ...}``,
      each overriding ``trainer_options`` (any :func:`llmft.build_trainer` keyword); run ``name`` trains in
      ``output_dir/<run_slug(name)>``;
    - ``probes``: ``{"probe": llmft.probes.fibonacci_probe()}`` gives columns ``probe_accuracy`` and ``probe_headline``
      (the answer to the probe's first item); ``scorers``: ``{"mcq_accuracy": mcq_accuracy(val)}`` one column each;
    - ``on_run(name, model, tokenizer, trainer)``: called after each run is scored, while its model is loaded; the
      dict it returns is added to the run's row (e.g. a submission path, a forgetting curve);
    - ``include_base``: a first row for the base with its adapter disabled (steps 0), named ``base_name``;
    - ``loaded``: ``(model, tokenizer)`` already loaded from ``base`` with ``load_options`` (e.g. to prepare the data
      with its tokenizer): used for the base and the first run instead of loading again;
    - ``seeds``: run every variant once per seed (the LoRA initialisation and the data order change; a ``seed``
      column tells them apart, run ``name`` trains in ``output_dir/<run_slug(name)>/seed-<seed>``); :func:`summarize`
      gives the mean and spread per run. ``None``: one run each, with ``trainer_options``' seed;
    - ``progress``: a progress bar per training run (no dict printed per log: ``metrics.csv`` has them) and per
      probe; ``verbose``: one line per run.

    Returns an :class:`Experiment`: ``table`` (run, steps, train_seconds, probe and scorer columns, output_dir,
    adapters, metrics), every probe answer in ``answers``, ``runs`` (paths by run name) and the last run's
    ``model``/``tokenizer``.
    """
    import pandas as pd

    from llmft.models import load_model, save_adapters
    from llmft.trainers import build_trainer, train

    from llmft.callbacks import quiet_console

    probes, scorers = dict(probes or {}), dict(scorers or {})
    load_options, trainer_options = dict(load_options or {}), dict(trainer_options or {})
    out = Path(output_dir)
    rows, answers, runs = [], [], {}
    load_messages = set()
    with repeats_hidden(load_messages):
        model, tokenizer = loaded if loaded is not None else load_model(base, **load_options)
    default_seed = trainer_options.get("seed", load_options.get("seed", DEFAULT_SEED))
    if include_base:
        say(f"experiment: evaluating the base ({base_name})", verbose)
        with model.disable_adapter():
            row, probe_answers = _evaluate(base_name, model, tokenizer, probes, scorers, progress)
        rows.append({"run": base_name, "seed": None, "steps": 0, "train_seconds": 0.0, **row})
        answers += probe_answers
    plan = [(name, options, seed) for seed in (seeds or [default_seed]) for name, options in variants.items()]
    for index, (name, options, seed) in enumerate(plan):
        say(f"experiment: run {index + 1}/{len(plan)}: {name}" + (f" (seed {seed})" if seeds else ""), verbose)
        if index or (seeds and seed != load_options.get("seed", seed)):
            _free(model)
            with repeats_hidden(load_messages):  # Unsloth prints the same line at every load
                model, tokenizer = load_model(base, **{**load_options, **({"seed": seed} if seeds else {})})
        run_dir = out / run_slug(name) / (f"seed-{seed}" if seeds else "")
        trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, verbose=False,
                                **{**trainer_options, "output_dir": str(run_dir), "seed": seed, **options})
        quiet_console(trainer, progress)
        started = time.time()
        stats = train(trainer, resume=resume)
        seconds = round(time.time() - started, 1)
        row, probe_answers = _evaluate(name, model, tokenizer, probes, scorers, progress)
        paths = {"output_dir": str(run_dir), "metrics": str(run_dir / "metrics.csv"), "adapters": None}
        if save_adapters:
            paths["adapters"] = str(save_adapters(model, tokenizer, run_dir / "adapters"))
        extra = on_run(name, model, tokenizer, trainer) if on_run is not None else None
        rows.append({"run": name, "seed": seed, "steps": stats.global_step, "train_seconds": seconds, **row,
                     **(extra or {}), **paths})
        answers += [a.assign(seed=seed) for a in probe_answers]
        runs[name if not seeds else f"{name} (seed {seed})"] = {**paths, "steps": stats.global_step, "seed": seed}
        del trainer
    table = pd.DataFrame(rows)
    return Experiment(table=table, answers=pd.concat(answers, ignore_index=True) if answers else pd.DataFrame(),
                      runs=runs, model=model, tokenizer=tokenizer)
