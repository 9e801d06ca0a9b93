import pytest

import llmft
from llmft import generation, templates

from conftest import CHAT_PROMPTS


@pytest.mark.numeric
def test_batched_greedy_equals_one_by_one_and_returns_only_new_text(lora_model):
    model, tokenizer = lora_model
    batched = llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, batch_size=4, max_new_tokens=10, progress=False)
    single = [llmft.generate_batch(model, tokenizer, [p], batch_size=1, max_new_tokens=10, progress=False)[0]
              for p in CHAT_PROMPTS]
    assert batched == single and len(batched) == len(CHAT_PROMPTS)
    assert all("<|im_start|>" not in text and "What is" not in text for text in batched)
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


@pytest.mark.numeric
def test_alpaca_strings_and_greedy_response(lora_model):
    model, tokenizer = lora_model
    prompt = templates.format_alpaca("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8")
    text = llmft.generate_response(model, tokenizer, prompt, do_sample=False, max_new_tokens=6)
    assert text == llmft.generate_batch(model, tokenizer, [prompt], max_new_tokens=6, progress=False)[0]
    assert not text.startswith("Below is")


def test_sampling_with_min_p_and_streaming(lora_model, capsys):
    model, tokenizer = lora_model
    text = llmft.generate_response(model, tokenizer, CHAT_PROMPTS[0], max_new_tokens=6, temperature=1.5, min_p=0.1,
                                   stream=True)
    printed = capsys.readouterr().out
    assert "".join(printed.split()) == "".join(text.split())  # the streamer printed exactly what was returned


def test_model_returns_to_training_mode_after_generation(lora_model):
    model, tokenizer = lora_model
    model.train()
    llmft.generate_batch(model, tokenizer, CHAT_PROMPTS[:1], max_new_tokens=2, progress=False)
    assert model.training


def test_prompt_errors(lora_model):
    model, tokenizer = lora_model
    with pytest.raises(TypeError, match="list of {'role'"):
        generation.render_prompt(tokenizer, [{"text": "x"}])
    with pytest.raises(ValueError, match="mix of chat and plain-string"):
        llmft.generate_batch(model, tokenizer, ["plain", CHAT_PROMPTS[0]], batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        llmft.generate_batch(model, tokenizer, ["x"], batch_size=0)


def test_a_pad_id_of_0_is_a_pad_id_and_generate_gets_the_padding_id(lora_model, monkeypatch):
    model, tokenizer = lora_model
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # as <unk> (id 0) pads in the Llama-2 / Mistral family
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id != 0
    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    prompts = ["Continue the fibonnaci sequence.", "What is 3 plus 4? Answer in one short sentence please."]
    llmft.generate_batch(model, tokenizer, prompts, batch_size=2, max_new_tokens=2, progress=False)
    inputs = calls[0]
    padded = inputs["input_ids"][inputs["attention_mask"] == 0]
    assert len(padded) > 0 and set(padded.tolist()) == {0}  # the inputs were padded with id 0 ...
    assert inputs["pad_token_id"] == 0  # ... and generate is told so (before: the eos id)
    assert generation.pad_token_id(tokenizer) == 0


def test_chat_prompt_without_chat_template_gets_llmfts_message():
    from llmft import testing

    tokenizer = testing.tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*apply_chat_template.*llama-3.1"):
        generation.render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
