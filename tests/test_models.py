"""load_model through Unsloth's real (CPU-mode) path: 4-bit layers, LoRA placement, adapters round trip, errors."""
import importlib.metadata
import os
import sys

import pytest
import torch

import llmft
from llmft import _unsloth, models, testing

from conftest import CHAT_PROMPTS


def test_four_bit_base_with_lora_on_every_projection(lora_model):
    import bitsandbytes as bnb

    model, tokenizer = lora_model
    targeted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert targeted == set(models.DEFAULT_TARGET_MODULES)
    base_linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base_linears) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down), all quantized
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (8, 16, False)
    assert model.max_seq_length == 128


def test_lora_options_and_plain_model(tiny_dir):
    model, _ = llmft.load_model(tiny_dir, max_seq_length=64, lora_r=4, use_rslora=True,
                                target_modules=("q_proj", "v_proj"))
    config = model.peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 4 and config.use_rslora
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    plain, _ = llmft.load_model(tiny_dir, max_seq_length=64, lora_r=None)
    assert not hasattr(plain, "peft_config")
    with pytest.raises(ValueError, match="lora_r=0"):
        llmft.load_model(tiny_dir, lora_r=0)


def test_qwen2_architecture_loads():
    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir("qwen2")), max_seq_length=64, lora_r=4)
    assert type(model.base_model.model).__name__ == "Qwen2ForCausalLM"
    assert llmft.generate_batch(model, tokenizer, CHAT_PROMPTS[:1], max_new_tokens=3, progress=False)


def test_hub_id_while_offline_fails_fast_with_advice():
    with pytest.raises(OSError, match=r"'unsloth/Llama-3.2-3B-Instruct'.*HF_HUB_OFFLINE=1.*tiny_model_dir"):
        llmft.load_model("unsloth/Llama-3.2-3B-Instruct", allow_cpu=True)  # past the GPU guard (test_runtime.py)


def test_file_instead_of_model_directory(tiny_dir):
    with pytest.raises(ValueError, match="is a file"):
        models.check_model_source(os.path.join(tiny_dir, "config.json"))


def test_dtype_policy_on_this_machine():
    assert models.pick_dtype() is None if not torch.cuda.is_available() else models.pick_dtype() in (
        torch.float16, torch.bfloat16)


def test_pinned_cpu_precision_sets_threads_and_precision_and_restores_both():
    """What the demo pins so that its numbers do not move between machines (llmft.demo.THREADS, fp32)."""
    saved_env, saved_threads = os.environ.get("UNSLOTH_CPU_BF16"), torch.get_num_threads()
    threads = 2 if saved_threads != 2 else 1
    with _unsloth.pinned_cpu_precision(bf16=False, threads=threads) as pinned:
        assert pinned == {"device": "cpu", "compute_dtype": "float32", "threads": threads}
        assert torch.get_num_threads() == threads and os.environ["UNSLOTH_CPU_BF16"] == "0"
        assert models.cpu_compute_dtype() == "float32"
    assert torch.get_num_threads() == saved_threads and os.environ.get("UNSLOTH_CPU_BF16") == saved_env


@pytest.mark.numeric
def test_adapters_round_trip_gives_identical_generations(lora_model, tmp_path):
    model, tokenizer = lora_model
    with torch.no_grad():  # move the adapters away from their zero init so the test can tell them from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    before = llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, max_new_tokens=8, progress=False)
    with model.disable_adapter():
        base = llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, max_new_tokens=8, progress=False)
    assert before != base  # the adapters change the output, so the comparison below means something
    path = llmft.save_adapters(model, tokenizer, tmp_path / "adapters")
    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    assert not (path / "model.safetensors").exists()  # adapters only, not the base
    reloaded, tok2 = llmft.load_model(str(path), max_seq_length=128)
    assert llmft.generate_batch(reloaded, tok2, CHAT_PROMPTS, max_new_tokens=8, progress=False) == before


def test_save_adapters_needs_lora(tiny_dir, tmp_path):
    plain, tok = llmft.load_model(tiny_dir, lora_r=None)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        llmft.save_adapters(plain, tok, tmp_path)


def test_too_old_unsloth_without_gpu_is_explained(monkeypatch):
    monkeypatch.delitem(sys.modules, "unsloth")
    monkeypatch.setattr(_unsloth.metadata, "version", lambda name: "2026.10.7")
    with pytest.raises(ImportError, match=r"Unsloth 2026.10.7 is installed.*CPU mode.*scripts/install.sh"):
        _unsloth.import_unsloth()


def test_missing_unsloth_is_explained(monkeypatch):
    monkeypatch.delitem(sys.modules, "unsloth")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_unsloth.metadata, "version", missing)
    with pytest.raises(ImportError, match="not installed.*scripts/install.sh") as err:
        _unsloth.import_unsloth()
    # in a notebook the script is in the clone the install cell made, and re-running that cell is the way to run it
    assert "in a notebook, re-run its install cell" in str(err.value)
    assert "`bash llmft-src/scripts/install.sh`" in str(err.value) and "`bash scripts/install.sh`" in str(err.value)


@pytest.mark.numeric
def test_merged_export_reloads_as_a_plain_model_with_the_same_outputs(tiny_dir, tmp_path):
    # Unsloth's CPU mode merges only a 16-bit base (a 4-bit merge needs the GPU path, not run here).
    model, tokenizer = llmft.load_model(tiny_dir, max_seq_length=128, lora_r=8, load_in_4bit=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    before = llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, max_new_tokens=8, progress=False)
    path = llmft.export_merged(model, tokenizer, tmp_path / "merged")
    assert (path / "model.safetensors").exists() and not (path / "adapter_config.json").exists()
    merged, tok2 = llmft.load_model(str(path), lora_r=None, load_in_4bit=False)
    assert not hasattr(merged, "peft_config")
    assert llmft.generate_batch(merged, tok2, CHAT_PROMPTS, max_new_tokens=8, progress=False) == before


def test_hub_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-value")
    assert models.hub_token() == "secret-value"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert models.hub_token() is None  # neither Colab nor Kaggle here
