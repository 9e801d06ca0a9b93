"""Which tokens carry the loss: the responses, located in the *text* and mapped to tokens by character offsets.

Matching a marker's token ids (Unsloth's ``train_on_responses_only``) breaks with real tokenizers: a byte-level BPE
merges the template's newline with a response's leading newline into one token (Llama-3, Qwen), and SentencePiece
tokenizes a marker differently alone and after a newline (Llama-2, Mistral), so the marker is never found and the turn
trains on nothing. Here a response is a span of characters:

- chat data: the text the chat template adds for assistant turn *i*, i.e. the rendering of ``messages[:i + 1]``
  minus the rendering of ``messages[:i]`` with the generation prompt (the assistant header), up to and including
  the end-of-turn token (whitespace the template puts after it is not trained);
- text data (Alpaca, MCQ prompts): what follows a turn's ``response_part`` up to the next ``instruction_part``.

A token carries the loss when its characters overlap a response span (``return_offsets_mapping`` of a fast
tokenizer), so a token merging a template newline with the response's first newline is trained, not lost. The result
is a pre-tokenized dataset with ``input_ids`` and ``labels`` (-100 outside responses), which TRL's SFTTrainer takes
as is (it truncates to ``max_length`` and drops rows left with no trainable token; :class:`MaskReport` names them).

Content is data. A message may hold the text of a control token (an answer quoting ``<|eot_id|>``, a user pasting
``<|start_header_id|>assistant<|end_header_id|>``, ``[INST]`` or ``</s>`` for Mistral): tokenizing the rendered text
as a whole, as ``apply_chat_template(tokenize=True)`` and TRL do, turns it into real control tokens, and the model
learns to end its turn mid-answer. Here the characters that come from the messages are located (the template
rendered again with each content character replaced by a placeholder), and the stretch of text between two of the
template's own control tokens that holds such text is tokenized with special tokens split (the ``tokenizers``
library's ``encode_special_tokens``), exactly as the tokenizer treats plain text there; with ``responses_only=False``
too. Text rows and prompt/completion rows have no such structure (a text row may be a rendered chat on purpose):
control-token text inside them is reported by row (:attr:`MaskReport.control_text_rows`).

Markers (``instruction_part``/``response_part``) are matched by the template's structure, not by their first
occurrence: in each turn (from one ``instruction_part`` to the next) the response follows the turn's *last*
``response_part``, since a prompt may quote the marker (a code question holding ``Answer:``, an Alpaca input holding
``### Response:``) while the template writes its own after it; in chat rows, occurrences inside a message's content
are not markers at all. Rows where a turn holds the marker more than once are reported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmft.data import DataError, shorten
from llmft.templates import require_chat_template

IGNORE_INDEX = -100


@dataclass
class MaskReport:
    """Rows and assistant turns that train on nothing: what the trainer will drop, named before it does; and the rows
    whose text holds control-token text or a marker more than once (see the module docstring)."""

    name: str
    rows: int = 0
    empty_rows: list[int] = field(default_factory=list)  # no trainable token within max_length: the trainer drops them
    empty_turns: list[tuple[int, int]] = field(default_factory=list)  # (row, assistant turn) with no trainable token
    dropped_by_trainer: int | None = None  # rows the trainer actually dropped (set by build_trainer)
    content_control_rows: list[int] = field(default_factory=list)  # chat rows whose messages hold control-token text
    control_text_rows: list[int] = field(default_factory=list)  # text/prompt-completion rows with control tokens
    repeated_marker_rows: list[int] = field(default_factory=list)  # a turn holds response_part more than once
    responses_only: bool = True  # False: chat rows tokenized here (content as data) with the loss on every token

    def __str__(self) -> str:
        dropped = "" if self.dropped_by_trainer is None else f"; the trainer dropped {self.dropped_by_trainer}"
        loss = "loss on responses only" if self.responses_only else "loss on every token"
        lines = [f"{self.name}: {loss}; {self.rows} rows, {len(self.empty_rows)} with no trainable "
                 f"token{dropped}; {len(self.empty_turns)} assistant turns with no trainable token"]
        if self.empty_rows:
            lines.append(f"  dropped rows (empty or truncated responses): {shorten(self.empty_rows)}")
        if self.empty_turns:
            lines.append(f"  untrained turns (row, turn): {shorten(self.empty_turns)}")
        if self.content_control_rows:
            lines.append(f"  rows whose messages hold control-token text, tokenized as plain text: "
                         f"{shorten(self.content_control_rows)}")
        if self.control_text_rows:
            lines.append(f"  rows whose text, prompt or completion holds control tokens before its end (tokenized as "
                         f"control tokens; if that text is content, pass the rows as chat messages): "
                         f"{shorten(self.control_text_rows)}")
        if self.repeated_marker_rows:
            lines.append(f"  rows where a turn holds response_part more than once (the response follows the last "
                         f"one): {shorten(self.repeated_marker_rows)}")
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


def _occurrences(text: str, part: str, content=None) -> list[int]:
    """Start of every occurrence of ``part`` in ``text`` that overlaps no content character (``content``: a mask)."""
    found, start = [], 0
    while (at := text.find(part, start)) >= 0:
        if content is None or not any(content[at:at + len(part)]):
            found.append(at)
        start = at + 1
    return found


def text_response_spans(text: str, instruction_part: str, response_part: str, content=None,
                        repeated: list | None = None) -> list[tuple[int, int]]:
    """Response spans of a row located by its markers: in each turn (from one ``instruction_part`` to the next; the
    text before the first belongs to the first turn), the text after the turn's last ``response_part`` up to the next
    ``instruction_part`` (or the end). ``content``: a per-character mask of the text that came from messages (chat
    rows), whose occurrences of a marker are not markers. A turn holding ``response_part`` twice appends ``True`` to
    ``repeated``."""
    bounds = sorted({0, *_occurrences(text, instruction_part, content)}) + [len(text)]
    responses = _occurrences(text, response_part, content)
    spans = []
    for begin, end in zip(bounds, bounds[1:]):
        inside = [at for at in responses if begin <= at and at + len(response_part) <= end]
        if len(inside) > 1 and repeated is not None:
            repeated.append(True)
        if inside:
            spans.append((inside[-1] + len(response_part), end))
    return spans


PLACEHOLDER = "\ue000"  # a private-use character: stands for a content character when content is located


def content_mask(tokenizer, messages, text: str) -> list[bool] | None:
    """Which characters of ``text`` (the rendering of ``messages``) came from the messages' contents: the template
    renders the conversation again with every non-space content character replaced by :data:`PLACEHOLDER` (spaces
    kept, so a template that trims content trims the same), and the two renderings must line up character for
    character. None when they do not (the template writes text that depends on the content)."""
    blanked = [{**m, "content": "".join(c if c.isspace() else PLACEHOLDER for c in m["content"])}
               if isinstance(m.get("content"), str) else m for m in messages]
    shape = _render(tokenizer, blanked)
    if len(shape) != len(text) or any(a != b for a, b in zip(shape, text) if a != PLACEHOLDER):
        return None
    return [c == PLACEHOLDER for c in shape]


def _special_ids(tokenizer) -> set[int]:
    return {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def _without_start_prefix(spec):
    """A pre-tokenizer's JSON with Metaspace's "first" prefix scheme turned to "never" (True when it had one): how
    SentencePiece tokenizers (Llama-2, Mistral) treat text that follows a control token, where no "▁" is prepended."""
    found = False
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
            spec["prepend_scheme"], found = "never", True
        values = spec.values()
    else:
        values = spec if isinstance(spec, list) else []
    for value in values:
        found = _without_start_prefix(value) or found
    return found


class PlainText:
    """Tokenizes a stretch of text the way ``tokenizer`` tokenizes it between two control tokens, with special tokens
    split (transformers' ``split_special_tokens``, the ``tokenizers`` library's ``encode_special_tokens``):
    control-token text becomes plain text. For a stretch that does not start the text, a SentencePiece pre-tokenizer
    that prefixes only the start of the text (Metaspace "first") is swapped for one that does not, for the call."""

    def __init__(self, tokenizer):
        self.tokenizer, self._inner = tokenizer, None

    def _inner_pre_tokenizer(self):
        if self._inner is None:
            import copy

            original = self.tokenizer.backend_tokenizer.pre_tokenizer
            spec = json.loads(original.__getstate__()) if original is not None else None
            self._inner = False
            if spec is not None and _without_start_prefix(spec):
                self._inner = copy.deepcopy(original)
                self._inner.__setstate__(json.dumps(spec).encode())
        return self._inner or None

    def encode(self, text: str, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        backend = self.tokenizer.backend_tokenizer
        original, inner = backend.pre_tokenizer, None if at_start else self._inner_pre_tokenizer()
        if inner is not None:
            backend.pre_tokenizer = inner
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                     return_offsets_mapping=True)
        finally:
            if inner is not None:
                backend.pre_tokenizer = original
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def encode(tokenizer, text: str, *, add_special_tokens: bool, content: list[bool] | None = None,
           plain: PlainText | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """``(input_ids, offsets)`` of ``text``. With a ``content`` mask (:func:`content_mask`), control tokens that the
    tokenizer finds inside content are not kept: each stretch between two of the template's own control tokens that
    holds one is tokenized again as plain text (:class:`PlainText`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"responses-only masking needs a fast tokenizer (character offsets); {type(tokenizer).__name__} "
                        "is not. Load the model's tokenizer.json (AutoTokenizer with use_fast=True).")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if content is None:
        return ids, offsets
    special = _special_ids(tokenizer)
    quoted = {k for k, (token, (begin, end)) in enumerate(zip(ids, offsets))
              if token in special and end > begin and any(content[begin:end])}
    if not quoted:
        return ids, offsets
    plain = plain or PlainText(tokenizer)
    cuts = [k for k, token in enumerate(ids) if token in special and k not in quoted]  # the template's own
    out_ids, out_offsets, previous = [], [], -1
    for cut in cuts + [len(ids)]:
        stretch = range(previous + 1, cut)
        if quoted.intersection(stretch):
            begin = offsets[previous][1] if previous >= 0 else 0
            end = offsets[cut][0] if cut < len(ids) else len(text)
            new_ids, new_offsets = plain.encode(text[begin:end], at_start=begin == 0)
            out_ids += new_ids
            out_offsets += [(a + begin, b + begin) for a, b in new_offsets]
        else:
            out_ids += ids[previous + 1:cut]
            out_offsets += offsets[previous + 1:cut]
        if cut < len(ids):
            out_ids.append(ids[cut])
            out_offsets.append(offsets[cut])
        previous = cut
    return out_ids, out_offsets


def labels_in_spans(ids, offsets, spans) -> tuple[list[int], list[list[int]]]:
    """``(labels, tokens_per_span)``: labels copy the ids of tokens overlapping a span, -100 elsewhere."""
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
    return labels, per_span


def _control_text(tokenizer):
    """A regex matching the text of any of ``tokenizer``'s special tokens (longest first), or None."""
    import re

    texts = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def mask_responses(dataset, tokenizer, *, instruction_part: str | None = None, response_part: str | None = None,
                   max_length: int | None = None, name: str = "train_dataset", responses_only: bool = True):
    """``dataset`` (a ``messages`` or ``text`` column) → ``(tokenized dataset with input_ids and labels, MaskReport)``.

    Chat rows use the tokenizer's chat template; text rows need ``instruction_part`` and ``response_part`` (for the
    Alpaca prompt "### Instruction:\\n" and "### Response:\\n"). ``max_length``: rows whose first trainable token lies
    beyond it are reported as dropped (the trainer truncates, then drops rows with no trainable token). Content that
    holds control-token text is tokenized as plain text; markers follow the template's structure (module docstring).
    ``responses_only=False`` (chat rows only): the same tokenization, with the loss on every token.
    """
    from datasets import Dataset

    chat = "messages" in dataset.column_names
    if not (chat or responses_only):
        raise ValueError(f"{name}: responses_only=False is for chat rows; text rows with the loss on every token go "
                         "to the trainer as they are")
    if (instruction_part is None) != (response_part is None) or (not chat and response_part is None):
        raise ValueError(f"{name}: responses-only loss needs both instruction_part and response_part on 'text' rows "
                         "(Alpaca: '### Instruction:\\n' and '### Response:\\n'), and both or neither on chat rows")
    if chat:
        require_chat_template(tokenizer, f"{name}'s chat rows")
    report = MaskReport(name, rows=len(dataset), responses_only=responses_only)
    control_text, special, plain = _control_text(tokenizer), _special_ids(tokenizer), PlainText(tokenizer)
    out = {"input_ids": [], "labels": []}
    for row, example in enumerate(dataset):
        repeated = []
        if chat:
            messages = example["messages"]
            if responses_only:
                text, spans = chat_response_spans(tokenizer, messages, row)
            else:
                text = _render(tokenizer, messages)
                spans = [(0, len(text))]
            quoting = [(index, found.group()) for index, m in enumerate(messages)
                       if control_text and isinstance(m.get("content"), str)
                       for found in [control_text.search(m["content"])] if found]
            content = content_mask(tokenizer, messages, text) if quoting or (response_part and responses_only) else None
            if quoting and content is None:
                index, token = quoting[0]
                raise DataError(
                    f"row {row}, message {index}: it holds the text {token!r}, a control token of this "
                    "tokenizer, and the chat template writes text that depends on the content, so it cannot be "
                    "told apart from the template's own control tokens (it would train as a real one). Remove or "
                    "rewrite that text in the row, or use a template that inserts content as is (e.g. 'llama-3.1', "
                    "'qwen-2.5', 'chatml').")
            if quoting:
                report.content_control_rows.append(row)
            if response_part is not None and responses_only:  # explicit markers: in the template's own text
                spans = text_response_spans(text, instruction_part, response_part, content, repeated)
            ids, offsets = encode(tokenizer, text, add_special_tokens=False,  # the template writes BOS itself
                                  content=content if quoting else None, plain=plain)
        else:
            text = example["text"]
            if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token  # as TRL does for text rows: the model learns to stop
            spans = text_response_spans(text, instruction_part, response_part, repeated=repeated)
            ids, offsets = encode(tokenizer, text, add_special_tokens=True)
            if any(token in special and b > a and b < len(text) for token, (a, b) in zip(ids, offsets)):
                report.control_text_rows.append(row)
        if repeated:
            report.repeated_marker_rows.append(row)
        labels, per_span = labels_in_spans(ids, offsets, spans)
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
    tokens, so truncation leaves no completion token and the trainer drops them, named before it does; and the rows
    whose prompt or completion holds control-token text (TRL tokenizes it as control tokens; a trailing end-of-text
    token on the completion is expected)."""
    report = MaskReport(name, rows=len(dataset))
    control_text = _control_text(tokenizer)
    for row, example in enumerate(dataset):
        if isinstance(example["prompt"], list):
            require_chat_template(tokenizer, f"{name}'s conversational prompts")
            ids = tokenizer(_render(tokenizer, example["prompt"], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(example["prompt"])["input_ids"]
        if len(ids) >= max_length:
            report.empty_rows.append(row)
        texts = [piece for part in (example["prompt"], example["completion"])
                 for piece in ([m.get("content") for m in part] if isinstance(part, list) else [part])
                 if isinstance(piece, str)]
        if texts and tokenizer.eos_token and texts[-1].endswith(tokenizer.eos_token):
            texts[-1] = texts[-1][:-len(tokenizer.eos_token)]
        if control_text and any(control_text.search(text) for text in texts):
            report.control_text_rows.append(row)
    return report
