import pytest

from llmft import templates, testing


def test_alpaca_exact_wording_with_input_and_eos():
    text = templates.format_alpaca("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "13", eos_token="</s>")
    assert text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nContinue the fibonnaci "
        "sequence.\n\n### Input:\n1, 1, 2, 3, 5, 8\n\n### Response:\n13</s>")


def test_alpaca_without_input_and_inference_prompt():
    text = templates.format_alpaca("Say hi.", response="Hi!", eos_token="<eos>")
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!<eos>")
    prompt = templates.format_alpaca("Say hi.", eos_token="<eos>")
    assert prompt.endswith("### Response:\n")  # no EOS on an inference prompt


def test_mcq_prompt():
    text = templates.format_mcq("What is 2+2?", ["3", "4"], answer="B", eos_token="<e>")
    assert text == ("The following are multiple choice questions (with answers) about software development.\n\n"
                    "Question: What is 2+2?\nA. 3\nB. 4\nAnswer: B<e>")
    with pytest.raises(ValueError, match="at most 10"):
        templates.format_choices([str(i) for i in range(11)])


def test_chat_template_selection_through_unsloth():
    tok = testing.tiny_tokenizer()
    tok = templates.apply_chat_template(tok, "chatml")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="no such template.*llama-3.1"):
        templates.apply_chat_template(tok, "llama-99")


def test_missing_chat_template_is_explained():
    tok = testing.tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        templates.apply_chat_template(tok)
