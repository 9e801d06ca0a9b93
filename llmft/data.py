"""Hub-shaped datasets → trainer-ready datasets, with row-level checks.

Each adapter reads rows in the shape users load from the hub and returns a ``datasets.Dataset`` in the shape TRL
expects (``messages`` for chat data, ``text`` for plain prompts, ``prompt``/``completion`` for multiple-choice answers,
conversational ``prompt``/``chosen``/``rejected`` for DPO). A malformed row raises :class:`DataError` naming the
row index and the field, with a hint. Rows left out on purpose (nothing to learn from them) are counted and reported
in a :class:`DataReport`, printed by default; nothing is dropped silently.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

import ast
import json
import random

from llmft.log import say
from llmft.templates import CHOICE_LETTERS, answer_letter, format_alpaca, format_mcq

# ShareGPT speaker names → chat roles (FineTome uses human/gpt; other dumps use user/assistant/model/bing/chatgpt).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "system": "system",
}
_PROGRESS_MIN_ROWS = 20_000  # show a progress bar on datasets at least this big


class DataError(ValueError):
    """A row that cannot be converted: the message names the row index, the field and how to fix it."""


def shorten(items, limit: int = 10) -> str:
    """The first ``limit`` row indices (or ids) of a report, then "...": what messages show of a long list."""
    return ", ".join(map(str, items[:limit])) + (", ..." if len(items) > limit else "")


@dataclass
class DataReport:
    """What an adapter did: rows in, rows out, rows skipped per reason (with their indices), over-long rows."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    skipped: "OrderedDict[str, list[int]]" = field(default_factory=OrderedDict)
    overlong: list[int] = field(default_factory=list)
    max_seq_length: int | None = None
    unit: str = "rows"  # what the skipped identifiers are: row indices, or e.g. task_ids
    # parts removed from rows that were kept (e.g. empty system turns), per reason, with the row of each
    dropped: "OrderedDict[str, list[int]]" = field(default_factory=OrderedDict)

    def skip(self, reason: str, index: int) -> None:
        self.skipped.setdefault(reason, []).append(index)

    def drop(self, reason: str, index: int) -> None:
        """Count a part (a turn, a field) removed from row ``index``, which itself is kept."""
        self.dropped.setdefault(reason, []).append(index)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.rows_in} rows in, {self.rows_out} out, {self.n_skipped} skipped"]
        for reason, idx in self.skipped.items():
            shown = shorten(idx)
            lines.append(f"  skipped {len(idx)} ({reason}): {self.unit} {shown}")
        for reason, idx in self.dropped.items():
            shown = shorten(idx)
            lines.append(f"  dropped {len(idx)} {reason} (the rows are kept): {self.unit} {shown}")
        if self.max_seq_length is not None:
            shown = shorten(self.overlong)
            lines.append(f"  {len(self.overlong)} longer than max_seq_length={self.max_seq_length} tokens"
                         + (f" (truncated in training): rows {shown}" if self.overlong else ""))
        return "\n".join(lines)


def _require_columns(dataset, columns, adapter: str, hint: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{adapter}: the dataset has no column(s) {missing}; it has {dataset.column_names}. {hint}")


def _rows(dataset, desc: str):
    return tqdm(dataset, desc=desc, total=len(dataset), disable=len(dataset) < _PROGRESS_MIN_ROWS)


def _finish(rows_out: list[dict], report: DataReport, verbose: bool, return_report: bool):
    from datasets import Dataset

    report.rows_out = len(rows_out)
    if not rows_out:
        raise DataError(f"{report.name}: no usable rows left.\n{report}")
    say(report, verbose)
    dataset = Dataset.from_list(rows_out)
    return (dataset, report) if return_report else dataset


def sharegpt_to_messages(dataset, *, column: str = "conversations", verbose: bool = True,
                         return_report: bool = False):
    """ShareGPT/FineTome rows (``conversations`` = list of ``{from, value}``) → a dataset with one ``messages``
    column of ``{role, content}`` turns, ready for ``build_trainer``.

    Turns may be ShareGPT ``{from, value}`` or chat ``{role, content}``, mixed within one dataset (Arrow then gives
    every turn all four keys, the absent ones None: a key holding None counts as absent). Raises :class:`DataError`
    for a malformed row (not a list, a turn without a speaker or a text, an unknown speaker, a non-string value).
    An empty system turn (``{"from": "system", "value": ""}``, common in SlimOrca-style data) is dropped from its
    row, which is kept; such drops are counted in the report. Skips and reports rows with no assistant turn or an
    empty user/assistant turn.
    """
    _require_columns(dataset, [column], "sharegpt_to_messages",
                     "Pass column=<name> if the turns live elsewhere (FineTome-100k uses 'conversations').")
    report = DataReport("sharegpt_to_messages", rows_in=len(dataset))
    out = []
    for i, row in enumerate(_rows(dataset, "ShareGPT → messages")):
        turns = row[column]
        if not isinstance(turns, list):
            raise DataError(f"row {i}, field '{column}': expected a list of {{from, value}} turns, "
                            f"got {type(turns).__name__}")
        messages = []
        for j, turn in enumerate(turns):
            where = f"row {i}, field '{column}[{j}]'"
            if not isinstance(turn, dict):
                raise DataError(f"{where}: expected a dict with 'from' and 'value', got {type(turn).__name__}")
            speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
            text = turn.get("value") if turn.get("value") is not None else turn.get("content")
            present = {k: v for k, v in turn.items() if v is not None}
            missing = ("from" if speaker is None else
                       None if ("value" in turn or "content" in turn) else "value")
            if missing:
                raise DataError(f"{where}: missing '{missing}' (or '{'role' if missing == 'from' else 'content'}'); "
                                f"the turn has {present}. Turns look like {{'from': 'human', 'value': '...'}} or "
                                "{'role': 'user', 'content': '...'}")
            role = SHAREGPT_ROLES.get(str(speaker).strip().lower())
            if role is None:
                raise DataError(f"{where}.from: unknown speaker {speaker!r}; known: {sorted(SHAREGPT_ROLES)}. "
                                "Map it with dataset.map(...) first.")
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}.value: expected a string, got {type(text).__name__}")
            if role == "system" and not (text or "").strip():
                report.drop("empty system turn(s)", i)
                continue
            messages.append({"role": role, "content": text or ""})
        if not messages:
            report.skip("empty conversation", i)
        elif any(not m["content"].strip() for m in messages):
            report.skip("empty turn", i)
        elif not any(m["role"] == "assistant" for m in messages):
            report.skip("no assistant turn", i)
        else:
            out.append({"messages": messages})
    return _finish(out, report, verbose, return_report)


def alpaca_to_text(dataset, eos_token: str, *, instruction: str = "instruction", input: str = "input",
                   output: str = "output", verbose: bool = True, return_report: bool = False):
    """Alpaca rows (``instruction``, optional ``input``, ``output``) → a ``text`` column in the Alpaca prompt of the
    NTUA lab report and the CodeMMLU report, ending with ``eos_token`` (pass ``tokenizer.eos_token``) so the model
    learns to stop.

    Raises :class:`DataError` for a missing or non-string field. Skips and reports rows with an empty output.
    """
    if not eos_token:
        raise DataError("alpaca_to_text: pass eos_token=tokenizer.eos_token; without it the model never learns to stop")
    needed = [instruction, output]
    _require_columns(dataset, needed, "alpaca_to_text", "Name the fields with instruction=, input=, output=.")
    has_input = input in dataset.column_names
    report = DataReport("alpaca_to_text", rows_in=len(dataset))
    out = []
    for i, row in enumerate(_rows(dataset, "Alpaca → text")):
        values = {}
        for key in needed + ([input] if has_input else []):
            value = row[key]
            if value is None and key == input:
                value = ""
            if not isinstance(value, str):
                raise DataError(f"row {i}, field '{key}': expected a string, got {type(value).__name__}")
            values[key] = value
        if not values[instruction].strip():
            raise DataError(f"row {i}, field '{instruction}': empty instruction")
        if not values[output].strip():
            report.skip("empty output", i)
            continue
        out.append({"text": format_alpaca(values[instruction], values.get(input, ""), values[output], eos_token)})
    return _finish(out, report, verbose, return_report)


def sample_lengths(dataset, tokenizer) -> list[int]:
    """Token count of each row as the trainer will see it: ``messages`` rendered with the chat template, ``text``,
    prompt + completion, or for preference pairs the longer of prompt + chosen and prompt + rejected (conversational
    rows rendered with the chat template, plain-text rows as text)."""
    from llmft.templates import require_chat_template

    columns = set(dataset.column_names)
    if {"prompt", "chosen", "rejected"} <= columns or {"prompt", "completion"} <= columns:
        answers = ("chosen", "rejected") if "chosen" in columns else ("completion",)
        lengths = []
        for row in dataset:
            if isinstance(row["prompt"], list):  # conversational: the trainer applies the chat template
                require_chat_template(tokenizer, "the conversational prompts")
                sides = [tokenizer.apply_chat_template(row["prompt"] + row[k], tokenize=False) for k in answers]
                special = False  # the template writes BOS itself
            else:  # plain text: prompt + answer, as the trainer tokenizes them
                sides, special = [row["prompt"] + row[k] for k in answers], True
            lengths.append(max(len(ids) for ids in tokenizer(sides, add_special_tokens=special)["input_ids"]))
        return lengths
    if "messages" in columns:
        require_chat_template(tokenizer, "the 'messages' rows")
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"]]
    elif "text" in dataset.column_names:
        texts = list(dataset["text"])
    else:
        raise DataError(f"sample_lengths: expected 'messages', 'text', prompt/completion or prompt/chosen/rejected "
                        "columns, got "
                        f"{dataset.column_names}")
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def count_overlong(dataset, tokenizer, max_seq_length: int, name: str = "dataset") -> DataReport:
    """Count rows longer than ``max_seq_length`` tokens (they get truncated, losing their ends)."""
    lengths = sample_lengths(dataset, tokenizer)
    report = DataReport(name, rows_in=len(lengths), rows_out=len(lengths), max_seq_length=max_seq_length)
    report.overlong = [i for i, n in enumerate(lengths) if n > max_seq_length]
    return report


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def pair_problem(chosen: str, rejected: str) -> str | None:
    """Why a preference pair carries no preference ("empty chosen", "empty rejected", "chosen == rejected"), or None.
    DPO on such a pair trains at loss ln 2 with no signal."""
    return ("empty chosen" if not chosen.strip() else "empty rejected" if not rejected.strip()
            else "chosen == rejected" if chosen.strip() == rejected.strip() else None)


def _answer_text(value):
    """An answer's text: a string, or the contents of its assistant message(s); None for any other shape."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return "".join(m["content"] for m in value)
    return None


def check_preference_rows(dataset, argument: str = "train_dataset") -> str:
    """Check trainer-ready preference rows (``prompt``/``chosen``/``rejected``) as a DPO trainer takes them: every row
    in one form, conversational (message lists) or plain text (strings), and every pair carrying a preference (the
    checks of :func:`preference_pairs`). Returns the form ("conversational" or "text"); raises :class:`DataError`
    naming the rows otherwise."""
    if len(dataset) == 0:
        raise DataError(f"{argument}: empty (0 rows); DPO needs at least one prompt/chosen/rejected pair")
    problems: "OrderedDict[str, list[int]]" = OrderedDict()
    form = None
    for i, row in enumerate(dataset):
        conversational = isinstance(row["prompt"], list)
        row_form = "conversational" if conversational else "text" if isinstance(row["prompt"], str) else None
        answers = [_answer_text(row[k]) for k in ("chosen", "rejected")]
        if row_form is None or None in answers or conversational != all(isinstance(row[k], list)
                                                                       for k in ("chosen", "rejected")):
            raise DataError(f"{argument}, row {i}: prompt, chosen and rejected must be all strings (plain text) or all "
                            "lists of {role, content} messages; got "
                            f"{', '.join(type(row[k]).__name__ for k in PREFERENCE_COLUMNS)}. "
                            "llmft.data.preference_pairs converts string rows to chat turns")
        form = form or row_form
        if row_form != form:
            raise DataError(f"{argument}, row {i}: {row_form} while row 0 is {form}; use one form for every row "
                            "(llmft.data.preference_pairs converts string rows to chat turns)")
        problem = pair_problem(*answers)
        if problem:
            problems.setdefault(problem, []).append(i)
    if problems:
        listed = "; ".join(f"{problem}: rows {shorten(rows)}" for problem, rows in problems.items())
        raise DataError(f"{argument}: {sum(map(len, problems.values()))} pairs carry no preference ({listed}); DPO "
                        "would train on them at loss ln 2 with no signal. Fix those rows, or drop and count them with "
                        "llmft.data.preference_pairs(dataset, strict=False)")
    return form


def _pair_row(i: int, prompt_messages: list[dict], chosen, rejected, report: DataReport, strict: bool):
    """One conversational preference row, or None when the pair teaches nothing (counted in ``report``)."""
    for field_name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(f"row {i}, field '{field_name}': expected a string, got {type(value).__name__}")
    problem = pair_problem(chosen, rejected)
    if problem:
        if strict:
            raise DataError(f"row {i}, field '{'rejected' if 'rejected' in problem else 'chosen'}': {problem}, so the "
                            "pair carries no preference. Fix the row, or pass strict=False to skip and count such rows")
        report.skip(problem, i)
        return None
    return {"prompt": prompt_messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def orca_to_dpo(dataset, *, strict: bool = True, verbose: bool = True, return_report: bool = False):
    """``Intel/orca_dpo_pairs`` rows (``system``, ``question``, ``chosen``, ``rejected``) → conversational
    ``prompt`` / ``chosen`` / ``rejected`` for TRL's DPOTrainer (the chat template is applied by the trainer). The
    system message is kept when present.

    Raises :class:`DataError` naming the row for a missing or non-string field, an empty question, and (with
    ``strict=True``) an empty answer or ``chosen == rejected``; ``strict=False`` skips and reports those instead.
    """
    _require_columns(dataset, ["question", "chosen", "rejected"], "orca_to_dpo",
                     "Intel/orca_dpo_pairs has system, question, chosen, rejected; for prompt/chosen/rejected rows "
                     "use preference_pairs.")
    has_system = "system" in dataset.column_names
    report = DataReport("orca_to_dpo", rows_in=len(dataset))
    out = []
    for i, row in enumerate(_rows(dataset, "orca → DPO pairs")):
        question, system = row["question"], (row["system"] if has_system else None) or ""
        for field_name, value in (("question", question), ("system", system)):
            if not isinstance(value, str):
                raise DataError(f"row {i}, field '{field_name}': expected a string, got {type(value).__name__}")
        if not question.strip():
            raise DataError(f"row {i}, field 'question': empty question")
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": question}]
        pair = _pair_row(i, prompt, row["chosen"], row["rejected"], report, strict)
        if pair is not None:
            out.append(pair)
    return _finish(out, report, verbose, return_report)


PROMPT_ROLES = ("system", "user", "assistant")


def _check_message(message, where: str, roles) -> None:
    """A ``{role, content}`` chat message with a known role and string content, else :class:`DataError`."""
    if not isinstance(message, dict) or message.get("role") is None or "content" not in message:
        raise DataError(f"{where}: expected a {{'role': ..., 'content': ...}} message, got {message!r:.60}")
    if message["role"] not in roles:
        hint = SHAREGPT_ROLES.get(str(message["role"]).strip().lower())
        raise DataError(f"{where}.role: unknown role {message['role']!r}; expected one of {list(roles)}"
                        + (f" (did you mean {hint!r}?)" if hint in roles else ""))
    if not isinstance(message["content"], str):
        raise DataError(f"{where}.content: expected a string, got {type(message['content']).__name__}")


def preference_pairs(dataset, *, strict: bool = True, verbose: bool = True, return_report: bool = False):
    """Generic ``prompt`` / ``chosen`` / ``rejected`` rows with string values → the conversational form TRL's
    DPOTrainer takes (user prompt, assistant answers). Rows already in conversational form are validated (each
    prompt message a ``{role, content}`` with role system/user/assistant, each answer a string or one assistant
    message) and kept. Same checks as :func:`orca_to_dpo`; every problem is a :class:`DataError` naming row and
    field."""
    _require_columns(dataset, ["prompt", "chosen", "rejected"], "preference_pairs",
                     "Name the columns prompt, chosen, rejected (dataset.rename_column).")
    report = DataReport("preference_pairs", rows_in=len(dataset))
    out = []
    for i, row in enumerate(_rows(dataset, "preference pairs")):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(prompt, list):  # conversational already: validate the shape, take the answers' text
            if not prompt:
                raise DataError(f"row {i}, field 'prompt': empty list; expected a string or {{role, content}} messages")
            for j, message in enumerate(prompt):
                _check_message(message, f"row {i}, field 'prompt[{j}]'", PROMPT_ROLES)
            answers = []
            for field_name, value in (("chosen", chosen), ("rejected", rejected)):
                if isinstance(value, list):
                    if len(value) != 1:
                        raise DataError(f"row {i}, field '{field_name}': expected one assistant message, got "
                                        f"{len(value)} items")
                    _check_message(value[0], f"row {i}, field '{field_name}[0]'", ("assistant",))
                    value = value[0]["content"]
                answers.append(value)
            pair = _pair_row(i, prompt, answers[0], answers[1], report, strict)
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"row {i}, field 'prompt': expected a non-empty string, got {prompt!r:.40}")
            pair = _pair_row(i, [{"role": "user", "content": prompt}], chosen, rejected, report, strict)
        if pair is not None:
            out.append(pair)
    return _finish(out, report, verbose, return_report)


def parse_choices(value, where: str) -> list[str]:
    """Choices as a list of strings, from a list or a stringified list (``"['a', 'b']"``, as CodeMMLU CSVs have)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            try:
                value = json.loads(text)
            except ValueError:
                raise DataError(f"{where}: could not parse choices {text[:60]!r}; expected a list or a stringified "
                                "Python/JSON list") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: expected a non-empty list of choices, got {type(value).__name__}")
    if len(value) > len(CHOICE_LETTERS):
        raise DataError(f"{where}: {len(value)} choices; at most {len(CHOICE_LETTERS)} are supported")
    if not all(isinstance(c, (str, int, float)) for c in value):
        raise DataError(f"{where}: every choice must be text")
    return [str(c) for c in value]


def normalize_answer(value, choices: list[str]) -> str | None:
    """A gold answer as a letter within ``choices``, or None when it cannot be resolved. Accepts a letter in messy
    form ("B", " c ", "(D)", "Answer: B", "Đáp án: A"), a 0-based index, or the text of one of the choices."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return CHOICE_LETTERS[value] if 0 <= value < len(choices) else None
    text = str(value).strip()
    letter = answer_letter(text, len(CHOICE_LETTERS), whole=True)  # any letter form, then its range
    if letter is not None:
        return letter if CHOICE_LETTERS.index(letter) < len(choices) else None
    exact = [i for i, c in enumerate(choices) if c.strip() == text]
    return CHOICE_LETTERS[exact[0]] if len(exact) == 1 else None


def mcq_rows(dataset, *, eos_token: str | None = None, with_answers: bool = True, task_id: str = "task_id",
             question: str = "question", choices: str = "choices", answer: str = "answer", verbose: bool = True,
             return_report: bool = False):
    """Multiple-choice rows → the CodeMMLU zero-shot prompt with lettered choices.

    Reads CodeMMLU-style rows (``task_id``, ``question``, ``choices`` as a list or stringified list, ``answer`` as a
    letter or messy text) and Vietnamese rows shaped like beyoru/Tin_hoc_mcq (``answer_a`` ... ``answer_d``,
    ``answer_key``). Returns ``task_id``, ``prompt`` (ends with "Answer:", for scoring/generation), ``choices``,
    ``n_choices`` and, with answers, ``answer`` (a letter) and ``completion`` (" " + letter + ``eos_token``): prompt /
    completion rows that :func:`llmft.build_trainer` takes as they are, with the loss on the completion only (the
    letter as :func:`llmft.mcq.score_choices` reads it, and the end of sequence). Rows whose answer cannot be resolved
    are skipped and reported by task_id; malformed rows raise :class:`DataError` naming the row and field. Letters
    never shift: trailing empty options (``answer_d=""`` on a three-choice row) just mean fewer choices, and an empty
    option before a filled one is a :class:`DataError` naming the row and field. ``with_answers=False`` for test rows
    without answers.
    """
    columns = dataset.column_names
    letter_columns = [f"answer_{c}" for c in "abcdefghij" if f"answer_{c}" in columns]
    vietnamese = choices not in columns and bool(letter_columns)
    if vietnamese and answer not in columns and "answer_key" in columns:
        answer = "answer_key"
    needed = [question] + ([] if vietnamese else [choices]) + ([answer] if with_answers else [])
    _require_columns(dataset, needed, "mcq_rows", "Name the fields with question=, choices=, answer=, task_id=; "
                     "Vietnamese rows need answer_a..answer_d and answer_key.")
    if with_answers and not eos_token:
        raise DataError("mcq_rows: pass eos_token=tokenizer.eos_token for training rows (or with_answers=False)")
    id_column = task_id if task_id in columns else "id" if "id" in columns else None
    report = DataReport("mcq_rows", rows_in=len(dataset), unit="task_ids")
    out, seen = [], set()
    for i, row in enumerate(_rows(dataset, "MCQ rows")):
        tid = str(row[id_column]) if id_column else f"row_{i}"
        if tid in seen:
            raise DataError(f"row {i}, field '{id_column}': duplicate task_id {tid!r}")
        seen.add(tid)
        text_q = row[question]
        if not isinstance(text_q, str) or not text_q.strip():
            raise DataError(f"row {i} (task_id {tid}), field '{question}': expected a non-empty string")
        if vietnamese:
            options = [row[c] for c in letter_columns]
            while options and (options[-1] is None or str(options[-1]).strip() == ""):
                options.pop()  # fewer choices (e.g. answer_d empty): no letter moves
            for column, option in zip(letter_columns, options):
                if option is None or str(option).strip() == "":
                    raise DataError(
                        f"row {i} (task_id {tid}), field '{column}': empty option before a filled one; dropping it "
                        f"would shift the letters after it (the answer key names letters). Fill the option, or remove "
                        "the row")
            options = parse_choices(options, f"row {i} (task_id {tid}), fields {letter_columns}")
        else:
            options = parse_choices(row[choices], f"row {i} (task_id {tid}), field '{choices}'")
        prompt = format_mcq(text_q, options).rstrip()
        item = {"task_id": tid, "prompt": prompt, "choices": options, "n_choices": len(options)}
        if with_answers:
            letter = normalize_answer(row[answer], options)
            if letter is None:
                report.skip("answer not resolvable to one of the choices", tid)
                continue
            item.update(answer=letter, completion=f" {letter}{eos_token}")
        out.append(item)
    return _finish(out, report, verbose, return_report)


def oasst1_pairs(dataset, *, lang: str | None = "en", max_pairs: int | None = None, seed: int = 0,
                 verbose: bool = True, return_report: bool = False):
    """OpenAssistant/oasst1 flat message rows → evaluation pairs: each conversation's root prompt (a prompter message
    without parent) with its best-ranked assistant reply (``rank == 0``) as the reference.

    Deleted messages are ignored; trees in other languages (``lang=None`` keeps all), roots without a rank-0 reply and
    orphan replies (whose parent is deleted, or missing from the rows given) are counted in the report, never dropped
    silently. ``max_pairs`` takes a deterministic random sample
    (``seed``). Returns a dataset with ``prompt``, ``reference``, ``message_tree_id``, ``lang``.
    """
    _require_columns(dataset, ["message_id", "parent_id", "role", "text", "rank"], "oasst1_pairs",
                     "OpenAssistant/oasst1 rows are flat messages (+ lang, deleted, message_tree_id, ...).")
    report = DataReport("oasst1_pairs", rows_in=len(dataset))
    rows = list(dataset)
    alive, deleted = {}, set()
    for i, row in enumerate(rows):
        if row.get("deleted"):
            report.skip("deleted message", i)
            deleted.add(row["message_id"])
            continue
        if row["role"] not in ("prompter", "assistant"):
            raise DataError(f"row {i}, field 'role': expected 'prompter' or 'assistant', got {row['role']!r}")
        alive[row["message_id"]] = (i, row)
    children: dict[str, list[tuple[int, dict]]] = {}
    for message_id, (i, row) in alive.items():
        parent = row["parent_id"]
        if parent is not None and parent not in alive:  # its subtree is not a root conversation
            report.skip("orphan: parent deleted" if parent in deleted else "orphan: parent not in the rows", i)
            continue
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
    # non-root messages are not pairs: they are read only to find each root's best reply
    return _finish(pairs, report, verbose, return_report)
