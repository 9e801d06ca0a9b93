"""Generation: one response (sampling with min_p/temperature, optional streaming) or many prompts batched with left
padding and a progress bar. Both return only the newly generated text.

A prompt is either a string (sent as is, e.g. an Alpaca prompt) or a chat: a list of ``{role, content}`` messages,
rendered with the tokenizer's chat template and the assistant header appended.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence, Union

from tqdm.auto import tqdm

from llmft.models import restore_saved_adapter_dtype

Prompt = Union[str, Sequence[dict]]


def render_prompt(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """Return ``(text, add_special_tokens)``: chats go through the chat template (which already carries BOS)."""
    if isinstance(prompt, str):
        return prompt, True
    if isinstance(prompt, dict):
        prompt = [prompt]
    from llmft.templates import require_chat_template

    messages = list(prompt)
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise TypeError("prompt: expected a string or a list of {'role': ..., 'content': ...} messages, got "
                        f"{type(prompt).__name__}")
    require_chat_template(tokenizer, "chat prompts (lists of {role, content} messages)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


@contextmanager
def inference_mode(model):
    """Unsloth's fast inference mode for the duration of a block; back to training mode after if it was training."""
    from unsloth import FastLanguageModel

    was_training = model.training
    FastLanguageModel.for_inference(model)
    try:
        yield model
    finally:
        if was_training:
            FastLanguageModel.for_training(model)


@contextmanager
def left_padding(tokenizer):
    """Pad on the left for the duration of a block (decoder-only models continue from the last real token, so a
    batch's last position must be real for every row); the tokenizer's own side is restored after."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = padding_side


def pad_token_id(tokenizer) -> int | None:
    """The id inputs are padded with: the tokenizer's pad id, else its eos id. An id of 0 is a real id (``<unk>``,
    the pad of the Llama-2 / Mistral family), so this tests for None, never for truth."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sampling_kwargs(do_sample: bool, temperature: float | None, min_p: float | None, tokenizer) -> dict:
    kwargs = {"do_sample": do_sample, "pad_token_id": pad_token_id(tokenizer)}
    if do_sample:
        if temperature is not None:
            kwargs["temperature"] = temperature
        if min_p is not None:
            kwargs["min_p"] = min_p
    return kwargs


def generate_response(model, tokenizer, prompt: Prompt, *, max_new_tokens: int = 256, do_sample: bool = True,
                      temperature: float = 1.5, min_p: float = 0.1, stream: bool = False, **generate_kwargs) -> str:
    """Generate one response. Defaults follow Unsloth's advice for chat models: ``temperature=1.5`` with
    ``min_p=0.1`` (min_p drops tokens less than 10% as likely as the best one, which keeps a high temperature
    coherent). ``do_sample=False`` gives greedy decoding. ``stream=True`` prints tokens as they come."""
    import torch
    from transformers import TextStreamer

    text, special = render_prompt(tokenizer, prompt)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(model.device)
    if stream:
        generate_kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with inference_mode(model), torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                **_sampling_kwargs(do_sample, temperature, min_p, tokenizer), **generate_kwargs)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_batch(model, tokenizer, prompts: Sequence[Prompt], *, batch_size: int = 8, max_new_tokens: int = 128,
                   do_sample: bool = False, temperature: float | None = None, min_p: float | None = None,
                   progress: bool = True, desc: str = "generating", across_processes: bool = False,
                   **generate_kwargs) -> list[str]:
    """Generate for many prompts, ``batch_size`` at a time with left padding; greedy by default. Returns the new
    text of each prompt, in order.

    Several processes (torchrun, data parallel): by default each process generates every prompt itself (call it on
    the main process only — ``if llmft.runtime.is_main_process():`` — to spend one GPU). ``across_processes=True``
    splits the prompts among the processes in order (accelerate's ``split_between_processes``) and gathers the answers
    (``gather_object``): every process gets all of them, once each and in order, in 1/N of the time; every process
    must then make the call. In a single process it changes nothing. Under DDP pass the unwrapped model (the
    trainer's ``trainer.model``, which is what callbacks receive), not ``trainer.model_wrapped``."""
    if batch_size < 1:
        raise ValueError(f"generate_batch(batch_size={batch_size}): must be at least 1")
    rendered = [render_prompt(tokenizer, p) for p in prompts]  # every process checks every prompt: same errors
    if len({special for _, special in rendered}) > 1:  # chats and plain strings differ in BOS handling
        raise ValueError("generate_batch: mix of chat and plain-string prompts; pass one kind per call")
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                   min_p=min_p, desc=desc, **generate_kwargs)
    from llmft.environment import is_main_process, process_count

    if not across_processes or process_count() <= 1:
        return _generate_here(model, tokenizer, rendered, progress=progress and is_main_process(), **options)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    with PartialState().split_between_processes(rendered) as share:
        answers = _generate_here(model, tokenizer, share, progress=progress and is_main_process(), **options)
    return gather_object(answers)


def _generate_here(model, tokenizer, rendered: list[tuple[str, bool]], *, batch_size: int, max_new_tokens: int,
                   do_sample: bool, temperature: float | None, min_p: float | None, progress: bool, desc: str,
                   **generate_kwargs) -> list[str]:
    """:func:`generate_batch` in this process alone, on prompts already rendered (:func:`render_prompt`)."""
    import torch

    results: list[str] = []
    if tokenizer.pad_token is None:  # pad with eos; generate gets the same id (pad_token_id)
        tokenizer.pad_token = tokenizer.eos_token
    with left_padding(tokenizer), inference_mode(model), torch.no_grad(), \
            tqdm(total=len(rendered), desc=desc, disable=not progress) as bar:
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start:start + batch_size]
            inputs = tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True,
                               add_special_tokens=chunk[0][1]).to(model.device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                    **_sampling_kwargs(do_sample, temperature, min_p, tokenizer),
                                    **generate_kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            results += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            bar.update(len(chunk))
    return results


# --------------------------------------------------------------------------------------------------------------------
# base vs adapters, cached on disk
# --------------------------------------------------------------------------------------------------------------------
def _cache_file(cache_dir, name: str, prompts, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps({"prompts": list(map(str, prompts)), **settings}, sort_keys=True).encode())
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return Path(cache_dir) / f"{safe}-{key.hexdigest()[:12]}.json"


def generate_cached(model, tokenizer, prompts, name: str, cache_dir, *, batch_size: int = 8,
                    max_new_tokens: int = 128, **generate_options) -> list[str]:
    """:func:`generate_batch` with the answers written to ``cache_dir`` after every batch, so a disconnect
    loses at most one batch and a re-run continues where it stopped. Under torchrun every process generates and only
    the main one writes the cache."""
    from llmft.environment import is_main_process

    settings = {"max_new_tokens": max_new_tokens, **{k: repr(v) for k, v in generate_options.items()}}
    path = _cache_file(cache_dir, name, prompts, settings)
    done = json.loads(path.read_text()) if path.exists() else []
    writes = is_main_process()
    with tqdm(total=len(prompts), initial=len(done), desc=f"generating ({name})", disable=not writes) as bar:
        for start in range(len(done), len(prompts), batch_size):
            done += generate_batch(model, tokenizer, prompts[start:start + batch_size], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=False, **generate_options)
            if writes:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(done))
                os.replace(tmp, path)
            bar.update(min(batch_size, len(prompts) - start))
    return done


def generate_by_model(model, tokenizer, prompts, adapters: dict | None = None, *, include_base: bool = True,
                      cache_dir: str | os.PathLike = "outputs/generations", batch_size: int = 8,
                      max_new_tokens: int = 128, **generate_options) -> "OrderedDict[str, list[str]]":
    """Answers to ``prompts`` from the base model (adapter disabled) and each named adapter, all on one base model in
    memory: ``adapters`` maps a name to an adapter directory, loaded with PEFT's ``load_adapter``. Batched, greedy by
    default, cached per batch in ``cache_dir`` (see :func:`generate_cached`)."""
    if not hasattr(model, "load_adapter"):
        raise ValueError("generate_by_model: model must be a PEFT model; load it with llmft.load_model (lora_r set)")
    answers: "OrderedDict[str, list[str]]" = OrderedDict()
    settings = dict(cache_dir=cache_dir, batch_size=batch_size, max_new_tokens=max_new_tokens, **generate_options)
    if include_base:
        with model.disable_adapter():
            answers["base"] = generate_cached(model, tokenizer, prompts, "base", **settings)
    previous = model.active_adapter
    try:
        for name, path in (adapters or {}).items():
            if not os.path.exists(os.path.join(path, "adapter_config.json")):
                raise FileNotFoundError(f"adapters[{name!r}] = {path!r} has no adapter_config.json")
            adapter_name = f"llmft_{name}"
            if adapter_name not in model.peft_config:
                model.load_adapter(path, adapter_name=adapter_name)
                # in the dtype it was saved in: the same greedy answers as the model that was saved
                restore_saved_adapter_dtype(model, path, adapter_name)
            model.set_adapter(adapter_name)
            answers[name] = generate_cached(model, tokenizer, prompts, f"{name}-{Path(path).resolve()}", **settings)
    finally:
        model.set_adapter(previous)
    return answers
