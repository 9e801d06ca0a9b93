"""Forgetting probes: prompts with known answers that a model should keep answering while it is fine-tuned on
something else.

The built-in probe is the CodeMMLU report's: the Alpaca prompt "Continue the fibonnaci sequence." (the CodeMMLU report's
spelling) with input "1, 1, 2, 3, 5, 8" and answer 13, plus windows of the sequence at other offsets and lengths. A
probe is scored by exact match on the next term, and every answer is kept so you can see *how* it fails (the CodeMMLU
report's model answered "2" after one epoch). Probes run on a model, on base vs adapters, or across a run's checkpoints,
and give a tidy DataFrame and a forgetting curve.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llmft.templates import format_alpaca
from llmft.checkpoints import checkpoints  # one rule for complete checkpoints

FIBONACCI_INSTRUCTION = "Continue the fibonnaci sequence."  # the CodeMMLU report's spelling, kept on purpose
HEADLINE_INPUT = "1, 1, 2, 3, 5, 8"


PROBE_PREFIX = "eval_probe/"


def probe_metric(name: str) -> str:
    """The evaluation metric a probe is reported as: ``eval_probe/<name>`` (``name``, ``probe/<name>`` or the full
    key are accepted)."""
    if name.startswith(PROBE_PREFIX):
        return name
    return PROBE_PREFIX + (name[len("probe/"):] if name.startswith("probe/") else name)


def fibonacci(n: int) -> list[int]:
    seq = [1, 1]
    while len(seq) < n:
        seq.append(seq[-1] + seq[-2])
    return seq[:n]


def first_number(text: str) -> str | None:
    match = re.search(r"-?\d+", text)
    return match.group(0) if match else None


def next_term_match(generated: str, expected: str) -> bool:
    """Exact match of the first number in the answer with the expected next term ("13." and " 13, 21" count)."""
    return first_number(generated) == expected.strip()


def exact_match(generated: str, expected: str) -> bool:
    """Whitespace- and case-insensitive exact match of the whole answer."""
    return " ".join(generated.split()).lower() == " ".join(expected.split()).lower()


@dataclass
class Probe:
    """Prompts (strings or chat messages) with expected answers and a scorer ``(generated, expected) -> bool``."""

    name: str
    prompts: list
    answers: list[str]
    labels: list[str] = field(default_factory=list)
    scorer: Callable[[str, str], bool] = exact_match  # the first item is the headline, reported on its own

    def __post_init__(self):
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"Probe {self.name!r}: {len(self.prompts)} prompts but {len(self.answers)} answers")
        if not self.prompts:
            raise ValueError(f"Probe {self.name!r}: no items")
        if not self.labels:
            self.labels = [str(p)[:60] for p in self.prompts]


def fibonacci_probe(n_terms: int = 25, lengths: Sequence[int] = range(3, 9), max_items: int | None = None) -> Probe:
    """The CodeMMLU report's headline prompt first, then every window of ``lengths`` consecutive terms whose next term
    is among the first ``n_terms`` Fibonacci numbers (117 items for the defaults, the headline included), each asking
    for the next term, in the CodeMMLU report's Alpaca prompt."""
    seq = fibonacci(n_terms)
    items = [(HEADLINE_INPUT, "13")]
    for length in lengths:
        for start in range(0, n_terms - length):
            window = ", ".join(map(str, seq[start:start + length]))
            if window != HEADLINE_INPUT:
                items.append((window, str(seq[start + length])))
    if max_items is not None:
        items = items[:max_items]
    return Probe("fibonacci", [format_alpaca(FIBONACCI_INSTRUCTION, window) for window, _ in items],
                 [answer for _, answer in items], labels=[window for window, _ in items], scorer=next_term_match)


BUILTIN_PROBES = {"fibonacci": fibonacci_probe}  # probes a recipe file can name


def named_probe(probe) -> Probe:
    """``probe`` itself, or the built-in probe it names (``"fibonacci"``: :func:`fibonacci_probe`), as recipe files
    give them (``probes: [fibonacci]``)."""
    if isinstance(probe, Probe):
        return probe
    if isinstance(probe, str) and probe in BUILTIN_PROBES:
        return BUILTIN_PROBES[probe]()
    raise TypeError(f"probe {probe!r}: pass an llmft.probes.Probe (e.g. llmft.probes.custom_probe(name, pairs)) or "
                    f"the name of a built-in probe {sorted(BUILTIN_PROBES)}")


def custom_probe(name: str, pairs=None, *, dataset=None, question: str = "question", answer: str = "answer",
                 template: str = "chat", scorer: Callable[[str, str], bool] = exact_match) -> Probe:
    """A probe from ``(question, answer)`` pairs or a dataset with ``question``/``answer`` columns. ``template``:
    "chat" (a user message), "alpaca" (the Alpaca prompt of the NTUA lab report and the CodeMMLU report) or "raw" (the
    question as is)."""
    if (pairs is None) == (dataset is None):
        raise ValueError("custom_probe: give pairs or dataset, not both")
    if dataset is not None:
        missing = [c for c in (question, answer) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"custom_probe: dataset has no column(s) {missing}; it has {dataset.column_names}")
        pairs = list(zip(dataset[question], dataset[answer]))
    pairs = [(str(q), str(a)) for q, a in pairs]
    if template == "chat":
        prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    elif template == "alpaca":
        prompts = [format_alpaca(q) for q, _ in pairs]
    elif template == "raw":
        prompts = [q for q, _ in pairs]
    else:
        raise ValueError(f"custom_probe(template={template!r}): use 'chat', 'alpaca' or 'raw'")
    return Probe(name, prompts, [a for _, a in pairs], labels=[q[:60] for q, _ in pairs], scorer=scorer)


def score_answers(probe: Probe, generated: Sequence[str], model_name: str = "model", **columns):
    """A tidy DataFrame: one row per probe item with the generated answer kept and whether it is correct."""
    import pandas as pd

    return pd.DataFrame({
        "model": model_name, **columns, "probe": probe.name, "item": range(len(probe.prompts)),
        "input": probe.labels, "expected": probe.answers, "answer": [g.strip() for g in generated],
        "correct": [probe.scorer(g, a) for g, a in zip(generated, probe.answers)],
    })


def run_probe(model, tokenizer, probe: Probe, *, max_new_tokens: int = 8, batch_size: int = 32,
              model_name: str = "model", progress: bool = True, across_processes: bool = False):
    """Greedy, batched answers of ``model`` to every probe item, scored. ``across_processes``: under torchrun, the
    items are split among the processes and the answers gathered (see :func:`llmft.generate_batch`)."""
    from llmft.generation import generate_batch

    generated = generate_batch(model, tokenizer, probe.prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=progress, desc=f"probe {probe.name}", across_processes=across_processes)
    return score_answers(probe, generated, model_name)


def probe_models(model, tokenizer, probe: Probe, adapters: dict | None = None, *, include_base: bool = True,
                 cache_dir: str | os.PathLike = "outputs/probes", max_new_tokens: int = 8, batch_size: int = 32):
    """The probe on the base model (adapter disabled) and each named adapter directory, on one base in memory
    (answers cached on disk, see :func:`llmft.generation.generate_by_model`)."""
    import pandas as pd

    from llmft.generation import generate_by_model

    answers = generate_by_model(model, tokenizer, probe.prompts, adapters, include_base=include_base,
                                cache_dir=cache_dir, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return pd.concat([score_answers(probe, texts, name) for name, texts in answers.items()], ignore_index=True)


def probe_checkpoints(model, tokenizer, probe: Probe, run_dir: str | os.PathLike, *, include_base: bool = True,
                      cache_dir: str | os.PathLike | None = None, max_new_tokens: int = 8, batch_size: int = 32):
    """The probe across a run's checkpoints (step 0 = the base model): the data of a forgetting curve. Keep enough
    checkpoints for a curve (``save_total_limit=None`` or large in ``build_trainer``)."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"probe_checkpoints: no complete checkpoint-* with adapters in {run_dir}")
    adapters = {f"step-{step}": path for step, _, path in found}
    table = probe_models(model, tokenizer, probe, adapters, include_base=include_base,
                         cache_dir=cache_dir or Path(run_dir) / "probes", max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    steps = {f"step-{step}": (step, epoch) for step, epoch, _ in found}
    steps["base"] = (0, 0.0)
    table["step"] = [steps[m][0] for m in table["model"]]
    table["epoch"] = [steps[m][1] for m in table["model"]]
    return table.sort_values(["step", "item"], kind="stable").reset_index(drop=True)


def accuracy_by(table, by: str = "model"):
    """Probe accuracy per ``by`` (model, step, ...), with the headline item's answer beside it."""
    grouped = table.groupby(by, sort=False)
    out = grouped["correct"].mean().rename("probe_accuracy").to_frame()
    out["headline_answer"] = grouped.apply(lambda g: g.loc[g["item"] == 0, "answer"].iloc[0], include_groups=False)
    return out


def plot_forgetting(table, metrics=None, metric: str | None = None, path: str | os.PathLike | None = None,
                    title: str = "Forgetting curve"):
    """Probe accuracy against the training step (from :func:`probe_checkpoints`), with a task metric from the
    metrics CSV (``metrics``: a path, run directory, or DataFrame) on a second axis (``metric``: default eval_loss,
    else the train loss)."""
    import matplotlib.pyplot as plt

    curve = table.groupby("step")["correct"].mean()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(curve.index, curve.values, "o-", color="tab:red", label="probe accuracy")
    ax.set(xlabel="step", ylabel="probe accuracy", ylim=(-0.02, 1.02), title=title)
    if metrics is not None:
        from llmft.plots import load_metrics

        frame = load_metrics(metrics) if not hasattr(metrics, "columns") else metrics
        if metric is None:
            metric = "eval_loss" if "eval_loss" in frame and frame["eval_loss"].notna().any() else "loss"
        if metric in frame:
            points = frame[["step", metric]].dropna()
            twin = ax.twinx()
            twin.plot(points["step"], points[metric], "s--", color="tab:blue", label=metric)
            twin.set_ylabel(metric)
            twin.legend(loc="upper right")
    ax.legend(loc="lower left")
    from llmft.plots import save_figure

    return save_figure(fig, path)


def plot_probe_curves(runs: dict, probe: str, path: str | os.PathLike | None = None, *,
                      title: str = "Live probe during training"):
    """A live probe (``eval_probe/<probe>`` in each run's metrics CSV) against the step: the mean over the runs of
    each label with a band from its minimum to its maximum. ``runs``: ``{label: [metrics CSV paths or run
    directories]}`` (e.g. one label per variant, one path per seed)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from llmft.plots import _series, load_metrics, save_figure

    column = probe_metric(probe)
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, (label, sources) in enumerate(runs.items()):
        curves = [_series(load_metrics(source), column) for source in sources]
        curves = [c.set_index("step")[column] for c in curves if c is not None]
        if not curves:
            continue
        frame = pd.concat(curves, axis=1)
        ax.plot(frame.index, frame.mean(axis=1), "o-", color=f"C{index}", label=f"{label} (n={len(curves)})")
        ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=f"C{index}", alpha=0.2)
    ax.set(xlabel="step", ylabel=f"{probe} probe accuracy", ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
