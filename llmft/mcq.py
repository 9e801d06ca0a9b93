"""Multiple-choice answers: constrained scoring of the choice letters, answer extraction from generated text,
accuracy and confusion, Kaggle ``submission.csv`` writing and validation, and majority vote across models.

Prompts come from :func:`llmft.data.mcq_rows` (they end with "Answer:"; the answer is " A", " B", ...).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from llmft.templates import CHOICE_LETTERS, answer_letter


class SubmissionError(ValueError):
    """A submission that Kaggle would reject or score wrongly; the message lists the offending task_ids."""


def _letter_token_ids(tokenizer, n: int) -> list[int]:
    ids = []
    for letter in CHOICE_LETTERS[:n]:
        tokens = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"score_choices: ' {letter}' is {len(tokens)} tokens for this tokenizer; constrained "
                             "scoring needs one token per letter (use predict_by_generation instead)")
        ids.append(tokens[0])
    return ids


def score_choices(model, tokenizer, prompts: Sequence[str], n_choices: Sequence[int], *, batch_size: int = 8,
                  progress: bool = True):
    """Constrained prediction: the log-probability of each valid letter (" A", " B", ...) as the next token after
    each prompt, and the argmax. Always returns a valid letter, in one forward pass per batch. Returns a DataFrame
    with ``prediction`` and ``logprob_A`` ... per row (NaN for letters beyond a row's choices)."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from llmft.generation import inference_mode, left_padding

    if len(prompts) != len(n_choices):
        raise ValueError(f"score_choices: {len(prompts)} prompts but {len(n_choices)} n_choices")
    width = max(n_choices) if n_choices else 0
    letter_ids = _letter_token_ids(tokenizer, width)
    rows = []
    with left_padding(tokenizer), inference_mode(model), torch.no_grad(), \
            tqdm(total=len(prompts), desc="scoring choices", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = [p.rstrip() for p in prompts[start:start + batch_size]]
            inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            # Only the last position's logits: the full (batch, length, vocabulary) tensor would be the largest
            # of the run on a T4 with a 151k-token vocabulary. Left padding makes -1 the last real token.
            logits = model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, letter_ids].cpu()
            for k, n in enumerate(n_choices[start:start + batch_size]):
                values = logprobs[k, :n].tolist()
                best = max(range(n), key=lambda j: values[j])
                rows.append({"prediction": CHOICE_LETTERS[best],
                             **{f"logprob_{CHOICE_LETTERS[j]}": (values[j] if j < n else float("nan"))
                                for j in range(width)}})
            bar.update(len(chunk))
    return pd.DataFrame(rows)


def extract_answer(text: str, n_choices: int = 4) -> str | None:
    """The answer letter in generated text, or None (see :func:`llmft.templates.answer_letter`)."""
    return answer_letter(text, n_choices, whole=False)


def predict_by_generation(model, tokenizer, prompts: Sequence[str], n_choices: Sequence[int], *,
                          max_new_tokens: int = 16, batch_size: int = 8, fallback: str | None = "A", **options):
    """Generate (greedy, batched, progress bar) and extract a letter from each answer. Rows where no letter can be
    found get ``fallback`` (a submission needs an answer for every row; None keeps them empty) and are flagged in
    the ``extracted`` column. Returns a DataFrame with ``generated``, ``prediction``, ``extracted``."""
    import pandas as pd

    from llmft.generation import generate_batch

    texts = generate_batch(model, tokenizer, [p.rstrip() for p in prompts], batch_size=batch_size,
                           max_new_tokens=max_new_tokens, desc="generating answers", **options)
    letters = [extract_answer(t, n) for t, n in zip(texts, n_choices)]
    return pd.DataFrame({"generated": texts, "prediction": [l or fallback for l in letters],
                         "extracted": [l is not None for l in letters]})


def accuracy(predictions: Sequence[str], answers: Sequence[str], subsets: Sequence[str] | None = None):
    """Accuracy overall and per subset (e.g. CodeMMLU's task families): a DataFrame with ``n`` and ``accuracy``,
    the ``all`` row first."""
    import pandas as pd

    if len(predictions) != len(answers):
        raise ValueError(f"accuracy: {len(predictions)} predictions but {len(answers)} answers")
    predictions, answers = list(predictions), list(answers)
    _refuse_non_letters("predictions", predictions, no_answer_ok=True)
    _refuse_non_letters("answers", answers, no_answer_ok=False)
    frame = pd.DataFrame({"prediction": predictions, "answer": answers,
                          "subset": list(subsets) if subsets is not None else "all"})
    frame["correct"] = frame["prediction"] == frame["answer"]
    rows = [("all", len(frame), frame["correct"].mean() if len(frame) else float("nan"))]
    if subsets is not None:
        rows += [(name, len(g), g["correct"].mean()) for name, g in frame.groupby("subset", sort=True)]
    return pd.DataFrame(rows, columns=["subset", "n", "accuracy"]).set_index("subset")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None, or pandas' NaN


def _refuse_non_letters(name: str, values: list, *, no_answer_ok: bool) -> None:
    """Refuse (not normalise) anything but a capital choice letter: a lowercase "a" or a padded " A" compared as is
    would count as wrong without a word, and the same answer is refused in a submission (:func:`validate_submission`).
    ``no_answer_ok``: None/NaN is a prediction without an answer (wrong), as :func:`predict_by_generation` gives."""
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or len(v) != 1 or v not in CHOICE_LETTERS]
    if no_answer_ok:
        bad = [i for i in bad if not _is_missing(values[i])]
    if not bad:
        return
    examples = ", ".join(repr(values[i]) for i in bad[:3])
    raise ValueError(
        f"accuracy: {name} must be capital letters {CHOICE_LETTERS[0]}-{CHOICE_LETTERS[-1]}"
        + (" (None for no answer)" if no_answer_ok else "") + f"; {len(bad)} of {len(values)} are not, at rows "
        f"{_show(bad)} (e.g. {examples}). They are not normalised: for lowercase or padded letters pass "
        "[str(p).strip().upper() for p in ...]; for generated text, mcq.extract_answer(text) or predict_by_generation")


def majority_baseline(answers: Sequence[str]) -> tuple[str, float]:
    """The most frequent gold letter and the accuracy of always answering it: the bar a model must clear."""
    counts = Counter(answers)
    letter, n = max(sorted(counts.items()), key=lambda item: item[1])
    return letter, n / len(answers)


def confusion(predictions: Sequence[str], answers: Sequence[str]):
    """Gold letter (rows) × predicted letter (columns) counts, with totals: shows a bias toward one letter at once."""
    import pandas as pd

    return pd.crosstab(pd.Series(list(answers), name="gold"), pd.Series(list(predictions), name="predicted"),
                       margins=True, margins_name="total")


def write_submission(task_ids: Sequence[str], predictions: Sequence[str], path: str | os.PathLike = "submission.csv",
                     test_rows=None) -> Path:
    """Write a Kaggle ``submission.csv`` (``task_id,answer``), validated first (against ``test_rows`` from
    :func:`llmft.data.mcq_rows` when given), and written atomically (by the main process only under torchrun)."""
    from llmft.environment import is_main_process

    import pandas as pd

    frame = pd.DataFrame({"task_id": [str(t) for t in task_ids], "answer": list(predictions)})
    validate_submission(frame, test_rows)
    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def _show(ids) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:10])) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")


def read_submission(path: str | os.PathLike):
    """A ``submission.csv`` as a DataFrame of strings (no NaN guessing); an empty file is a :class:`SubmissionError`
    naming it, not pandas' ``EmptyDataError``."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SubmissionError(f"{path}: the file is empty (not even the header 'task_id,answer'); it was probably "
                              "written by a run that stopped early: write it again with "
                              "llmft.mcq.write_submission(task_ids, predictions, path, test_rows=...)") from None


def validate_submission(submission, test_rows=None) -> None:
    """Raise :class:`SubmissionError` unless the submission has columns ``task_id,answer``, each task_id once, no
    empty answer, and (with ``test_rows``) exactly the test set's task_ids with answers within each row's choices."""
    where = f"{submission}: " if isinstance(submission, (str, os.PathLike)) else ""
    frame = read_submission(submission) if where else submission.astype(str)
    if list(frame.columns) != ["task_id", "answer"]:
        raise SubmissionError(f"{where}columns must be exactly ['task_id', 'answer'], got {list(frame.columns)}")
    if frame.empty:
        raise SubmissionError(f"{where}a header and no rows: a submission needs one row (task_id,answer) per test "
                              "task_id; write it with llmft.mcq.write_submission(task_ids, predictions, path, "
                              "test_rows=...)")
    duplicated = frame.loc[frame["task_id"].duplicated(), "task_id"]
    if len(duplicated):
        raise SubmissionError(f"task_ids appear more than once: {_show(duplicated.unique())}")
    empty = frame.loc[frame["answer"].str.strip() == "", "task_id"]
    if len(empty):
        raise SubmissionError(f"empty answers for task_ids: {_show(empty)}")
    bad = frame.loc[~frame["answer"].isin(list(CHOICE_LETTERS)), "task_id"]
    if len(bad):
        raise SubmissionError(f"answers must be capital letters A-J; not so for task_ids: {_show(bad)}")
    if test_rows is None:
        return
    expected = {str(t): int(n) for t, n in zip(test_rows["task_id"], test_rows["n_choices"])}
    got = dict(zip(frame["task_id"], frame["answer"]))
    missing, extra = [t for t in expected if t not in got], [t for t in got if t not in expected]
    if missing:
        raise SubmissionError(f"task_ids of the test set without an answer: {_show(missing)}")
    if extra:
        raise SubmissionError(f"task_ids not in the test set: {_show(extra)}")
    outside = [t for t, a in got.items() if CHOICE_LETTERS.index(a) >= expected[t]]
    if outside:
        raise SubmissionError(f"answers outside the row's choices for task_ids: {_show(outside)}")


def majority_vote(csv_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None,
                  priority: Sequence[str | os.PathLike] | None = None):
    """Combine several models' submissions per task_id by majority vote.

    Ties are broken by model priority: among the tied letters, the one chosen by the highest-priority model wins
    (``priority`` lists the CSVs best first; default: the order of ``csv_paths``). Every CSV must cover the same
    task_ids. Returns ``(votes, report)``: the voted submission (written to ``out_path`` when given, validated) and
    a per-task table (each model's answer, the winner, how many agreed, whether a tie was broken)."""
    import pandas as pd

    if len(csv_paths) < 2:
        raise ValueError("majority_vote: give at least two submission CSVs")
    order = [str(p) for p in (priority or csv_paths)]
    if sorted(order) != sorted(map(str, csv_paths)):
        raise ValueError("majority_vote: priority must list the same CSVs as csv_paths")
    frames = {}
    for path in csv_paths:
        validate_submission(path)  # its errors name the file
        frame = read_submission(path)
        frames[str(path)] = frame.set_index("task_id")["answer"]
    ids = list(frames[str(csv_paths[0])].index)
    for path, series in frames.items():
        if set(series.index) != set(ids):
            raise SubmissionError(f"{path} covers different task_ids than {csv_paths[0]}: "
                                  f"{_show(set(series.index) ^ set(ids))}")
    names = {p: Path(p).stem for p in frames}
    if len(set(names.values())) < len(names):  # e.g. several runs' "submission.csv": name them by folder too
        names = {p: f"{Path(p).parent.name}/{Path(p).stem}" for p in frames}
    report_rows = []
    for tid in ids:
        answers = {p: frames[p][tid] for p in order}
        counts = Counter(answers.values())
        top = max(counts.values())
        tied = {letter for letter, c in counts.items() if c == top}
        winner = next(answers[p] for p in order if answers[p] in tied)
        report_rows.append({"task_id": tid, **{names[p]: answers[p] for p in order}, "answer": winner,
                            "agreement": top / len(order), "tie_broken": len(tied) > 1})
    report = pd.DataFrame(report_rows)
    votes = report[["task_id", "answer"]].copy()
    if out_path is not None:
        write_submission(votes["task_id"], votes["answer"], out_path)
    return votes, report
