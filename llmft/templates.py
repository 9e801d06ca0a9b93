"""Prompt templates: the Alpaca prompt of the NTUA lab report (with and without input), the CodeMMLU multiple-choice
prompt, and chat-template selection through Unsloth's ``get_chat_template``.
"""
from __future__ import annotations

import re
from typing import Sequence

# Exact wording of the Alpaca prompt used in the NTUA lab report's notebooks (and Unsloth's Alpaca notebooks).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{response}"
)

# CodeMMLU zero-shot multiple-choice prompt; the answer letter follows "Answer: ".
MCQ_PROMPT = (
    "The following are multiple choice questions (with answers) about software development.\n\n"
    "Question: {question}\n{choices}\nAnswer: "
)
CHOICE_LETTERS = "ABCDEFGHIJ"
# Markers for build_trainer(instruction_part=..., response_part=...) so MCQ training puts the loss on the answer only.
MCQ_INSTRUCTION_PART = "The following are multiple choice questions"
MCQ_RESPONSE_PART = "Answer:"

# The answer letter, in two kinds of text. A gold answer is a whole string ("B", "(b)", "Answer: B", "Đáp án: D");
# generated text is searched, most specific form first (the last two forms are case-sensitive: a lowercase "a" is
# usually an article).
_WHOLE_ANSWER = [
    re.compile(r"^\(?([A-J])\)?[.):]?$", re.I),                                       # "B", "(b)", "C.", "D)"
    re.compile(r"^(?:the\s+)?(?:correct\s+)?answer\s*(?:is)?\s*[:：]?\s*\(?([A-J])\)?[.)]?$", re.I),  # "Answer: B"
    re.compile(r"^(?:option|choice|đáp án|dap an)\s*[:：]?\s*\(?([A-J])\)?[.)]?$", re.I),  # "Option C", "Đáp án: D"
]
_ANSWER_IN_TEXT = [
    re.compile(r"answer\s*(?:is|:|：)\s*\(?([A-J])\)?(?![A-Za-z])", re.I),      # "the answer is (B)", "Answer: C"
    re.compile(r"\(?\b([A-J])\)?\s+is\s+(?:the\s+)?correct", re.I),               # "B is correct", "(C) is the correct"
    re.compile(r"(?:option|choice)\s*\(?([A-J])\)?(?![A-Za-z])", re.I),          # "option D"
    re.compile(r"^\s*\(?([A-J])\)?(?:[.):]|\s|$)", re.M),                         # a line starting with "B." / "(C)"
    re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])"),                                # the first standalone capital
]


def answer_letter(text: str, n_choices: int = 4, *, whole: bool = False) -> str | None:
    """The answer letter (within the first ``n_choices``) in ``text``, or None. ``whole=True``: ``text`` is a gold
    answer that must be a letter form as a whole ("B", "(b)", "Answer: B", "Option C", "Đáp án: D"); otherwise
    generated text is searched: "answer is (B)", "B is correct", "option D", a line starting with a letter, then the
    first standalone capital letter. The one answer parser behind :func:`llmft.data.normalize_answer` and
    :func:`llmft.mcq.extract_answer`."""
    valid = CHOICE_LETTERS[:n_choices]
    if whole:
        text = text.strip()
        match = next((m for m in (p.match(text) for p in _WHOLE_ANSWER) if m), None)
        letter = match.group(1).upper() if match else None
        return letter if letter and letter in valid else None
    for pattern in _ANSWER_IN_TEXT:
        for match in pattern.finditer(text):
            if match.group(1).upper() in valid:
                return match.group(1).upper()
    return None


# Names accepted by Unsloth's get_chat_template that our users reach for most (Unsloth knows many more).
COMMON_CHAT_TEMPLATES = ("llama-3.1", "llama-3.2", "chatml", "qwen-2.5", "gemma-3", "mistral", "phi-4")


def format_alpaca(instruction: str, input: str = "", response: str = "", eos_token: str | None = None) -> str:
    """One Alpaca prompt. With a ``response`` (training) pass ``eos_token`` so the model learns to stop; leave
    ``response`` empty for inference. An empty ``input`` selects the no-input variant."""
    template = ALPACA_PROMPT if input and input.strip() else ALPACA_PROMPT_NO_INPUT
    text = template.format(instruction=instruction, input=input, response=response)
    if response and eos_token:
        text += eos_token
    return text


def format_choices(choices: Sequence[str]) -> str:
    """``["x", "y"]`` → ``"A. x\\nB. y"``."""
    if len(choices) > len(CHOICE_LETTERS):
        raise ValueError(f"format_choices: {len(choices)} choices; at most {len(CHOICE_LETTERS)} are supported")
    return "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices))


def format_mcq(question: str, choices: Sequence[str], answer: str = "", eos_token: str | None = None) -> str:
    """The CodeMMLU prompt with lettered choices; append ``answer`` (a letter) and ``eos_token`` for training."""
    text = MCQ_PROMPT.format(question=question, choices=format_choices(choices))
    if answer:
        text += answer + (eos_token or "")
    return text


def require_chat_template(tokenizer, needed_for: str = "chat prompts") -> None:
    """Raise llmft's ValueError (with template names to pick from) when ``tokenizer`` has no chat template, instead
    of the error transformers raises from deep inside ``apply_chat_template``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer has no chat template, and {needed_for} need one. Give it one with "
            f"llmft.templates.apply_chat_template(tokenizer, 'llama-3.1') or load_model(..., chat_template=...); "
            f"common names: {', '.join(COMMON_CHAT_TEMPLATES)} (pick the one of your model's family)")


def apply_chat_template(tokenizer, name: str | None = None, **kwargs):
    """Return ``tokenizer`` with the named chat template (Unsloth's ``get_chat_template``: "llama-3.1", "chatml",
    "qwen-2.5", ...). ``name=None`` keeps the tokenizer's own template and checks that it has one."""
    if name is None:
        require_chat_template(tokenizer, "chat messages")
        return tokenizer
    from llmft._unsloth import import_unsloth

    import_unsloth()
    from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template

    if name not in CHAT_TEMPLATES:
        known = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"apply_chat_template(name={name!r}): Unsloth has no such template. Known names: {known}")
    return get_chat_template(tokenizer, chat_template=name, **kwargs)
