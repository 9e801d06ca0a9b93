"""Prompt templates: the Alpaca prompt of the seeds (with and without input), the CodeMMLU multiple-choice prompt, and
chat-template selection through Unsloth's ``get_chat_template``.
"""
from __future__ import annotations

from typing import Sequence

# Exact wording of the Alpaca prompt used in the seeds' notebooks (and Unsloth's Alpaca notebooks).
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
