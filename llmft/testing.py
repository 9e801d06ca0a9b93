"""Tiny offline assets: a tokenizer with a chat template, tiny Llama/Qwen2 models and tiny datasets in the exact
shapes users load from the Hugging Face hub.

Everything here is deterministic (same bytes for the same arguments) and built without network access, so tests,
benchmarks, the offline demo and the notebooks' smoke mode run on a CPU machine with no hub. Models and tokenizers are
cached on disk (``$LLMFT_CACHE`` or ``~/.cache/llmft``) and written atomically, so a crash never leaves half a model.

Smoke mode: notebooks call :func:`smoke_mode` (true when ``LLMFT_SMOKE=1``) and then pick a tiny asset instead of a
hub id and fewer steps; the rest of the code path is identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
}
_EXTRA_SPECIALS = ["<|im_start|>", "<|endoftext|>"]

# ChatML with `{% generation %}` markers so `return_assistant_tokens_mask` / TRL's `assistant_only_loss` work too.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_ARCHITECTURES = ("llama", "qwen2")
_ASSET_VERSION = 2  # bump when a builder changes, so stale caches are not reused


def smoke_mode() -> bool:
    """True when ``LLMFT_SMOKE=1``: notebooks swap hub ids for tiny local assets and shrink step counts."""
    return os.environ.get("LLMFT_SMOKE", "").strip().lower() in {"1", "true", "yes"}


def cache_dir() -> Path:
    """Where tiny assets are cached: ``$LLMFT_CACHE`` or ``~/.cache/llmft``."""
    root = os.environ.get("LLMFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmft")
    return Path(root)


def _spec_dir(kind: str, spec: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({"v": _ASSET_VERSION, **spec}, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "testing" / f"{kind}-{digest}"


def _build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``target``; reuse ``target`` when it is already complete."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not (target / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------------
# Datasets in hub shapes
# --------------------------------------------------------------------------------------------------------------------
_FACTS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Greece", "Athens"),
    ("Vietnam", "Hanoi"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Chile", "Santiago"),
]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_TOPICS = [
    ("a list in Python", "A list is an ordered, mutable collection written with square brackets."),
    ("recursion", "Recursion is when a function calls itself on a smaller version of the problem."),
    ("a hash map", "A hash map stores key and value pairs and finds a key in constant time on average."),
    ("gradient descent", "Gradient descent moves the weights a small step against the gradient of the loss."),
    ("LoRA", "LoRA trains two small low rank matrices next to a frozen weight matrix."),
    ("overfitting", "Overfitting is when a model memorises the training data and does worse on new data."),
]


def _qa_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            country, city = _FACTS[rng.randrange(len(_FACTS))]
            pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        elif kind == 1:
            a, b = rng.randrange(1, 50), rng.randrange(1, 50)
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 2:
            topic, answer = _TOPICS[rng.randrange(len(_TOPICS))]
            pairs.append((f"Explain {topic} in one sentence.", answer))
        else:
            color = _COLORS[rng.randrange(len(_COLORS))]
            pairs.append((f"Write a short poem about the color {color}.",
                          f"The {color} light falls soft and slow,\nit paints the world in {color} glow."))
    return pairs


def finetome_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Rows shaped like ``mlabonne/FineTome-100k``: ShareGPT ``conversations`` of ``{from, value}``, ``source``, ``score``."""
    rng = random.Random(seed + 1)
    rows = []
    pairs = _qa_pairs(n * 2, seed)
    for i in range(n):
        q, a = pairs[2 * i]
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if i % 5 == 4:  # some multi-turn rows, some with a system prompt, as in the real data
            q2, a2 = pairs[2 * i + 1]
            conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        if i % 7 == 3:
            conv.insert(0, {"from": "system", "value": "You are a helpful assistant."})
        rows.append({"conversations": conv, "source": rng.choice(["infini-instruct-top-500k", "WebInstructSub_axolotl"]),
                     "score": round(4.5 + rng.random() * 0.5, 4)})
    return rows


def oasst1_rows(n_trees: int = 8, seed: int = 0) -> list[dict]:
    """Flat message rows shaped like ``OpenAssistant/oasst1``: trees of prompter/assistant messages with ranks."""
    rng = random.Random(seed + 2)
    pairs = _qa_pairs(n_trees * 3, seed + 3)
    rows: list[dict] = []
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"{counter:08x}-0000-4000-8000-{seed:012x}"

    for t in range(n_trees):
        q, a = pairs[3 * t]
        root = new_id()
        lang = "es" if t % 6 == 5 else "en"
        base = {"message_tree_id": root, "lang": lang, "deleted": False, "review_result": True, "synthetic": False,
                "tree_state": "ready_for_export"}
        rows.append({**base, "message_id": root, "parent_id": None, "role": "prompter", "text": q, "rank": None})
        replies = [a, pairs[3 * t + 1][1], pairs[3 * t + 2][1]][: 2 + (t % 2)]
        ranks = list(range(len(replies)))
        rng.shuffle(ranks)
        for reply, rank in zip(replies, ranks):
            text = a if rank == 0 else reply
            mid = new_id()
            rows.append({**base, "message_id": mid, "parent_id": root, "role": "assistant", "text": text, "rank": rank})
            if rank == 0 and t % 3 == 0:  # a follow-up turn under the best reply
                rows.append({**base, "message_id": new_id(), "parent_id": mid, "role": "prompter",
                             "text": "Can you say more?", "rank": 0})
    return rows


def orca_dpo_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """Rows shaped like ``Intel/orca_dpo_pairs``: ``system``, ``question``, ``chosen``, ``rejected``."""
    rng = random.Random(seed + 4)
    rows = []
    for i, (q, a) in enumerate(_qa_pairs(n, seed + 5)):
        system = "" if i % 3 == 0 else "You are an AI assistant. Answer the question faithfully."
        rejected = rng.choice(["I do not know.", "That question makes no sense.", a.split(" ")[0] + "?"])
        rows.append({"system": system, "question": q, "chosen": a, "rejected": rejected})
    return rows


def codemmlu_rows(n: int = 24, seed: int = 0, stringified_choices: bool = False) -> list[dict]:
    """CodeMMLU-style MCQ rows: ``task_id``, ``question``, ``choices`` (list, or its ``str()``), ``answer`` letter."""
    rng = random.Random(seed + 6)
    rows = []
    for i in range(n):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        wrong = [t[1] for t in _TOPICS if t[1] != answer]
        rng.shuffle(wrong)
        choices = wrong[:3]
        pos = rng.randrange(4)
        choices.insert(pos, answer)
        rows.append({"task_id": f"task_{i:04d}", "question": f"Which statement best describes {topic}?",
                     "choices": str(choices) if stringified_choices else choices, "answer": "ABCD"[pos]})
    return rows


def _as_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def tiny_finetome(n: int = 64, seed: int = 0):
    """:func:`finetome_rows` as a ``datasets.Dataset`` (what ``load_dataset("mlabonne/FineTome-100k")`` gives)."""
    return _as_dataset(finetome_rows(n, seed))


def tiny_oasst1(n_trees: int = 8, seed: int = 0):
    return _as_dataset(oasst1_rows(n_trees, seed))


def tiny_orca_dpo(n: int = 32, seed: int = 0):
    return _as_dataset(orca_dpo_rows(n, seed))


def tiny_codemmlu(n: int = 24, seed: int = 0, stringified_choices: bool = False):
    return _as_dataset(codemmlu_rows(n, seed, stringified_choices))


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every string the tiny datasets and templates can produce."""
    from llmft import templates

    texts = [templates.ALPACA_PROMPT, templates.ALPACA_PROMPT_NO_INPUT, templates.MCQ_PROMPT]
    for row in finetome_rows(200):
        texts += [m["value"] for m in row["conversations"]]
    for row in orca_dpo_rows(100):
        texts += [row["system"], row["question"], row["chosen"], row["rejected"]]
    for row in codemmlu_rows(24):
        texts += [row["question"], *row["choices"]]
    texts += ["user", "assistant", "system", "Can you say more?", "Continue the fibonnaci sequence.",
              ", ".join(str(i) for i in range(200)), "A. B. C. D. Answer: The answer is"]
    return texts * 3


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------------------------------
def _build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split one per token (as Llama-3/Qwen do) so sequences of numbers stay learnable by a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + _EXTRA_SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=_EXTRA_SPECIALS,
                                   model_max_length=2048, padding_side="right", clean_up_tokenization_spaces=False,
                                   **SPECIAL_TOKENS)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)


def tiny_tokenizer_dir(vocab_size: int = 1024) -> Path:
    """Directory of a byte-level BPE tokenizer with bos/eos/pad and a ChatML template with generation markers."""
    target = _spec_dir("tokenizer", {"vocab": vocab_size})
    return _build_atomically(target, lambda tmp: _build_tokenizer(tmp, vocab_size))


def tiny_tokenizer(vocab_size: int = 1024):
    """The tiny tokenizer, loaded with its class kept explicit (AutoTokenizer would swap Qwen's pre-tokenizer in)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir(vocab_size))


def tiny_model_dir(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 1024,
                   seed: int = 0) -> Path:
    """Directory of a randomly initialised tiny causal LM (``llama`` or ``qwen2``) with the tiny tokenizer beside it.

    It loads like a hub checkpoint: ``load_model(str(tiny_model_dir()))``. Default: hidden 64, 2 layers, 4 heads,
    2 KV heads (~140k parameters).
    """
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny_model_dir(arch={arch!r}): unknown architecture; use one of {TINY_ARCHITECTURES}")
    spec = {"arch": arch, "hidden": hidden_size, "layers": num_layers, "vocab": vocab_size, "seed": seed}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

        tokenizer = tiny_tokenizer(vocab_size)
        common = dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
            # Wider than the usual 0.02: with frozen norms and LM head (LoRA), a 64-wide model initialised at 0.02
            # can only produce near-uniform logits, and its loss could barely move.
            initializer_range=0.1,
        )
        config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _build_atomically(_spec_dir(f"model-{arch}", spec), build)
