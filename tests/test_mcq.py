"""MCQ data, training on the answer only, constrained scoring, extraction, submissions and majority vote."""
import math

import pandas as pd
import pytest
import torch
from datasets import Dataset

import llmft
from llmft import data, mcq, templates, testing

from conftest import TOL


class _Rows(list):
    @property
    def column_names(self):
        return list(self[0])


def test_messy_codemmlu_rows():
    rows = testing.codemmlu_rows(8, stringified_choices=True)
    rows[1]["answer"], rows[2]["answer"], rows[3]["answer"] = "Answer: C", " d ", "(b)"
    rows[4]["answer"] = "Z"  # not a choice
    rows[5]["answer"] = rows[5]["choices"] and eval(rows[5]["choices"])[2]  # the text of choice C
    ds, report = data.mcq_rows(Dataset.from_list(rows), eos_token="<e>", return_report=True, verbose=False)
    assert list(ds["answer"]) == [rows[0]["answer"], "C", "D", "B", "C", rows[6]["answer"], rows[7]["answer"]]
    assert report.skipped == {"answer not resolvable to one of the choices": ["task_0004"]} and report.unit == "task_ids"
    first = ds[0]
    assert first["prompt"].endswith("\nAnswer:") and first["n_choices"] == 4 and isinstance(first["choices"], list)
    assert first["completion"] == " " + first["answer"] + "<e>" and "text" not in ds.column_names
    assert first["prompt"] == templates.format_mcq(rows[0]["question"], first["choices"]).rstrip()


@pytest.mark.parametrize("value, expected", [
    ("B", "B"), (" c ", "C"), ("(D)", "D"), ("Answer: A", "A"), ("The correct answer is B", "B"), ("Đáp án: C", "C"),
    (2, "C"), ("E", None), (True, None), (None, None), ("second", "B"), ("maybe", None),
])
def test_normalize_answer(value, expected):
    assert data.normalize_answer(value, ["first", "second", "third", "fourth"]) == expected


def test_vietnamese_rows():
    rows = [{"question": "CPU là gì?", "answer_a": "Bộ xử lý", "answer_b": "Bộ nhớ", "answer_c": "Màn hình",
             "answer_d": "Chuột", "answer_key": "A"}]
    ds = data.mcq_rows(Dataset.from_list(rows), eos_token="<e>", verbose=False)
    assert ds[0]["choices"] == ["Bộ xử lý", "Bộ nhớ", "Màn hình", "Chuột"] and ds[0]["answer"] == "A"
    assert ds[0]["task_id"] == "row_0"


def test_an_empty_option_never_shifts_the_letters():
    row = {"question": "CPU là gì?", "answer_a": "Bộ xử lý", "answer_b": "", "answer_c": "Màn hình",
           "answer_d": "Chuột", "answer_key": "C"}
    # before: choices became [Bộ xử lý, Màn hình, Chuột] and "C" silently meant "Chuột"
    with pytest.raises(data.DataError, match=r"row 0 \(task_id row_0\), field 'answer_b': empty option before"):
        data.mcq_rows(Dataset.from_list([row]), eos_token="<e>", verbose=False)
    with pytest.raises(data.DataError, match="field 'answer_b'"):
        data.mcq_rows(Dataset.from_list([{**row, "answer_b": None}]), eos_token="<e>", verbose=False)
    three = data.mcq_rows(Dataset.from_list([{**row, "answer_b": "Bộ nhớ", "answer_d": ""}]), eos_token="<e>",
                          verbose=False)  # a trailing empty option is just a three-choice row
    assert three[0]["choices"] == ["Bộ xử lý", "Bộ nhớ", "Màn hình"] and three[0]["answer"] == "C"


@pytest.mark.parametrize("bad, message", [
    ({"choices": "[unclosed"}, r"row 1 \(task_id t1\), field 'choices': could not parse"),
    ({"choices": []}, r"row 1 \(task_id t1\), field 'choices': expected a non-empty list"),
    ({"question": " "}, r"row 1 \(task_id t1\), field 'question'"),
    ({"task_id": "t0"}, r"row 1, field 'task_id': duplicate task_id 't0'"),
])
def test_broken_mcq_rows(bad, message):
    good = {"task_id": "t0", "question": "q", "choices": ["a", "b"], "answer": "A"}
    with pytest.raises(data.DataError, match=message):
        data.mcq_rows(_Rows([good, {**good, "task_id": "t1", **bad}]), eos_token="<e>", verbose=False)


@pytest.fixture(scope="module")
def mcq_data():
    return data.mcq_rows(testing.tiny_codemmlu(40), eos_token="<|im_end|>", verbose=False)


def test_fractional_epoch_training_on_the_answer_only(lora_model, mcq_data, tmp_path):
    """mcq_rows' output goes straight into build_trainer (prompt/completion rows), with the loss on " A" + EOS: the
    letter token score_choices reads after the prompt, and the end of sequence."""
    model, tokenizer = lora_model
    trainer = llmft.build_trainer(
        model, tokenizer, mcq_data, num_train_epochs=0.2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=5e-3, output_dir=str(tmp_path), scheduler="chebyshev", verbose=False)
    assert len(trainer.train_dataset) == len(mcq_data) and trainer.llmft_reports["train_masking"].empty_rows == []
    for row, source in zip(trainer.train_dataset, mcq_data):
        kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        letter = tokenizer(" " + source["answer"], add_special_tokens=False)["input_ids"]
        assert kept == letter + [tokenizer.eos_token_id]  # " A" as one token, then EOS: nothing of the prompt
        prompt = tokenizer(source["prompt"])["input_ids"]
        assert row["input_ids"] == prompt + kept  # the context is the prompt as score_choices tokenizes it
    trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps == 2  # 0.2 x (40 rows / batch 4)
    assert (tmp_path / "metrics.csv").exists()


def test_a_question_quoting_the_answer_marker_trains_on_the_letter_only(lora_model, tmp_path):
    """Code questions often contain "Answer:"; the completion is located by the prompt, never by searching a marker."""
    model, tokenizer = lora_model
    rows = data.mcq_rows(Dataset.from_list([
        {"task_id": "t0", "question": "What does print('Answer:', 42) output?", "choices": ["Answer: 42", "42"],
         "answer": "A"},
        {"task_id": "t1", "question": "Which line prints\nAnswer: B?", "choices": ["x", "print('Answer: B')"],
         "answer": "B"}]), eos_token=tokenizer.eos_token, verbose=False)
    trainer = llmft.build_trainer(model, tokenizer, rows, max_steps=1, output_dir=str(tmp_path), verbose=False)
    for row, letter in zip(trainer.train_dataset, "AB"):
        kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(kept) == f" {letter}{tokenizer.eos_token}"


@pytest.mark.numeric
def test_constrained_scoring_matches_a_direct_computation(lora_model, mcq_data):
    model, tokenizer = lora_model
    prompts, n = list(mcq_data["prompt"][:5]), [2, 3, 4, 4, 4]
    scores = mcq.score_choices(model, tokenizer, prompts, n, batch_size=3, progress=False)
    assert list(scores.columns) == ["prediction", "logprob_A", "logprob_B", "logprob_C", "logprob_D"]
    model.eval()
    for i, (prompt, k) in enumerate(zip(prompts, n)):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logprobs = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        direct = [logprobs[tokenizer(" " + letter, add_special_tokens=False)["input_ids"][0]].item()
                  for letter in "ABCD"[:k]]
        # batched (left-padded) vs one prompt alone: equal up to the compute dtype's rounding (bf16: ~1e-2)
        batched = [scores.loc[i, f"logprob_{letter}"] for letter in "ABCD"[:k]]
        assert batched == pytest.approx(direct, **TOL)
        best = max(range(k), key=lambda j: direct[j])
        margin = direct[best] - max([v for j, v in enumerate(direct) if j != best], default=-math.inf)
        if margin > 2 * TOL["abs"]:  # a near-tie may flip within rounding; a clear winner may not
            assert scores.loc[i, "prediction"] == "ABCD"[best]
        assert scores.loc[i, "prediction"] == "ABCD"[max(range(k), key=lambda j: batched[j])]
        assert all(math.isnan(scores.loc[i, f"logprob_{letter}"]) for letter in "ABCD"[k:])


def test_constrained_scoring_computes_only_the_last_positions_logits(lora_model, mcq_data):
    model, tokenizer = lora_model
    shapes = []
    hook = model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    try:
        mcq.score_choices(model, tokenizer, list(mcq_data["prompt"][:3]), [4, 4, 4], batch_size=3, progress=False)
    finally:
        hook.remove()
    assert shapes == [(3, 1, len(tokenizer))]  # before: (3, prompt length, vocabulary)


def test_generation_and_extraction(lora_model, mcq_data):
    model, tokenizer = lora_model
    out = mcq.predict_by_generation(model, tokenizer, list(mcq_data["prompt"][:3]), [4, 4, 4], max_new_tokens=4,
                                          progress=False)
    assert list(out.columns) == ["generated", "prediction", "extracted"] and len(out) == 3
    assert all(p in "ABCD" for p in out["prediction"])
    assert all(out.loc[~out["extracted"], "prediction"] == "A")  # the fallback, flagged
    assert [mcq.extract_answer(t) for t in ["The answer is (B).", "I think C is correct.", "option d",
                                                  "B. Because", "a function, so A", "Answer: E", "none"]] == \
        ["B", "C", "D", "B", "A", None, None]


def test_accuracy_confusion_and_baseline():
    table = mcq.accuracy(["A", "B", "B", "C"], ["A", "B", "C", "C"], subsets=["x", "x", "y", "y"])
    assert table.loc["all", "accuracy"] == 0.75 and table.loc["y", "accuracy"] == 0.5 and table.loc["x", "n"] == 2
    assert mcq.majority_baseline(["A", "B", "B", "C"]) == ("B", 0.5)
    matrix = mcq.confusion(["A", "B", "B", "C"], ["A", "B", "C", "C"])
    assert matrix.loc["C", "B"] == 1 and matrix.loc["total", "total"] == 4



def test_accuracy_refuses_letters_it_would_silently_count_wrong():
    with pytest.raises(ValueError, match=r"accuracy: predictions must be capital letters A-J \(None for no answer\); "
                                         r"2 of 4 are not, at rows 0, 2 \(e.g. 'a', 'c'\).*not normalised.*upper\(\)"):
        mcq.accuracy(["a", "B", "c", "D"], ["A", "B", "C", "D"])  # was 0.5, silently
    with pytest.raises(ValueError, match=r"rows 1 \(e.g. ' B'\)"):
        mcq.accuracy(["A", " B"], ["A", "B"])
    with pytest.raises(ValueError, match=r"mcq.extract_answer"):
        mcq.accuracy(["The answer is A"], ["A"])
    with pytest.raises(ValueError, match=r"accuracy: answers must be capital letters A-J; 1 of 2 are not, at rows 1"):
        mcq.accuracy(["A", "B"], ["A", "b"])
    # no answer (predict_by_generation(fallback=None), or pandas' NaN) is a wrong answer, not an error
    table = mcq.accuracy(["A", None, float("nan"), "D"], ["A", "B", "C", "D"])
    assert table.loc["all", "accuracy"] == 0.5 and table.loc["all", "n"] == 4

@pytest.fixture()
def test_rows():
    return pd.DataFrame({"task_id": ["t1", "t2", "t3"], "n_choices": [4, 2, 4]})


def test_submission_writing_and_validation(tmp_path, test_rows):
    path = mcq.write_submission(["t1", "t2", "t3"], ["A", "B", "D"], tmp_path / "submission.csv", test_rows)
    assert path.read_text().splitlines() == ["task_id,answer", "t1,A", "t2,B", "t3,D"]
    mcq.validate_submission(path, test_rows)
    cases = [
        ((["t1", "t1", "t3"], ["A", "B", "C"]), "more than once: t1"),
        ((["t1", "t2"], ["A", "B"]), "without an answer: t3"),
        ((["t1", "t2", "t3", "t4"], ["A", "B", "C", "A"]), "not in the test set: t4"),
        ((["t1", "t2", "t3"], ["A", "C", "C"]), "outside the row's choices for task_ids: t2"),
        ((["t1", "t2", "t3"], ["A", "", "C"]), "empty answers for task_ids: t2"),
        ((["t1", "t2", "t3"], ["A", "b", "C"]), "capital letters A-J; not so for task_ids: t2"),
    ]
    for (ids, answers), message in cases:
        with pytest.raises(mcq.SubmissionError, match=message):
            mcq.write_submission(ids, answers, tmp_path / "bad.csv", test_rows)
    assert not (tmp_path / "bad.csv").exists()  # nothing written when invalid



def test_an_empty_submission_is_refused_with_the_file_named(tmp_path, test_rows):
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("task_id,answer\n")
    with pytest.raises(mcq.SubmissionError, match=r"header_only.csv: a header and no rows: a submission needs one row"):
        mcq.validate_submission(header_only)  # was accepted
    with pytest.raises(mcq.SubmissionError, match="a header and no rows"):
        mcq.write_submission([], [], tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(mcq.SubmissionError, match=r"empty.csv: the file is empty \(not even the header"):
        mcq.validate_submission(empty, test_rows)  # was pandas' EmptyDataError
    good = mcq.write_submission(["t1", "t2", "t3"], ["A", "B", "C"], tmp_path / "good.csv", test_rows)
    with pytest.raises(mcq.SubmissionError, match=r"empty.csv: the file is empty"):
        mcq.majority_vote([good, empty])
    with pytest.raises(mcq.SubmissionError, match=r"header_only.csv: a header and no rows"):
        mcq.majority_vote([good, header_only])

def test_majority_vote_with_priority_tie_break(tmp_path):
    answers = {"qwen": ["A", "B", "C", "D"], "llama": ["A", "C", "D", "D"], "phi": ["B", "C", "A", "B"]}
    paths = []
    for name, letters in answers.items():
        paths.append(mcq.write_submission(["t1", "t2", "t3", "t4"], letters, tmp_path / f"{name}.csv"))
    votes, report = mcq.majority_vote(paths, out_path=tmp_path / "vote.csv")
    # t1: A x2; t2: C x2; t3: three-way tie -> qwen (first) says C; t4: D x2
    assert list(votes["answer"]) == ["A", "C", "C", "D"]
    assert list(report["tie_broken"]) == [False, False, True, False]
    assert list(report["agreement"]) == pytest.approx([2 / 3, 2 / 3, 1 / 3, 2 / 3])
    votes2, _ = mcq.majority_vote(paths, priority=[paths[2], paths[1], paths[0]])
    assert list(votes2["answer"]) == ["A", "C", "A", "D"]  # phi first now wins the tie on t3
    assert (tmp_path / "vote.csv").read_text().splitlines()[1] == "t1,A"
    same_names = [mcq.write_submission(["t1"], [letter], tmp_path / run / "submission.csv")
                  for run, letter in (("run1", "A"), ("run2", "B"))]
    _, named = mcq.majority_vote(same_names)
    assert list(named.columns[1:3]) == ["run1/submission", "run2/submission"]
    short = mcq.write_submission(["t1"], ["A"], tmp_path / "short.csv")
    with pytest.raises(mcq.SubmissionError, match="covers different task_ids"):
        mcq.majority_vote([paths[0], short])
