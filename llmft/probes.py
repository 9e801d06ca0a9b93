"""Forgetting probes: prompts with known answers that a model should keep answering while it is fine-tuned on
something else.

The built-in probe is the CodeMMLU report's: the Alpaca prompt "Continue the fibonnaci sequence." (the CodeMMLU report's
spelling) with input "1, 1, 2, 3, 5, 8" and answer 13, plus windows of the sequence at other offsets and lengths. A
probe is scored by exact match on the next term, and every answer is kept so you can see *how* it fails (the CodeMMLU
report's model answered "2" after one epoch). Probes run on a model, on base vs adapters, or across a run's checkpoints,
and give a tidy DataFrame and a forgetting curve.

A probe measures what the base *knows*, so on a real model it is first calibrated on the base
(:func:`calibrate_probe`): only the items the base answers right are kept, the base's score is recorded, and after
fine-tuning the probe's accuracy is the *retention* (the share of those items still right). Knowledge probes beyond
Fibonacci (:func:`sequence_probe`: arithmetic, geometric, squares, ...; :func:`facts_probe`: capitals, days, months,
letters) come in two prompt formats: ``"raw"`` continuation ("2, 4, 6, 8, 10," → "12"; what base models and small
instruct models answer best) and ``"chat"`` (a question in the model's chat template, for instruct models). Answers
are read with a short lead-in tolerated ("The next number is 12", or the input restated before the next term).
"""
from __future__ import annotations

import os
import re
import warnings
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


def next_term(generated: str, context: Sequence[str] | None = None) -> str | None:
    """The term an answer gives next: its first number, after skipping a restatement of the input (``context``, the
    given terms) that ends at the input's last term ("1, 1, 2, 3, 5, 8, 13" or "8, 13" after "1, 1, 2, 3, 5, 8" give
    "13"; "1, 2, 4, 8, 13" gives "1")."""
    numbers = re.findall(r"-?\d+", generated)
    given = [str(c).strip() for c in context or []]
    for start in range(len(given)):
        run = given[start:]
        if numbers[:len(run)] == run and len(numbers) > len(run):
            return numbers[len(run)]
    return numbers[0] if numbers else None


def next_term_match(generated: str, expected: str, context: Sequence[str] | None = None) -> bool:
    """Exact match of the next term in the answer with the expected one ("13." and " 13, 21" count; with ``context``
    the input restated before it is skipped, see :func:`next_term`)."""
    return next_term(generated, context) == expected.strip()


LEAD_IN_WORDS = 6  # words an answer may spend before the expected one ("The capital of France is Paris.")


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['-][^\W_]+)*", text.lower())


def word_answer_match(generated: str, expected: str, context: Sequence[str] | None = None) -> bool:
    """The expected word(s) (case-insensitive, whole words) start within the first :data:`LEAD_IN_WORDS` words of the
    answer, after the words of ``context`` (the prompt's own words, which a chat answer often repeats): " Paris." and
    "The capital of France is Paris." count for "Paris"; "It is a city in the north, and its largest is Paris" does
    not (the answer comes too late). A lead-in that names something else first ("Lyon, not Paris") still counts:
    short answers are assumed to answer."""
    words, target = _words(generated), _words(expected)
    skip = {w for c in context or [] for w in _words(str(c))}
    lead_in = 0
    for i in range(len(words)):
        if words[i:i + len(target)] == target:
            return True
        if words[i] not in skip:
            lead_in += 1
        if lead_in >= LEAD_IN_WORDS:
            return False
    return False


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
    scorer: Callable[..., bool] = exact_match  # the first item is the headline, reported on its own
    # What each item gives (e.g. the terms of its sequence), passed to the scorer as its third argument so that an
    # answer restating it is read right; None: the scorer is called with (generated, expected) only.
    contexts: list | None = None
    # Set by calibrate_probe: {"base_accuracy", "candidates", "kept", "model"}; the probe then holds only the items
    # the base answered right, and its accuracy after fine-tuning is the retention.
    calibration: dict | None = None

    def __post_init__(self):
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"Probe {self.name!r}: {len(self.prompts)} prompts but {len(self.answers)} answers")
        if not self.prompts:
            raise ValueError(f"Probe {self.name!r}: no items")
        if not self.labels:
            self.labels = [str(p)[:60] for p in self.prompts]
        if self.contexts is not None and len(self.contexts) != len(self.prompts):
            raise ValueError(f"Probe {self.name!r}: {len(self.prompts)} prompts but {len(self.contexts)} contexts")

    def correct(self, generated: Sequence[str]) -> list[bool]:
        """Whether each answer (one per item, in order) is right."""
        if self.contexts is None:
            return [bool(self.scorer(g, a)) for g, a in zip(generated, self.answers)]
        return [bool(self.scorer(g, a, c)) for g, a, c in zip(generated, self.answers, self.contexts)]

    def subset(self, items: Sequence[int], name: str | None = None) -> "Probe":
        """The probe restricted to ``items`` (indices, in that order)."""
        items = list(items)
        pick = (lambda values: [values[i] for i in items])
        return Probe(name or self.name, pick(self.prompts), pick(self.answers), pick(self.labels), self.scorer,
                     None if self.contexts is None else pick(self.contexts), self.calibration)

    def __add__(self, other: "Probe") -> "Probe":
        """Two probes' items as one probe (named ``a+b``); each item keeps its own scorer."""
        items = [(self, i) for i in range(len(self.prompts))] + [(other, i) for i in range(len(other.prompts))]
        scorers = {id(p.scorer): p.scorer for p, _ in items}
        if len(scorers) == 1 and (self.contexts is None) == (other.contexts is None):
            scorer, contexts = self.scorer, (None if self.contexts is None else self.contexts + other.contexts)
        else:  # mixed scorers: each item carries (scorer, context)
            scorer = _per_item
            contexts = [(p.scorer, None if p.contexts is None else p.contexts[i]) for p, i in items]
        return Probe(f"{self.name}+{other.name}", self.prompts + other.prompts, self.answers + other.answers,
                     self.labels + other.labels, scorer, contexts)


def _per_item(generated: str, expected: str, context) -> bool:
    scorer, item_context = context
    return scorer(generated, expected) if item_context is None else scorer(generated, expected, item_context)


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
                 [answer for _, answer in items], labels=[window for window, _ in items], scorer=next_term_match,
                 contexts=[window.split(", ") for window, _ in items])


PROMPT_FORMATS = ("raw", "chat")
NEXT_NUMBER_QUESTION = "What is the next number in the sequence {terms}? Answer with the number only."


def _check_format(who: str, prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{who}(prompt_format={prompt_format!r}): use 'raw' (continuation, base models and small "
                         "instruct models) or 'chat' (a question in the chat template, instruct models)")


def sequence_items(n_terms: int = 5) -> list[tuple[str, list[int], int]]:
    """``(family, terms, next term)`` for simple integer sequences a pretrained model can continue: arithmetic (start
    1-20, step 1-12; and counting down by 1-10 from 60-100), doubling/tripling/x10, squares, cubes, triangular
    numbers, powers of two, at several offsets; each shown with ``n_terms`` terms. Deterministic, ~400 items."""
    items: list[tuple[str, list[int], int]] = []

    def add(family: str, seq: Sequence[int]) -> None:
        for offset in range(len(seq) - n_terms):
            items.append((family, list(seq[offset:offset + n_terms]), seq[offset + n_terms]))

    for step in range(1, 13):
        for start in range(1, 21):
            items.append(("arithmetic", [start + step * k for k in range(n_terms)], start + step * n_terms))
    for step in range(1, 11):
        for start in range(60, 101, 10):
            items.append(("countdown", [start - step * k for k in range(n_terms)], start - step * n_terms))
    for ratio in (2, 3, 10):
        for start in (1, 2, 3, 5):
            add(f"times-{ratio}", [start * ratio ** k for k in range(n_terms + 3)])
    add("squares", [k * k for k in range(1, 16)])
    add("cubes", [k ** 3 for k in range(1, 11)])
    add("triangular", [k * (k + 1) // 2 for k in range(1, 16)])
    return items


def sequence_probe(prompt_format: str = "raw", n_terms: int = 5, max_items: int | None = None) -> Probe:
    """Next term of simple integer sequences (:func:`sequence_items`). ``"raw"``: the terms followed by a comma
    ("2, 4, 6, 8, 10," → "12"); ``"chat"``: :data:`NEXT_NUMBER_QUESTION` as a user message. Scored by
    :func:`next_term_match` with the terms as context (a restated input is skipped)."""
    _check_format("sequence_probe", prompt_format)
    items = sequence_items(n_terms)[:max_items]
    windows = [", ".join(map(str, terms)) for _, terms, _ in items]
    prompts = [w + "," if prompt_format == "raw" else [{"role": "user", "content": NEXT_NUMBER_QUESTION.format(
        terms=w)}] for w in windows]
    return Probe("sequences", prompts, [str(nxt) for _, _, nxt in items], labels=windows, scorer=next_term_match,
                 contexts=[[str(t) for t in terms] for _, terms, _ in items])


CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Greece", "Athens"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("England", "London"), ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("the Czech Republic", "Prague"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Israel", "Jerusalem"), ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Mexico", "Mexico City"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Brazil", "Brasilia"),
    ("the United States", "Washington"), ("Switzerland", "Bern"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Iceland", "Reykjavik"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("Saudi Arabia", "Riyadh"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Jordan", "Amman"),
    ("Qatar", "Doha"), ("Bangladesh", "Dhaka"), ("Sri Lanka", "Colombo"), ("Mongolia", "Ulaanbaatar"),
    ("North Korea", "Pyongyang"), ("Taiwan", "Taipei"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"),
    ("Bolivia", "La Paz"), ("Ecuador", "Quito"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"),
    ("Algeria", "Algiers"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Zimbabwe", "Harare"),
    ("Uganda", "Kampala"), ("Tanzania", "Dodoma"), ("Jamaica", "Kingston"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Estonia", "Tallinn"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
    ("Albania", "Tirana"), ("Armenia", "Yerevan"), ("Georgia", "Tbilisi"), ("Azerbaijan", "Baku"),
    ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"),
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]


def fact_items() -> list[tuple[str, str, str, str]]:
    """``(family, raw continuation, chat question, answer)`` for well-known facts: capitals of ~100 countries, and
    the next item of the days of the week, the months, the alphabet, number words and the planets (from several
    starting points). Deterministic, ~200 items."""
    items = [("capital", f"The capital of {country} is", f"What is the capital of {country}? Answer in one word.",
              city) for country, city in CAPITALS]
    cyclic = [("day", _DAYS, 3, "the days of the week"), ("month", _MONTHS, 3, "the months")]
    linear = [("letter", [chr(c) for c in range(ord("A"), ord("Z") + 1)], 4, "the alphabet"),
              ("number word", _NUMBER_WORDS, 3, "the numbers in words"), ("planet", _PLANETS, 3, "the planets")]
    windows = [(family, (values * 2)[start:start + shown + 1], what)
               for family, values, shown, what in cyclic for start in range(len(values))]
    windows += [(family, values[start:start + shown + 1], what)
                for family, values, shown, what in linear for start in range(len(values) - shown)]
    for family, values, what in windows:
        window = ", ".join(values[:-1])
        items.append((family, window + ",", f"Continue {what}: {window}, ... Answer with the next one only.",
                      values[-1]))
    return items


def facts_probe(prompt_format: str = "raw", max_items: int | None = None) -> Probe:
    """Well-known facts (:func:`fact_items`): ``"raw"`` continuation ("The capital of France is" → "Paris") or a
    ``"chat"`` question. Scored by :func:`word_answer_match` (a short lead-in is tolerated)."""
    _check_format("facts_probe", prompt_format)
    items = fact_items()[:max_items]
    prompts = [raw if prompt_format == "raw" else [{"role": "user", "content": chat}] for _, raw, chat, _ in items]
    return Probe("facts", prompts, [answer for *_, answer in items], labels=[raw for _, raw, _, _ in items],
                 scorer=word_answer_match, contexts=[[raw] for _, raw, _, _ in items])


def knowledge_probe(prompt_format: str = "raw") -> Probe:
    """:func:`sequence_probe` and :func:`facts_probe` together (~600 candidates, named "knowledge"): the candidate
    pool to calibrate on a real model (:func:`calibrate_probe`)."""
    probe = sequence_probe(prompt_format) + facts_probe(prompt_format)
    probe.name = "knowledge"
    return probe


BUILTIN_PROBES = {"fibonacci": fibonacci_probe, "sequences": sequence_probe, "facts": facts_probe,
                  "knowledge": knowledge_probe}  # probes a recipe file can name

MIN_CALIBRATED_ITEMS = 50  # fewer items than this measure forgetting too coarsely (a step of 2% or more)


def calibrate_probe(model, tokenizer, probe: Probe, *, min_items: int = MIN_CALIBRATED_ITEMS,
                    max_new_tokens: int = 16, batch_size: int = 32, model_name: str = "base",
                    progress: bool = True):
    """Keep the items of ``probe`` that the base ``model`` answers right (greedy): a probe of what this model knows.
    Returns ``(calibrated probe, base table)``: the probe (same name) holds the kept items and
    ``calibration = {"base_accuracy", "candidates", "kept", "model"}``; its accuracy after fine-tuning is the
    retention (share of the base's right answers still right, see :func:`retention`). Warns when fewer than
    ``min_items`` items are kept: then the probe cannot measure forgetting on this model (try the other prompt
    format, more tokens, or more candidates). With no item kept it raises."""
    table = run_probe(model, tokenizer, probe, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      model_name=model_name, progress=progress)
    kept = [int(i) for i in table.loc[table["correct"], "item"]]
    base_accuracy = float(table["correct"].mean())
    advice = (f"the base answers {len(kept)} of {len(probe.prompts)} items of probe {probe.name!r} right "
              f"({base_accuracy:.0%}) at max_new_tokens={max_new_tokens}")
    if not kept:
        raise ValueError(f"calibrate_probe: {advice}: nothing to measure forgetting with. Look at the answers "
                         "(the returned table of run_probe) and try the other prompt format ('raw' continuation for "
                         "base and small instruct models, 'chat' for instruct models), a larger max_new_tokens, or "
                         "a probe of things this model knows.")
    if len(kept) < min_items:
        warnings.warn(f"calibrate_probe: {advice}: fewer than {min_items}, too few to measure forgetting on this "
                      "model (each item moves retention by "
                      f"{1 / len(kept):.0%}). Add candidates, try the other prompt format or a larger max_new_tokens.",
                      UserWarning, stacklevel=2)
    calibrated = probe.subset(kept)
    calibrated.calibration = {"base_accuracy": base_accuracy, "candidates": len(probe.prompts), "kept": len(kept),
                              "model": model_name, "max_new_tokens": max_new_tokens}
    return calibrated, table


def retention(table, by: str = "model"):
    """Retention per ``by`` (model, step, ...) on a calibrated probe's table (:func:`run_probe` /
    :func:`probe_models`): the share of the base's right answers still right, with its count."""
    grouped = table.groupby(by, sort=False)["correct"]
    return grouped.agg(retention="mean", still_right="sum", items="size")


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
        "correct": probe.correct(generated),
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
