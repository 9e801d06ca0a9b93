"""Which tokens carry the loss: the responses, located in the *text* and mapped to tokens by character offsets.

Matching a marker's token ids (Unsloth's ``train_on_responses_only``) breaks with real tokenizers: a byte-level BPE
merges the template's newline with a response's leading newline into one token (Llama-3, Qwen), and SentencePiece
tokenizes a marker differently alone and after a newline (Llama-2, Mistral), so the marker is never found and the turn
trains on nothing. Here a response is a span of characters:

- chat data: the text the chat template adds for assistant turn *i*, i.e. the rendering of ``messages[:i + 1]``
  minus the rendering of ``messages[:i]`` with the generation prompt (the assistant header), up to and including
  the end-of-turn token (whitespace the template puts after it is not trained);
- text data (Alpaca, MCQ prompts): everything after each ``response_part`` up to the next ``instruction_part``.

A token carries the loss when its characters overlap a response span (``return_offsets_mapping`` of a fast
tokenizer), so a token merging a template newline with the response's first newline is trained, not lost. The result
is a pre-tokenized dataset with ``input_ids`` and ``labels`` (-100 outside responses), which TRL's SFTTrainer takes
as is (it truncates to ``max_length`` and drops rows left with no trainable token; :func:`count_dropped` names them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmft.data import DataError, shorten
from llmft.templates import require_chat_template

IGNORE_INDEX = -100


@dataclass
class MaskReport:
    """Rows and assistant turns that train on nothing: what the trainer will drop, named before it does."""

    name: str
    rows: int = 0
    empty_rows: list[int] = field(default_factory=list)  # no trainable token within max_length: the trainer drops them
    empty_turns: list[tuple[int, int]] = field(default_factory=list)  # (row, assistant turn) with no trainable token
    dropped_by_trainer: int | None = None  # rows the trainer actually dropped (set by build_trainer)

    def __str__(self) -> str:
        dropped = "" if self.dropped_by_trainer is None else f"; the trainer dropped {self.dropped_by_trainer}"
        lines = [f"{self.name}: loss on responses only; {self.rows} rows, {len(self.empty_rows)} with no trainable "
                 f"token{dropped}; {len(self.empty_turns)} assistant turns with no trainable token"]
        if self.empty_rows:
            lines.append(f"  dropped rows (empty or truncated responses): {shorten(self.empty_rows)}")
        if self.empty_turns:
            lines.append(f"  untrained turns (row, turn): {shorten(self.empty_turns)}")
        return "\n".join(lines)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_response_spans(tokenizer, messages, row: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it (see the module docstring)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"row {row}, turn {i}: the chat template renders this conversation differently turn by turn (it "
                "rewrites earlier turns), so the assistant's text cannot be located. Use a template that renders "
                "each turn once (e.g. 'llama-3.1', 'qwen-2.5', 'chatml'), or pass responses_only=False.")
        end = len(upto)
        end -= len(upto) - len(upto.rstrip())  # the newline a template puts after the end-of-turn token
        spans.append((len(before), max(end, len(before))))
    return full, spans


def text_response_spans(text: str, instruction_part: str, response_part: str) -> list[tuple[int, int]]:
    """Spans after each ``response_part`` up to the next ``instruction_part`` (or the end) in a plain-text row."""
    spans, start = [], 0
    while (found := text.find(response_part, start)) >= 0:
        begin = found + len(response_part)
        end = text.find(instruction_part, begin)
        end = len(text) if end < 0 else end
        spans.append((begin, end))
        start = end
    return spans


def tokens_in_spans(tokenizer, text: str, spans, *, add_special_tokens: bool) -> tuple[list[int], list[int], list]:
    """``(input_ids, labels, tokens_per_span)``: labels copy the ids of tokens overlapping a span, -100 elsewhere."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"responses-only masking needs a fast tokenizer (character offsets); {type(tokenizer).__name__} "
                        "is not. Load the model's tokenizer.json (AutoTokenizer with use_fast=True).")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    per_span = [[] for _ in spans]
    for k, (begin, end) in enumerate(offsets):
        if end <= begin:  # special tokens added by the tokenizer (BOS) have no characters
            continue
        for s, (a, b) in enumerate(spans):
            if begin < b and end > a:
                labels[k] = ids[k]
                per_span[s].append(k)
                break
    return ids, labels, per_span


def mask_responses(dataset, tokenizer, *, instruction_part: str | None = None, response_part: str | None = None,
                   max_length: int | None = None, name: str = "train_dataset"):
    """``dataset`` (a ``messages`` or ``text`` column) → ``(tokenized dataset with input_ids and labels, MaskReport)``.

    Chat rows use the tokenizer's chat template; text rows need ``instruction_part`` and ``response_part`` (for the
    Alpaca prompt "### Instruction:\\n" and "### Response:\\n"). ``max_length``: rows whose first trainable token lies
    beyond it are reported as dropped (the trainer truncates, then drops rows with no trainable token).
    """
    from datasets import Dataset

    chat = "messages" in dataset.column_names
    if (instruction_part is None) != (response_part is None) or (not chat and response_part is None):
        raise ValueError(f"{name}: responses-only loss needs both instruction_part and response_part on 'text' rows "
                         "(Alpaca: '### Instruction:\\n' and '### Response:\\n'), and both or neither on chat rows")
    if chat:
        require_chat_template(tokenizer, f"{name}'s chat rows")
    report = MaskReport(name, rows=len(dataset))
    out = {"input_ids": [], "labels": []}
    for row, example in enumerate(dataset):
        if chat:
            text, spans = chat_response_spans(tokenizer, example["messages"], row)
            if response_part is not None:  # explicit markers: search them in the rendered text instead
                spans = text_response_spans(text, instruction_part, response_part)
            special = False  # the template writes BOS itself
        else:
            text = example["text"]
            if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token  # as TRL does for text rows: the model learns to stop
            spans = text_response_spans(text, instruction_part, response_part)
            special = True
        ids, labels, per_span = tokens_in_spans(tokenizer, text, spans, add_special_tokens=special)
        limit = max_length or len(ids)
        for turn, tokens in enumerate(per_span):
            if not tokens or tokens[0] >= limit:
                report.empty_turns.append((row, turn))
        if all(label == IGNORE_INDEX for label in labels[:limit]):
            report.empty_rows.append(row)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return Dataset.from_dict(out), report


def completion_report(dataset, tokenizer, *, max_length: int, name: str = "train_dataset") -> MaskReport:
    """Prompt/completion rows (TRL masks the prompt itself): the rows whose prompt alone fills ``max_length``
    tokens, so truncation leaves no completion token and the trainer drops them, named before it does."""
    report = MaskReport(name, rows=len(dataset))
    for row, example in enumerate(dataset):
        if isinstance(example["prompt"], list):
            require_chat_template(tokenizer, f"{name}'s conversational prompts")
            ids = tokenizer(_render(tokenizer, example["prompt"], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(example["prompt"])["input_ids"]
        if len(ids) >= max_length:
            report.empty_rows.append(row)
    return report
