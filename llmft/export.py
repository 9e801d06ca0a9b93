"""Take the fine-tune home: a merged 16-bit model, a GGUF file for llama.cpp / Ollama / LM Studio, and an Ollama
``Modelfile``, each checked by loading it back.

:func:`export_gguf` merges the LoRA adapters (:func:`llmft.models.export_merged`), converts the merged folder with
llama.cpp's own converter (``convert_hf_to_gguf.py`` and its ``gguf-py``; tokenizer and chat template go into the
file), writes a Modelfile whose ``TEMPLATE`` and ``PARAMETER stop`` come from the tokenizer's chat template, and then
loads the GGUF back with transformers (``gguf_file=``, dequantized) to compare greedy answers with the merged model:
"8/8 identical" is printed and returned, not assumed.

The converter is pinned: the copy of llama.cpp inside the ``llama-cpp-python==0.3.36`` source archive on PyPI, fetched
once with pip (sha256 checked) into :func:`llmft.runtime.download_dir` and run as a subprocess, offline afterwards.
``f16`` and ``q8_0`` come out of the converter itself; ``q4_k_m`` needs llama.cpp's compiled quantizer
(``llama-quantize``), which llmft does not build. On a Colab GPU, Unsloth's own ``model.save_pretrained_gguf(dir,
tokenizer, quantization_method="q4_k_m")`` builds llama.cpp and quantizes (it needs the network and a GPU; llmft's
tests cannot run it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from llmft.generation import generate_batch
from llmft.log import say
from llmft.models import export_merged
from llmft.runtime import build_atomically, download_dir, pinned_download


@dataclass(frozen=True)
class PinnedArchive:
    """A source archive on PyPI that carries llama.cpp, and the parts of it the GGUF export uses."""

    distribution: str
    version: str
    filename: str
    sha256: str
    root: str  # folder inside the archive that holds llama.cpp
    members: tuple[str, ...]  # files and folders below ``root`` to extract


LLAMA_CPP = PinnedArchive(
    "llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    "llama_cpp_python-0.3.36/vendor/llama.cpp", ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE"))
CONVERTER_ENV = "LLMFT_LLAMA_CPP"  # a folder holding convert_hf_to_gguf.py (e.g. a llama.cpp checkout) instead
QUANTIZER_ENV = "LLMFT_LLAMA_QUANTIZE"  # path of a built llama-quantize, when it is not on PATH
CONVERTER_TYPES = ("f16", "q8_0")  # written by the converter itself
QUANTIZER_TYPES = {"q4_k_m": "Q4_K_M"}  # need llama-quantize
QUANTIZATIONS = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)

# Short chat prompts on which the exported file must answer like the merged model (greedy, so any weight change that
# matters shows as a different token).
VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Name three colors.",
    "Explain what a list is in Python.",
    "Continue the sequence: 2, 4, 6, 8,",
    "How do you say hello in Spanish?",
    "What is the opposite of hot?",
)


class GGUFExportError(RuntimeError):
    """A GGUF export step failed; the message says which step, what it printed and how to fix it."""


# --------------------------------------------------------------------------------------------------------------------
# The pinned converter and the quantizer
# --------------------------------------------------------------------------------------------------------------------
def llama_cpp_archive(archive: PinnedArchive = LLAMA_CPP) -> Path:
    """The pinned source archive, downloaded once with pip into ``download_dir()`` (``pip download --no-binary
    --require-hashes``: the hash is checked by pip and again here). About 77 MB; nothing is built."""
    try:
        return pinned_download(archive.distribution, archive.version, archive.sha256, download_dir(), archive.filename,
                               source=True, what="~77 MB, llama.cpp's GGUF converter",
                               fix=f"set {CONVERTER_ENV} to a llama.cpp folder that holds convert_hf_to_gguf.py")
    except FileNotFoundError as exc:
        raise GGUFExportError(str(exc)) from None


def _extract_converter(out: Path, archive: PinnedArchive) -> None:
    source = llama_cpp_archive(archive)
    wanted = [f"{archive.root}/{m}" for m in archive.members]
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers()
                   if any(m.name == w or m.name.startswith(w + "/") for w in wanted) and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len(archive.root) + 1:]
        tar.extractall(out, members=members, filter="data")
    missing = [m for m in archive.members if not (out / m).exists()]
    if missing:
        raise GGUFExportError(f"{source}: {missing} not found under {archive.root}/ in the archive")
    (out / "SOURCE.json").write_text(json.dumps({
        "distribution": archive.distribution, "version": archive.version, "archive": archive.filename,
        "sha256": archive.sha256, "extracted": list(archive.members)}, indent=2) + "\n")


def gguf_converter(archive: PinnedArchive = LLAMA_CPP) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/``):
    ``$LLMFT_LLAMA_CPP`` when set, else the pinned copy extracted once into ``download_dir()``."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        if not (Path(override) / "convert_hf_to_gguf.py").exists():
            raise GGUFExportError(f"{CONVERTER_ENV}={override}: no convert_hf_to_gguf.py there. Point it at a "
                                  "llama.cpp folder, or unset it to use llmft's pinned copy.")
        return Path(override)
    target = download_dir() / f"llama.cpp-{archive.version}"
    return build_atomically(target, lambda tmp: _extract_converter(tmp, archive))


def find_quantizer() -> str | None:
    """A built ``llama-quantize``: ``$LLMFT_LLAMA_QUANTIZE``, else one on PATH; ``None`` when there is none."""
    return os.environ.get(QUANTIZER_ENV) or shutil.which("llama-quantize")


def _no_quantizer_message(quantization: str) -> str:
    archive = download_dir() / LLAMA_CPP.filename
    return (
        f"export_gguf(quantization={quantization!r}) needs llama.cpp's compiled quantizer (llama-quantize), and none "
        f"was found (not on PATH, {QUANTIZER_ENV} not set); {' and '.join(map(repr, CONVERTER_TYPES))} need none. "
        f"To get one: build it from the pinned sources (a C++ compiler and cmake, several minutes): tar xzf {archive} "
        f"&& cmake -S {LLAMA_CPP.root} -B llama-build -DLLAMA_CURL=OFF && cmake --build llama-build --target "
        f"llama-quantize -j && export {QUANTIZER_ENV}=$PWD/llama-build/bin/llama-quantize. On a Colab GPU, "
        "Unsloth's model.save_pretrained_gguf(dir, tokenizer, quantization_method='q4_k_m') builds llama.cpp itself "
        "(network and GPU needed; not verified by llmft).")


def _run(step: str, command: list[str], hint: str = "") -> float:
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-1500:]
        raise GGUFExportError(f"{step} failed (exit {done.returncode}): {' '.join(command)}\n{tail}"
                              + (f"\n{hint}" if hint else ""))
    return time.time() - start


def convert_to_gguf(merged_dir: str | os.PathLike, outfile: str | os.PathLike, quantization: str = "q8_0") -> Path:
    """Write ``outfile`` from a merged model folder (what :func:`llmft.models.export_merged` writes) with the pinned
    converter, in a subprocess with no network; ``q4_k_m`` goes through f16 and ``llama-quantize``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use one of {QUANTIZATIONS}")
    quantizer = None
    if quantization in QUANTIZER_TYPES:
        quantizer = find_quantizer()
        if quantizer is None:
            raise GGUFExportError(_no_quantizer_message(quantization))
    script = gguf_converter() / "convert_hf_to_gguf.py"
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    first = outfile.with_name(outfile.name + ".f16.tmp") if quantizer else outfile
    hint = ("llama.cpp's converter recognises a tokenizer by how it splits a test text; a tokenizer it has never "
            "seen (e.g. a home-made BPE) cannot be written to GGUF. Use the base model's own tokenizer.")
    _run("llama.cpp's convert_hf_to_gguf.py", [sys.executable, str(script), str(merged_dir), "--outfile", str(first),
                                               "--outtype", "f16" if quantizer else quantization], hint)
    if quantizer:
        try:
            _run("llama-quantize", [quantizer, str(first), str(outfile), QUANTIZER_TYPES[quantization]])
        finally:
            first.unlink(missing_ok=True)
    return outfile


# --------------------------------------------------------------------------------------------------------------------
# Ollama Modelfile: the chat template as fixed text around each message
# --------------------------------------------------------------------------------------------------------------------
_SENTINELS = {"system": "llmft-system-0a1b", "user": "llmft-user-2c3d", "assistant": "llmft-assistant-4e5f",
              "user2": "llmft-user-6a7b"}


@dataclass(frozen=True)
class ChatPieces:
    """A chat template as the literal text around each message: what an Ollama ``TEMPLATE`` (Go text/template over
    ``.Messages``) can hold. A system message is only supported first, followed by a user message (as chat
    templates and Ollama use it); tool calls are not covered."""

    first_user_open: str  # before the first user message of a chat with no system message
    system_open: str | None  # before a leading system message's content (None: the template has no system role)
    system_close: str  # between that system content and the first user content
    user_open: str  # before any later user message
    user_close: str
    assistant_open: str
    assistant_close: str
    generation_prompt: str  # after the last message when it is not the assistant's

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text Ollama builds from :meth:`go_template` for ``messages`` (the generation prompt follows a
        last message that is not the assistant's)."""
        out = []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "user":
                if i == 0:
                    out.append(self.first_user_open)
                elif i == 1 and messages[0]["role"] == "system" and self.system_open is not None:
                    out += [self.system_open, messages[0]["content"], self.system_close]
                else:
                    out.append(self.user_open)
                out += [content, self.user_close]
            elif role == "assistant":
                out += [self.assistant_open, content, self.assistant_close]
            if i == len(messages) - 1 and role != "assistant":
                out.append(self.generation_prompt)
        return "".join(out)

    def go_template(self) -> str:
        """The same rendering as Go text/template source for an Ollama Modelfile's ``TEMPLATE``. One line without
        trim markers: ``{{-`` would also eat newlines that belong to the chat format."""
        def text(piece: str) -> str:
            return piece.replace("{{", '{{ "{{" }}')

        system = ('{{ else if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}' + text(self.system_open)
                  + "{{ (index $.Messages 0).Content }}" + text(self.system_close)) if self.system_open is not None else ""
        return ("{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                '{{ if eq .Role "user" }}{{ if eq $i 0 }}' + text(self.first_user_open) + system
                + "{{ else }}" + text(self.user_open) + "{{ end }}{{ .Content }}" + text(self.user_close)
                + '{{ else if eq .Role "assistant" }}' + text(self.assistant_open) + "{{ .Content }}"
                + text(self.assistant_close) + "{{ end }}"
                + '{{ if and $last (ne .Role "assistant") }}' + text(self.generation_prompt) + "{{ end }}{{ end }}")


def _cut(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ValueError(f"chat template: {what}: the message text appears {text.count(marker)} times in {text!r}")
    before, after = text.split(marker)
    return before, after


def _after(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ValueError(f"chat template: {what}: adding a message changes the text before it ({shorter!r} is not a "
                         f"prefix of {longer!r})")
    return longer[len(shorter):]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (llama.cpp's ``add_bos_token``)."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def chat_prompt_text(tokenizer, messages: Sequence[dict], *, drop_bos: bool,
                     add_generation_prompt: bool | None = None) -> str:
    """The tokenizer's chat template rendering of ``messages`` as a chat client sends it (by default the generation
    prompt follows a last message that is not the assistant's), without a leading BOS when ``drop_bos`` (llama.cpp
    adds it itself)."""
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if drop_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


CHECK_CHATS = (  # every shape the pieces must reproduce; contents unlike the sentinels, one with a line break
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Write two lines:\nred, blue"}],
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}],
)


def chat_pieces(tokenizer, *, drop_bos: bool | None = None) -> ChatPieces:
    """Cut the tokenizer's chat template into :class:`ChatPieces` by rendering chats with marker texts, then check
    that the pieces reproduce the template on :data:`CHECK_CHATS` exactly. ``drop_bos`` (default: whether the
    tokenizer adds BOS to plain text itself) leaves a leading BOS out, as llama.cpp adds it when it tokenizes.
    Raises ``ValueError`` naming the chat that differs when the template is not fixed text around each message."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_pieces: the tokenizer has no chat template")
    if drop_bos is None:
        drop_bos = adds_bos(tokenizer)
    s = _SENTINELS
    system, user, assistant, user2 = ({"role": r, "content": s[k]} for r, k in
                                      (("system", "system"), ("user", "user"), ("assistant", "assistant"),
                                       ("user", "user2")))

    def render(messages, generation=False):
        return chat_prompt_text(tokenizer, messages, drop_bos=drop_bos, add_generation_prompt=generation)

    one = render([user])
    first_user_open, user_close = _cut(one, s["user"], "first user message")
    assistant_open, assistant_close = _cut(_after(render([user, assistant]), one, "assistant reply"),
                                           s["assistant"], "assistant reply")
    user_open, user_close_again = _cut(_after(render([user, assistant, user2]), render([user, assistant]),
                                              "second user message"), s["user2"], "second user message")
    if user_close_again != user_close:
        raise ValueError(f"chat template: the first and later user messages end differently ({user_close!r} vs "
                         f"{user_close_again!r})")
    generation_prompt = _after(render([user], True), one, "generation prompt")
    try:
        with_system = render([system, user])
    except Exception:  # noqa: BLE001 - templates without a system role raise (e.g. "System role not supported")
        system_open, system_close = None, ""
    else:
        system_open, rest = _cut(with_system, s["system"], "system message")
        system_close, tail = _cut(rest, s["user"], "user message after the system message")
        if tail != user_close:
            raise ValueError(f"chat template: a user message after a system message ends with {tail!r}, elsewhere "
                             f"with {user_close!r}")
    pieces = ChatPieces(first_user_open, system_open, system_close, user_open, user_close, assistant_open,
                        assistant_close, generation_prompt)
    for chat in CHECK_CHATS:
        if chat[0]["role"] == "system" and system_open is None:
            continue
        expected, got = chat_prompt_text(tokenizer, chat, drop_bos=drop_bos), pieces.render(chat)
        if got != expected:
            raise ValueError(f"chat template: not fixed text around each message, so an Ollama TEMPLATE cannot "
                             f"reproduce it: for {chat} the template gives {expected!r}, the pieces {got!r}")
    return pieces


def stop_tokens(tokenizer, pieces: ChatPieces | None, eos_token_ids: Sequence[int] = ()) -> list[str]:
    """What ends an answer: the token that closes an assistant turn in the chat template (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama-3, ``</s>`` for Mistral) and the model's end-of-sequence tokens."""
    found = []
    if pieces is not None and pieces.assistant_close.strip():
        found.append(pieces.assistant_close.strip())
    ids = list(eos_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    found += [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return list(dict.fromkeys(t for t in found if t))


def modelfile_text(gguf_name: str, tokenizer, *, eos_token_ids: Sequence[int] = (), drop_bos: bool | None = None,
                   pieces: ChatPieces | None = None) -> str:
    """An Ollama Modelfile for ``gguf_name`` (next to it): ``FROM``, ``TEMPLATE`` from :func:`chat_pieces` and one
    ``PARAMETER stop`` per :func:`stop_tokens`. Pass ``pieces`` when they are known (``None`` and a tokenizer without a
    chat template: no TEMPLATE, Ollama sends the raw prompt)."""
    if pieces is None and getattr(tokenizer, "chat_template", None):
        pieces = chat_pieces(tokenizer, drop_bos=drop_bos)
    lines = ["# Ollama Modelfile written by llmft.export_gguf. Run: ollama create my-model -f Modelfile",
             "#                                          then: ollama run my-model", f"FROM ./{gguf_name}"]
    if pieces is not None:
        template = pieces.go_template()
        if '"""' in template:
            raise ValueError('modelfile_text: the chat template holds """, which ends a Modelfile TEMPLATE')
        lines.append(f'TEMPLATE """{template}"""')
    for token in stop_tokens(tokenizer, pieces, eos_token_ids):
        if '"' in token:
            raise ValueError(f"modelfile_text: stop token {token!r} holds a double quote")
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Checks on the written file
# --------------------------------------------------------------------------------------------------------------------
def gguf_metadata(gguf_path: str | os.PathLike) -> dict:
    """The GGUF file's tokenizer and model fields that the checks read (gguf's ``GGUFReader``), plus tensor types."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    wanted = ("general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
              "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    info = {key: reader.fields[key].contents() for key in wanted if key in reader.fields}
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    info["tensor_types"] = types
    return info


def tokenizer_kind(tokenizer) -> str | None:
    """The tokenizer family as GGUF names it: "gpt2" for byte-level BPE (a ``ByteLevel`` pre-tokenizer: Llama-3,
    Qwen, SmolLM), "llama" for SentencePiece-style vocabularies (Llama-2, Mistral); ``None`` when it cannot tell."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "llama" if hasattr(tokenizer, "sp_model") else None
    return "gpt2" if '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer")) else "llama"


def check_gguf_tokenizer(info: dict, tokenizer) -> list[str]:
    """What differs between the tokenizer written into the GGUF file (``info`` from :func:`gguf_metadata`) and
    ``tokenizer``: family (how llama.cpp will split text), vocabulary (token strings in id order), end-of-sequence
    id, chat template. Empty when all agree. The greedy comparison cannot see these: it feeds both models the same
    token ids from ``tokenizer``."""
    problems = []
    kind, written = tokenizer_kind(tokenizer), info.get("tokenizer.ggml.model")
    if kind is not None and written != kind:
        model = json.loads(tokenizer.backend_tokenizer.to_str())
        problems.append(
            f"the file's tokenizer is {written!r} but this one is {kind!r} (byte-level BPE is 'gpt2'): llama.cpp, "
            f"Ollama and LM Studio would split text into other tokens than training did. llama.cpp's converter "
            f"chose {written!r} from tokenizer.json (model.byte_fallback={model['model'].get('byte_fallback')}, "
            f"decoder {(model.get('decoder') or {}).get('type')}); a byte-level BPE tokenizer needs "
            "byte_fallback false and a ByteLevel decoder, as the hub's tokenizers have")
    tokens = info.get("tokenizer.ggml.tokens") or []
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if tokens[:len(ours)] != ours:
        first = next((i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))
        problems.append(f"vocabulary differs from id {first} on ({len(tokens)} tokens in the file, {len(ours)} in "
                        "the tokenizer)")
    if tokenizer.eos_token_id is not None and info.get("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        problems.append(f"eos id {info.get('tokenizer.ggml.eos_token_id')} in the file, {tokenizer.eos_token_id} "
                        f"({tokenizer.eos_token}) in the tokenizer")
    if getattr(tokenizer, "chat_template", None) and info.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("the chat template in the file differs from the tokenizer's")
    return problems


def _load_for_comparison(folder: Path, gguf_file: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    options = dict(dtype=torch.float16, device_map="cuda") if torch.cuda.is_available() else dict(dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, **options)


def compare_greedy(merged_dir: str | os.PathLike, gguf_path: str | os.PathLike, tokenizer,
                   prompts: Sequence = VERIFY_PROMPTS, *, max_new_tokens: int = 32,
                   eos_token_ids: Sequence[int] = ()) -> list[dict]:
    """Greedy answers of the merged model folder and of the GGUF file (loaded back by transformers, dequantized),
    on the same token ids (``tokenizer``), one model in memory at a time: ``[{prompt, merged, gguf, same}]``.
    Strings are chat prompts when the tokenizer has a chat template, else plain text. fp32 on a CPU, fp16 on a GPU."""
    import gc

    chats = [[{"role": "user", "content": p}] if isinstance(p, str) and getattr(tokenizer, "chat_template", None)
             else p for p in prompts]
    options = dict(max_new_tokens=max_new_tokens, progress=False)
    if eos_token_ids:
        options["eos_token_id"] = list(eos_token_ids)
    answers = {}
    gguf_path = Path(gguf_path)
    for name, (folder, gguf_file) in {"merged": (Path(merged_dir), None),
                                      "gguf": (gguf_path.parent, gguf_path.name)}.items():
        model = _load_for_comparison(folder, gguf_file)
        answers[name] = generate_batch(model, tokenizer, chats, **options)
        del model
        gc.collect()
    return [{"prompt": p, "merged": a, "gguf": b, "same": a == b}
            for p, a, b in zip(prompts, answers["merged"], answers["gguf"])]


# --------------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------------
def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote and how it checked: files, sizes (bytes), seconds per step, greedy answers, and
    the file's tokenizer and model fields (``metadata``, from :func:`gguf_metadata`: reading them again costs seconds
    for a large vocabulary)."""

    gguf: Path
    modelfile: Path
    merged_dir: Path
    quantization: str
    gguf_bytes: int
    merged_bytes: int
    seconds: dict = field(default_factory=dict)  # merge, convert, verify
    answers: list = field(default_factory=list)  # [{prompt, merged, gguf, same}]
    problems: list = field(default_factory=list)  # tokenizer / Modelfile findings, empty when all is well
    stop: list = field(default_factory=list)  # the Modelfile's stop tokens
    metadata: dict = field(default_factory=dict, repr=False)  # the file's fields, as gguf_metadata read them

    @property
    def identical(self) -> int:
        return sum(a["same"] for a in self.answers)

    @property
    def total(self) -> int:
        return len(self.answers)

    def __str__(self) -> str:
        size = f"{self.gguf.name} ({self.gguf_bytes / 1e6:.1f} MB; merged 16-bit {self.merged_bytes / 1e6:.1f} MB)"
        verdict = (f"{self.identical}/{self.total} greedy answers identical to the merged model" if self.answers
                   else "not verified")
        return f"GGUF {self.quantization}: {size}: {verdict}" + "".join(f"\n  problem: {p}" for p in self.problems)


def export_gguf(model, tokenizer, path: str | os.PathLike, quantization: str = "q8_0", *,
                prompts: Sequence | None = None, verify: bool = True, max_new_tokens: int = 32) -> GGUFExport:
    """Export a fine-tuned model for llama.cpp / Ollama / LM Studio and check it, into folder ``path``:

    - ``merged/``: the adapters merged into a standalone 16-bit model (:func:`llmft.models.export_merged`);
    - ``<name>.<QUANT>.gguf`` (``<name>`` = the folder's name): ``quantization`` "q8_0" (default, half the 16-bit
      size), "f16", or "q4_k_m" (needs a built ``llama-quantize``, see :func:`find_quantizer`), with the tokenizer and
      chat template inside, by llama.cpp's pinned converter (:func:`gguf_converter`);
    - ``Modelfile``: ``ollama create my-model -f Modelfile`` (TEMPLATE and stop tokens from the chat template).

    Then, with ``verify``, the file's tokenizer fields are compared with ``tokenizer`` and the GGUF is loaded back with
    transformers to answer ``prompts`` (default :data:`VERIFY_PROMPTS`) greedily next to the merged model; the result
    ("8/8 identical") is printed and returned as a :class:`GGUFExport`. f16 keeps the 16-bit weights (8/8 measured
    on SmolLM2-135M); q8_0 rounds every weight to 8 bits and may change an answer late (7/8 measured). Nothing here
    raises on a difference: read the result. On a CPU, Unsloth merges only a model loaded with
    ``load_in_4bit=False``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"export_gguf(quantization={quantization!r}): use one of {QUANTIZATIONS}")
    if quantization in QUANTIZER_TYPES and find_quantizer() is None:  # before the minutes of merging
        raise GGUFExportError(_no_quantizer_message(quantization))
    path = Path(path)
    gguf_converter()  # fetched (once) before the merge, so a missing network fails fast
    seconds = {}
    start = time.time()
    merged_dir = export_merged(model, tokenizer, path / "merged")
    seconds["merge"] = round(time.time() - start, 1)
    gguf = path / f"{path.name}.{quantization.upper()}.gguf"
    start = time.time()
    convert_to_gguf(merged_dir, gguf, quantization)
    seconds["convert"] = round(time.time() - start, 1)
    say(f"export_gguf: wrote {gguf} ({_size(gguf) / 1e6:.1f} MB) in {seconds['convert']:.0f} s")

    start = time.time()
    info = gguf_metadata(gguf)
    problems = check_gguf_tokenizer(info, tokenizer) if verify else []
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pieces = None
    if getattr(tokenizer, "chat_template", None):
        try:
            pieces = chat_pieces(tokenizer, drop_bos=bool(info.get("tokenizer.ggml.add_bos_token", False)))
        except ValueError as error:
            problems.append(f"Modelfile written without TEMPLATE (Ollama then uses its own guess): {error}")
    modelfile = path / "Modelfile"
    modelfile.write_text(modelfile_text(gguf.name, tokenizer, eos_token_ids=eos_ids, pieces=pieces))
    answers = []
    if verify:
        answers = compare_greedy(merged_dir, gguf, tokenizer, prompts or VERIFY_PROMPTS,
                                 max_new_tokens=max_new_tokens, eos_token_ids=eos_ids)
    seconds["verify"] = round(time.time() - start, 1)
    result = GGUFExport(gguf, modelfile, merged_dir, quantization, _size(gguf), _size(merged_dir), seconds, answers,
                        problems, stop_tokens(tokenizer, pieces, eos_ids), info)
    say(str(result))
    for answer in answers:
        if not answer["same"]:
            say(f"  differs on {answer['prompt']!r}: merged {answer['merged']!r} | gguf {answer['gguf']!r}")
    return result
