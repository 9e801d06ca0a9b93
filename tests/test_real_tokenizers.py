"""The trainer-facing paths with REAL tokenizers (Llama-3, Qwen, a SentencePiece Mistral/Llama-2 model) around tiny
random models: which tokens carry the loss, what the DPO prompt renders to, how batches are padded, when generation
stops, and which token a choice letter is. The made-up test tokenizer (ChatML, a newline is one token) hides the
ways real byte-level BPE and SentencePiece vocabularies merge text (GUIDE §7)."""
import pytest
import torch
from datasets import Dataset

import llmft
from llmft import data, mcq, templates, testing

FAMILIES = ["llama-3", "qwen", "mistral"]
END_OF_TURN = {"llama-3": "<|eot_id|>", "qwen": "<|im_end|>", "mistral": "</s>"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def real(family):
    """(family, model, tokenizer): a tiny Llama with the family's real tokenizer and chat template, LoRA r=4."""
    model_dir = testing.tiny_model_dir("llama", hidden_size=32, num_layers=1, tokenizer=family)
    model, tokenizer = llmft.load_model(str(model_dir), max_seq_length=256, lora_r=4)
    return family, model, tokenizer


def _trained_text(trainer, tokenizer):
    """The decoded label tokens (what carries the loss) of every row the trainer kept, in order."""
    return [tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
            for row in trainer.train_dataset]


def _build(model, tokenizer, dataset, tmp_path, **kwargs):
    return llmft.build_trainer(model, tokenizer, dataset, output_dir=str(tmp_path), max_steps=1, verbose=False,
                               **kwargs)


def test_assets_are_pinned_real_tokenizers(family):
    source = testing.REAL_TOKENIZERS[family]
    tokenizer = testing.real_tokenizer(family)
    assert len(tokenizer) == {"llama-3": 128256, "qwen": 151669, "mistral": 32000}[family]
    assert "<|image|>" not in tokenizer.get_vocab()  # the vision token of the Llama-3.2 file is dropped
    assert tokenizer.chat_template and source.version and all(len(h) == 64 for h in source.files.values())
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    if family == "mistral":
        assert tokenizer.pad_token_id == 0  # <unk>: a pad id of 0 is a real pad id in this family


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Goodbye."}],
    [{"role": "user", "content": "Greek?"}, {"role": "assistant", "content": "Η Αθήνα είναι η πρωτεύουσα."}],
    [{"role": "user", "content": "Say y"}, {"role": "assistant", "content": "  y has spaces  "}],
]


def _expected(chat, end):
    return "".join(m["content"] + end for m in chat if m["role"] == "assistant")


def test_responses_only_masks_are_exactly_the_assistant_turns(real, tmp_path):
    family, model, tokenizer = real
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": c} for c in CHATS]), tmp_path)
    assert len(trainer.train_dataset) == len(CHATS)
    for got, chat in zip(_trained_text(trainer, tokenizer), CHATS):
        assert got.strip() == _expected(chat, END_OF_TURN[family]).strip()


def test_a_response_starting_with_a_newline_keeps_its_loss(real, tmp_path):
    family, model, tokenizer = real
    chat = [{"role": "user", "content": "Say x"}, {"role": "assistant", "content": "\nx starts with a newline"}]
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": chat}]), tmp_path)
    assert len(trainer.train_dataset) == 1
    assert "x starts with a newline" in _trained_text(trainer, tokenizer)[0]


def test_alpaca_masks_cover_the_response_and_eos(real, tmp_path):
    family, model, tokenizer = real
    rows = [{"text": templates.format_alpaca("Add the numbers.", "2 and 3", "5", eos_token=tokenizer.eos_token)},
            {"text": templates.format_alpaca("Translate to Greek: hello", "", "γεια σου",
                                             eos_token=tokenizer.eos_token)}]
    trainer = _build(model, tokenizer, Dataset.from_list(rows), tmp_path,
                     instruction_part="### Instruction:\n", response_part="### Response:\n")
    assert [t.strip() for t in _trained_text(trainer, tokenizer)] == [
        "5" + tokenizer.eos_token, "γεια σου" + tokenizer.eos_token]


def test_mcq_prompt_trains_on_the_letter_and_eos_only(real, tmp_path):
    family, model, tokenizer = real
    rows = data.mcq_rows(testing.tiny_codemmlu(6), eos_token=tokenizer.eos_token, verbose=False)
    trainer = _build(model, tokenizer, rows, tmp_path)  # mcq_rows' prompt/completion rows, as they are
    assert [t.strip() for t in _trained_text(trainer, tokenizer)] == [
        a + tokenizer.eos_token for a in rows["answer"]]
    for row, source in zip(trainer.train_dataset, rows):  # the letter is the token score_choices reads
        first = next(t for t, label in zip(row["input_ids"], row["labels"]) if label != -100)
        assert first == tokenizer(" " + source["answer"], add_special_tokens=False)["input_ids"][0]


def test_rows_and_turns_without_trainable_tokens_are_reported_by_name(real, tmp_path):
    family, model, tokenizer = real
    long_prompt = "word " * 400
    chats = [CHATS[0],
             [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "cut off"}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
              {"role": "user", "content": long_prompt}, {"role": "assistant", "content": "cut off too"}]]
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": c} for c in chats]), tmp_path)
    report = trainer.llmft_reports["train_masking"]
    assert report.empty_rows == [1] and report.empty_turns == [(1, 0), (2, 1)]
    assert report.dropped_by_trainer == 1 and len(trainer.train_dataset) == 2
    assert "dropped rows (empty or truncated responses): 1" in str(report)


def test_dpo_prompt_keeps_the_system_message(real, tmp_path):
    family, model, tokenizer = real
    pairs = data.orca_to_dpo(Dataset.from_list([
        {"system": "You answer in French.", "question": "Say hello.", "chosen": "Bonjour.", "rejected": "Hello."},
    ] * 2), verbose=False)
    trainer = llmft.build_dpo_trainer(model, tokenizer, pairs, output_dir=str(tmp_path), max_steps=1, verbose=False)
    row = trainer.train_dataset[0]
    prompt = tokenizer.decode(row["prompt_ids"] if "prompt_ids" in row else row["prompt_input_ids"])
    assert "You answer in French." in prompt and "Say hello." in prompt
    assert prompt.index("You answer in French.") < prompt.index("Say hello.")
    chosen = tokenizer.decode(row["chosen_ids"] if "chosen_ids" in row else row["chosen_input_ids"])
    assert "Bonjour." in chosen and "Bonjour." not in prompt


class _Spy:
    """Wraps ``model.generate`` to record what llmft passes to it; the real generate still runs."""

    def __init__(self, model):
        self.model, self.calls, self.original = model, [], model.generate

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.original(*args, **kwargs)


def test_batched_generation_pads_left_with_the_pad_token_and_stops_on_every_eos(real, monkeypatch):
    family, model, tokenizer = real
    spy = _Spy(model)
    monkeypatch.setattr(model, "generate", spy)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer question, please."}]]
    llmft.generate_batch(model, tokenizer, prompts, max_new_tokens=3, progress=False)
    call = spy.calls[0]
    ids, mask = call["input_ids"], call["attention_mask"]
    short = ids[0][mask[0] == 0]
    assert len(short) > 0 and bool((short == tokenizer.pad_token_id).all())
    assert int(mask[0, 0]) == 0 and int(mask[0, -1]) == 1  # padding on the left: the prompt ends at the last column
    assert call["pad_token_id"] == tokenizer.pad_token_id  # the id the inputs were padded with (0 for Mistral)
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    expected = {tokenizer.convert_tokens_to_ids(t) for t in testing.STOP_TOKENS[family]}
    assert stops == expected  # every end-of-turn id of the family, not only tokenizer.eos_token_id


class _Force:
    """A logits processor that makes the greedy choice ``first`` at the first new token, then ``then`` forever."""

    def __init__(self, prompt_length, first, then):
        self.prompt_length, self.first, self.then = prompt_length, first, then

    def __call__(self, input_ids, scores):
        choice = self.first if input_ids.shape[1] == self.prompt_length else self.then
        forced = torch.full_like(scores, -1e9)
        forced[:, choice] = 0.0
        return forced


def test_generation_stops_at_any_end_of_turn_id(real):
    """An end-of-turn id that is not ``tokenizer.eos_token_id`` (Llama-3's <|end_of_text|>, Qwen's <|endoftext|>)
    ends generation too; without it the forced "x" tokens after it would be generated."""
    from transformers import LogitsProcessorList

    family, model, tokenizer = real
    others = [tokenizer.convert_tokens_to_ids(t) for t in testing.STOP_TOKENS[family]
              if tokenizer.convert_tokens_to_ids(t) != tokenizer.eos_token_id]
    if not others:
        pytest.skip(f"{family} has a single end-of-turn id")
    chat = [{"role": "user", "content": "Hi"}]
    length = len(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
    x = tokenizer("x", add_special_tokens=False)["input_ids"][-1]
    for stop in others:
        out = llmft.generate_response(model, tokenizer, chat, do_sample=False, max_new_tokens=6,
                                      logits_processor=LogitsProcessorList([_Force(length, stop, x)]))
        assert out == "", (family, tokenizer.convert_ids_to_tokens(stop), out)
    control = llmft.generate_response(model, tokenizer, chat, do_sample=False, max_new_tokens=6,
                                      logits_processor=LogitsProcessorList([_Force(length, x, x)]))
    assert control.replace(" ", "") == "x" * 6  # the forcing works: without a stop id, six x's


def test_mcq_letter_tokens_are_the_ones_training_puts_after_the_prompt(real):
    family, model, tokenizer = real
    rows = data.mcq_rows(testing.tiny_codemmlu(8), eos_token=tokenizer.eos_token, verbose=False)
    letter_ids = mcq._letter_token_ids(tokenizer, 4)
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        text_ids = tokenizer(row["text"])["input_ids"]
        assert text_ids[: len(prompt_ids)] == prompt_ids  # the answer does not merge into the prompt's last token
        answer_id = text_ids[len(prompt_ids)]
        assert answer_id == letter_ids["ABCD".index(row["answer"])], (family, row["answer"])
