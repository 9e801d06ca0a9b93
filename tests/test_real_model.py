"""The real-model tier: SmolLM2-135M-Instruct (a real pretrained Llama, 134.5M parameters) through llmft in 4-bit on
a CPU. The model comes from a pinned PyPI wheel as GGUF and is converted once (``llmft.testing.real_model_dir``;
``bash scripts/install.sh --dev`` does it). Every test here is in the slow tier; the tests share one loaded model and
one SFT run (module fixtures) to stay within a few minutes on 2 cores."""
import json

import pytest

import llmft
from llmft import testing

pytestmark = pytest.mark.slow
SOURCE = testing.REAL_MODELS["smollm2"]


@pytest.fixture(scope="module")
def smol_dir():
    return testing.real_model_dir("smollm2")


@pytest.fixture(scope="module")
def smol(smol_dir):
    """The base in 4-bit with LoRA r=16 (adapters untrained: the model answers as the base)."""
    return llmft.load_model(str(smol_dir), max_seq_length=256, lora_r=16)


def test_asset_is_the_pinned_wheel_converted_with_fixed_special_tokens(smol_dir):
    recorded = json.loads((smol_dir / "llmft_source.json").read_text())
    assert recorded["wheel_sha256"] == SOURCE.wheel_sha256 == testing._sha256_file(testing.real_model_wheel())
    assert recorded["model_safetensors_sha256"] == SOURCE.result_sha256
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)  # the GGUF says <|im_start|> (1)
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1
    generation = json.loads((smol_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                         "<|im_start|>assistant\n")


def test_the_base_knows_facts_and_stops_at_the_end_of_its_turn(smol):
    model, tokenizer = smol
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id != tokenizer.eos_token_id
    raw = llmft.generate_batch(model, tokenizer, ["The capital of France is", "2, 4, 6, 8, 10,"], max_new_tokens=8,
                               progress=False)
    assert "Paris" in raw[0] and raw[1].strip().startswith("12")
    chat = [{"role": "user", "content": "Say hello in one word."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    import torch

    from llmft.generation import inference_mode

    with inference_mode(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert 2 in new and len(new) < 40, tokenizer.decode(new)  # the answer ends with <|im_end|>, not at the limit
