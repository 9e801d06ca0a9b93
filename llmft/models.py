"""Load a (4-bit) model with LoRA through Unsloth's FastLanguageModel, pick the dtype for the hardware, and save or
reload adapters.

Always Unsloth: on a GPU its fast kernels, on a CPU its CPU mode (same API, real bitsandbytes 4-bit layers), so the
code users run on a T4 is the code our tests run here.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Sequence

from llmft._unsloth import import_unsloth
from llmft.configs import DEFAULT_TARGET_MODULES, ModelConfig  # noqa: F401  (DEFAULT_TARGET_MODULES: also here)
from llmft.environment import is_main_process
from llmft.runtime import preflight, require_gpu

_D = ModelConfig  # load_model's defaults are ModelConfig's (written once, with their help)
HUB_HOST = "huggingface.co"


def pick_dtype():
    """Compute dtype for the hardware: bf16 where the GPU supports it (Ampere+), fp16 on a T4 (no bf16), and
    ``None`` on a CPU (Unsloth's CPU mode picks float32 itself)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_compute_dtype() -> str:
    """What Unsloth's CPU mode computes in on this machine: "bfloat16" where the CPU has native bf16 (AMX /
    AVX512-BF16, or forced with ``UNSLOTH_CPU_BF16=1``), else "float32"; "cuda" on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    from unsloth_zoo.cpu.runtime import cpu_bf16_supported

    return "bfloat16" if cpu_bf16_supported() else "float32"


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_model_source(model_name: str) -> None:
    """Fail fast, with a clear message, when ``model_name`` is a hub id that cannot be fetched here.

    A local directory always passes. A hub id passes when it is in the local Hugging Face cache or the hub answers
    within a few seconds; otherwise transformers would hang for up to a minute per lookup before failing.
    """
    if os.path.isdir(model_name):
        return
    if os.path.exists(model_name):
        raise ValueError(f"model_name={model_name!r} is a file; pass the directory that holds config.json")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_name, "config.json"), str):
        return
    if _offline_env() or not _hub_reachable():
        why = "HF_HUB_OFFLINE=1 is set" if _offline_env() else f"{HUB_HOST} cannot be reached from this machine"
        raise OSError(
            f"model_name={model_name!r} looks like a Hugging Face hub id, it is not in the local cache, and {why}. "
            "Pass a local model directory instead (offline tests and smoke mode use "
            "llmft.testing.tiny_model_dir()), or run where the hub is reachable.")


def hub_token() -> str | None:
    """A Hugging Face token from ``HF_TOKEN``, Colab's secrets (``userdata``) or Kaggle's secrets, in that order;
    ``None`` when there is none (public models need none). Never printed or saved by llmft."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:  # Colab: the key icon in the left bar, secret named HF_TOKEN
        from google.colab import userdata  # type: ignore

        return userdata.get("HF_TOKEN")
    except Exception:  # noqa: BLE001 - not on Colab, or no such secret
        pass
    try:  # Kaggle: Add-ons > Secrets, secret named HF_TOKEN
        from kaggle_secrets import UserSecretsClient  # type: ignore

        return UserSecretsClient().get_secret("HF_TOKEN")
    except Exception:  # noqa: BLE001 - not on Kaggle, or no such secret
        return None


def load_model(
    model_name: str,
    *,
    max_seq_length: int = _D.max_seq_length,
    load_in_4bit: bool = _D.load_in_4bit,
    dtype=_D.dtype,
    lora_r: int | None = _D.lora_r,
    lora_alpha: int | None = _D.lora_alpha,
    lora_dropout: float = _D.lora_dropout,
    target_modules: Sequence[str] = _D.target_modules,
    use_rslora: bool = _D.use_rslora,
    use_gradient_checkpointing: bool | str = _D.use_gradient_checkpointing,
    chat_template: str | None = _D.chat_template,
    seed: int = _D.seed,
    token: str | None = _D.token,
    allow_cpu: bool | None = _D.allow_cpu,
    **from_pretrained_kwargs,
):
    """Load ``model_name`` (hub id, local model directory, or a directory of saved LoRA adapters) with Unsloth.

    Returns ``(model, tokenizer)``. With ``lora_r`` set (default 16) the model gets LoRA adapters on
    ``target_modules`` (all attention and MLP projections); ``lora_alpha`` defaults to ``lora_r``; ``use_rslora``
    scales by alpha/sqrt(r). ``lora_r=None`` returns the plain (frozen, 4-bit) model. A directory with
    ``adapter_config.json`` (from :func:`save_adapters`) is reloaded as base + those adapters, ready for inference or
    further training. ``dtype=None`` follows :func:`pick_dtype` (bf16, fp16 on a T4, float32 on CPU).
    ``chat_template`` applies an Unsloth template name (e.g. "llama-3.1") to the tokenizer. ``token``: a hub token for
    gated models; by default :func:`hub_token` reads it from ``HF_TOKEN`` or Colab/Kaggle secrets (never hard-code it).
    A hub id with no CUDA GPU stops with how to pick a T4 (:func:`llmft.runtime.require_gpu`) unless smoke mode,
    ``LLMFT_ALLOW_CPU=1`` or ``allow_cpu=True``; local directories always load. The first load prints a one-line
    preflight summary (GPU, VRAM, precision, versions).
    """
    import_unsloth()
    from unsloth import FastLanguageModel

    ModelConfig(name=model_name, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, dtype=dtype,  # checks
                lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                use_rslora=use_rslora, use_gradient_checkpointing=use_gradient_checkpointing,
                chat_template=chat_template, seed=seed, token=token, allow_cpu=allow_cpu)
    adapter_dir = os.path.isdir(model_name) and os.path.exists(os.path.join(model_name, "adapter_config.json"))
    if not os.path.isdir(model_name):
        require_gpu(f"load_model({model_name!r})", allow_cpu=allow_cpu)
    if not adapter_dir:
        check_model_source(model_name)
    preflight(dtype if dtype is not None else pick_dtype(), allow_cpu=allow_cpu)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        dtype=dtype if dtype is not None else pick_dtype(),
        load_in_4bit=load_in_4bit,
        token=token or (None if adapter_dir or os.path.isdir(model_name) else hub_token()),
        random_state=seed,
        **from_pretrained_kwargs,
    )
    if lora_r is not None and not adapter_dir:
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora_r,
            lora_alpha=lora_alpha if lora_alpha is not None else lora_r,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            bias="none",
            use_gradient_checkpointing=use_gradient_checkpointing,
            use_rslora=use_rslora,
            random_state=seed,
        )
    if adapter_dir:
        restore_saved_adapter_dtype(model, model_name)
    if chat_template is not None:
        from llmft.templates import apply_chat_template

        tokenizer = apply_chat_template(tokenizer, chat_template)
    return model, tokenizer


def restore_saved_adapter_dtype(model, adapter_dir: str, adapter_name: str | None = None) -> None:
    """Keep reloaded adapters in the dtype they were saved in (only adapter ``adapter_name`` when given).

    TRL casts QLoRA adapter weights to bf16 when it builds a trainer (QLoRA paper recipe), so trained adapters are
    saved in bf16; PEFT upcasts them to float32 on load. An untrained fp32 adapter on a bf16 base is the reverse:
    PEFT's ``load_adapter(autocast_adapter_dtype=False)`` creates it in bf16. Same values, different compute
    precision: greedy generations of the reloaded model could differ from the model that was saved. Casting to the
    saved dtype makes the reload exact.
    """
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.exists():
        return
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        if not keys:
            return
        dtype = handle.get_slice(keys[0]).get_dtype()
    import torch

    saved = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype)
    if saved is None:
        return
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != saved and (adapter_name is None or f".{adapter_name}." in name + "."):
            param.data = param.data.to(saved)


def save_adapters(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save only the LoRA adapters (a few MB) and the tokenizer to ``path``; reload with ``load_model(path)``. With
    several processes (torchrun) only the main one writes; every one returns the path."""
    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapters: the model has no LoRA adapters (load it with lora_r set, the default)")
    path = Path(path)
    if not is_main_process():
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_active_adapter(model, path)
    tokenizer.save_pretrained(str(path))
    return path


def save_active_adapter(model, path: str | os.PathLike) -> None:
    """``model.save_pretrained`` for the trained adapter only: DPO adds a frozen ``ref`` copy that must not be saved
    alongside (it would double the size and is not part of the result)."""
    active = getattr(model, "active_adapter", None)
    if hasattr(model, "peft_config") and isinstance(active, str) and len(model.peft_config) > 1:
        model.save_pretrained(str(path), selected_adapters=[active])
    else:
        model.save_pretrained(str(path))


def export_merged(model, tokenizer, path: str | os.PathLike, save_method: str = "merged_16bit") -> Path:
    """Merge the adapters into the base weights and save a standalone model with Unsloth's
    ``save_pretrained_merged`` (``save_method``: "merged_16bit" or "merged_4bit"; 16-bit is what vLLM and the hub
    expect). Needs room for the full 16-bit model on disk (about 6.5 GB for a 3B model). On a CPU, Unsloth can only
    merge a model loaded with ``load_in_4bit=False``; on a GPU a 4-bit base is dequantized for the merge."""
    if not hasattr(model, "save_pretrained_merged"):
        raise ValueError("export_merged: this model was not loaded through llmft.load_model / Unsloth")
    path = Path(path)
    model.save_pretrained_merged(str(path), tokenizer, save_method=save_method)
    return path
