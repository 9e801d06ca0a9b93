import pytest
from datasets import Dataset

from llmft import data, testing


def test_finetome_to_messages():
    ds, report = data.sharegpt_to_messages(testing.tiny_finetome(30), return_report=True, verbose=False)
    assert ds.column_names == ["messages"] and len(ds) == 30 and report.n_skipped == 0
    first = testing.finetome_rows(30)[0]["conversations"]
    assert ds[0]["messages"] == [{"role": "user", "content": first[0]["value"]},
                                 {"role": "assistant", "content": first[1]["value"]}]
    assert {m["role"] for row in ds["messages"] for m in row} == {"system", "user", "assistant"}


def _convs(*rows):
    return Dataset.from_list([{"conversations": r} for r in rows])


GOOD = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]


@pytest.mark.parametrize("bad, message", [
    ("just a string", r"row 1, field 'conversations': expected a list"),
    ([{"from": "human"}], r"row 1, field 'conversations\[0\]': missing 'value'"),
    ([{"value": "x"}], r"row 1, field 'conversations\[0\]': missing 'from'"),
    ([{"from": "robot", "value": "x"}], r"row 1, field 'conversations\[0\]'.from: unknown speaker 'robot'"),
])
def test_broken_sharegpt_rows_name_row_and_field(bad, message):
    rows = [{"conversations": GOOD}, {"conversations": bad}]
    # Dataset.from_list would coerce mixed types; build via Python rows the adapter iterates over.
    with pytest.raises(data.DataError, match=message):
        data.sharegpt_to_messages(_ListDataset(rows), verbose=False)


class _ListDataset(list):
    """A list of rows with the column_names attribute: malformed rows that Arrow itself would refuse to store."""

    @property
    def column_names(self):
        return list(self[0])


def test_skipped_rows_are_counted_and_reported(capsys):
    ds = _convs(GOOD, [{"from": "human", "value": "only a question"}], GOOD,
                [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], [])
    out, report = data.sharegpt_to_messages(ds, return_report=True)
    assert len(out) == 2 and report.rows_in == 5 and report.rows_out == 2
    assert report.skipped == {"no assistant turn": [1], "empty turn": [3], "empty conversation": [4]}
    printed = capsys.readouterr().out
    assert "5 rows in, 2 out, 3 skipped" in printed and "no assistant turn): rows 1" in printed


def test_missing_column_and_empty_result():
    with pytest.raises(data.DataError, match=r"no column\(s\) \['conversations'\].*has \['text'\]"):
        data.sharegpt_to_messages(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(data.DataError, match="no usable rows"):
        data.sharegpt_to_messages(_convs([{"from": "human", "value": "q"}]), verbose=False)


def test_alpaca_to_text_and_its_errors():
    rows = [{"instruction": "Add.", "input": "1, 2", "output": "3"},
            {"instruction": "Greet.", "input": None, "output": "Hi"},
            {"instruction": "Nothing.", "input": "", "output": ""}]
    ds, report = data.alpaca_to_text(Dataset.from_list(rows), "<e>", return_report=True, verbose=False)
    assert len(ds) == 2 and report.skipped == {"empty output": [2]}
    assert ds[0]["text"].endswith("### Input:\n1, 2\n\n### Response:\n3<e>")
    assert "### Input" not in ds[1]["text"] and ds[1]["text"].endswith("Hi<e>")
    with pytest.raises(data.DataError, match=r"row 1, field 'output': expected a string, got int"):
        data.alpaca_to_text(_ListDataset([rows[0], {"instruction": "x", "input": "", "output": 5}]), "<e>")
    with pytest.raises(data.DataError, match="eos_token"):
        data.alpaca_to_text(Dataset.from_list(rows), "")


def test_count_overlong(chat_dataset):
    tok = testing.tiny_tokenizer()
    lengths = data.sample_lengths(chat_dataset, tok)
    limit = sorted(lengths)[len(lengths) // 2]
    report = data.count_overlong(chat_dataset, tok, limit)
    assert report.overlong == [i for i, n in enumerate(lengths) if n > limit] and report.overlong
    assert f"{len(report.overlong)} longer than max_seq_length={limit}" in str(report)


def test_empty_system_turn_is_dropped_from_the_row_not_the_row(capsys):
    ds = _convs([{"from": "system", "value": ""}, *GOOD], [{"from": "system", "value": "  "}, *GOOD], GOOD,
                [{"from": "system", "value": "Be brief."}, *GOOD])
    out, report = data.sharegpt_to_messages(ds, return_report=True)
    assert len(out) == 4 and report.n_skipped == 0  # before: rows 0 and 1 skipped as "empty turn"
    assert out[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert out[3]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert report.dropped == {"empty system turn(s)": [0, 1]}
    assert "dropped 2 empty system turn(s) (the rows are kept): rows 0, 1" in capsys.readouterr().out
    empty_user = _convs([{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}], GOOD)
    assert data.sharegpt_to_messages(empty_user, return_report=True, verbose=False)[1].skipped == {"empty turn": [0]}


def test_one_dataset_mixing_from_value_and_role_content_turns():
    ds = Dataset.from_list([{"conversations": GOOD},
                            {"conversations": [{"role": "user", "content": "hey"},
                                               {"role": "assistant", "content": "yo"}]}])
    assert ds[1]["conversations"][0]["from"] is None  # Arrow gives every turn all four keys
    out = data.sharegpt_to_messages(ds, verbose=False)  # before: "row 1 ... missing 'from'"
    assert out[1]["messages"] == [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]
    assert out[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(data.DataError, match=r"row 1, field 'conversations\[0\]': missing 'from' \(or 'role'\)"):
        data.sharegpt_to_messages(_ListDataset([{"conversations": GOOD},
                                                {"conversations": [{"content": "x", "from": None}]}]),
                                  verbose=False)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": [{"role": "robot", "content": "hi"}]}, r"row 1, field 'prompt\[0\]'.role: unknown role 'robot'"),
    ({"prompt": [{"role": "human", "content": "hi"}]}, r"unknown role 'human'.*did you mean 'user'"),
    ({"prompt": [{"role": "user", "content": 3}]}, r"row 1, field 'prompt\[0\]'.content: expected a string"),
    ({"prompt": ["hi"]}, r"row 1, field 'prompt\[0\]': expected a \{'role'"),
    ({"chosen": ["good"]}, r"row 1, field 'chosen\[0\]': expected a \{'role'"),  # before: AttributeError
    ({"chosen": [{"role": "user", "content": "good"}]}, r"row 1, field 'chosen\[0\]'.role: unknown role 'user'"),
    ({"rejected": []}, r"row 1, field 'rejected': expected one assistant message, got 0"),
])
def test_preference_pairs_validate_roles_and_raise_data_errors(bad, message):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    with pytest.raises(data.DataError, match=message):
        data.preference_pairs(_ListDataset([good, {**good, **bad}]), verbose=False)
    assert len(data.preference_pairs(_ListDataset([good]), verbose=False)) == 1


def test_missing_chat_template_gets_llmfts_message(chat_dataset):
    tokenizer = testing.tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template, and the 'messages' rows need one.*'llama-3.1'"):
        data.sample_lengths(chat_dataset, tokenizer)  # before: transformers' own error from apply_chat_template
