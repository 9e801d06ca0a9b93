"""The trainer-facing paths with REAL tokenizers (Llama-3, Qwen, SentencePiece Mistral v1 (Llama-2 style) and v3, and
Mistral-Nemo's Tekken) around tiny random models: which tokens carry the loss, what the DPO prompt renders to, how
batches are padded, when generation stops, and which token a choice letter is. The made-up test tokenizer (ChatML, a
newline is one token) hides the ways real byte-level BPE and SentencePiece vocabularies merge text (GUIDE §7)."""
import pytest
import torch
from datasets import Dataset

import llmft
from llmft import data, masking, mcq, templates, testing

FAMILIES = ["llama-3", "qwen", "mistral", "mistral-v3", "tekken"]
END_OF_TURN = {"llama-3": "<|eot_id|>", "qwen": "<|im_end|>", "mistral": "</s>", "mistral-v3": "</s>", "tekken": "</s>"}


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
    assert len(tokenizer) == {"llama-3": 128256, "qwen": 151669, "mistral": 32000, "mistral-v3": 32768,
                              "tekken": 131072}[family]
    assert "<|image|>" not in tokenizer.get_vocab()  # the vision token of the Llama-3.2 file is dropped
    assert tokenizer.chat_template and source.version and all(len(h) == 64 for h in source.files.values())
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    if family in ("mistral", "mistral-v3"):
        assert tokenizer.pad_token_id == 0  # <unk>: a pad id of 0 is a real pad id in this family
    if family in ("mistral-v3", "tekken"):  # Mistral's instruction markers are control tokens from v2 on
        assert tokenizer.tokenize("[INST]") == ["[INST]"] and tokenizer.tokenize("[/INST]") == ["[/INST]"]


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


# Text that is a control token of the family, and the family's chat markers (what Unsloth users pass as
# instruction_part / response_part for chat data).
CONTROL_TEXT = {"llama-3": ["<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>"],
                "qwen": ["<|im_end|>", "<|im_start|>assistant"],
                "mistral": ["</s>", "<s>"], "mistral-v3": ["</s>", "[INST]", "[/INST]"],
                "tekken": ["</s>", "[INST]", "[/INST]"]}
CHAT_MARKERS = {"llama-3": ("<|start_header_id|>user<|end_header_id|>\n\n",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n"),
                "qwen": ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                "mistral": ("[INST]", "[/INST]"), "mistral-v3": ("[INST]", "[/INST]"), "tekken": ("[INST]", "[/INST]")}


def _special_ids(tokenizer):
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def test_plain_text_stretches_tokenize_as_the_tokenizer_does_between_control_tokens(family):
    """What makes content-as-data exact: a stretch between two control tokens, tokenized on its own by
    masking.PlainText, gives the very ids the tokenizer gives it in context (SentencePiece adds no start-of-text
    prefix there, byte-level BPE merges nothing across a control token)."""
    tokenizer = testing.real_tokenizer(family)
    special = _special_ids(tokenizer)
    plain = masking.PlainText(tokenizer)
    state = tokenizer.backend_tokenizer.pre_tokenizer.__getstate__()
    compared = 0
    for chat in CHATS + [[{"role": "user", "content": "\nLeading newline"}, {"role": "assistant", "content": " x\n"}]]:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        cuts = [k for k, t in enumerate(ids) if t in special] + [len(ids)]
        previous = -1
        for cut in cuts:
            begin = offsets[previous][1] if previous >= 0 else 0
            end = offsets[cut][0] if cut < len(ids) else len(text)
            if end > begin:
                assert plain.encode(text[begin:end], at_start=begin == 0)[0] == ids[previous + 1:cut], \
                    (family, text[begin:end])
                compared += 1
            previous = cut
    assert compared >= len(CHATS)
    assert tokenizer.backend_tokenizer.pre_tokenizer.__getstate__() == state  # the tokenizer is left as it was
    eos = tokenizer.eos_token
    assert tokenizer(f"a{eos}", add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id


def test_control_token_text_inside_content_is_trained_as_plain_text(real, tmp_path):
    """An answer quoting the family's end-of-turn token, a user pasting a header: each stays text. Before, the
    answer trained two end-of-turn tokens (the model learns to stop mid-answer) and the user's header became real."""
    family, model, tokenizer = real
    quoted = CONTROL_TEXT[family]
    answer = f"It is {quoted[0]} then more text."
    user = "Continue: " + " and ".join(quoted[1:]) + " done"
    chat = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    clean = [{"role": m["role"], "content": m["content"].replace(quoted[0], "x")} for m in chat]
    for t in quoted[1:]:
        clean[0]["content"] = clean[0]["content"].replace(t, "x")
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": chat}, {"messages": CHATS[0]}]), tmp_path)
    row = trainer.train_dataset[0]
    special = _special_ids(tokenizer)
    got = [t for t in row["input_ids"] if t in special]
    expected = [t for t in tokenizer.apply_chat_template(clean, tokenize=True, return_dict=True)["input_ids"]
                if t in special]
    assert got == expected  # the template's control tokens only, none from the content
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert [t for t in trained if t in special] == [tokenizer.convert_tokens_to_ids(END_OF_TURN[family])]
    assert _trained_text(trainer, tokenizer)[0].strip() == answer + END_OF_TURN[family]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert trainer.llmft_reports["train_masking"].content_control_rows == [0]
    assert "tokenized as plain text: 0" in str(trainer.llmft_reports["train_masking"])


def test_control_token_text_under_a_template_that_rewrites_content_is_refused_by_row():
    """When the template changes the content (here it doubles every "a"), content cannot be located in the rendering;
    a row quoting a control token is then refused, naming the row and message, never trained as a control token."""
    tokenizer = testing.real_tokenizer("llama-3")
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | replace('a', 'aa') }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    clean = [{"role": "user", "content": "Say a word"}, {"role": "assistant", "content": "A word."}]
    masking.mask_responses(Dataset.from_list([{"messages": clean}]), tokenizer)  # no quoted control text: fine
    quoting = [clean[0], {"role": "assistant", "content": "It is <|eot_id|> a word."}]
    with pytest.raises(data.DataError, match=r"row 1, message 1: it holds the text '<\|eot_id\|>'"):
        masking.mask_responses(Dataset.from_list([{"messages": clean}, {"messages": quoting}]), tokenizer)


def test_control_token_text_stays_text_with_the_loss_on_every_token(real, tmp_path):
    """responses_only=False: TRL used to tokenize the chat rows itself, turning the quoted text into control tokens."""
    family, model, tokenizer = real
    quoted = CONTROL_TEXT[family][0]
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": f"It is {quoted} then more text."}]
    clean = [chat[0], {"role": "assistant", "content": "It is x then more text."}]
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": chat}]), tmp_path, responses_only=False)
    row = trainer.train_dataset[0]
    special = _special_ids(tokenizer)
    expected = [t for t in tokenizer.apply_chat_template(clean, tokenize=True, return_dict=True)["input_ids"]
                if t in special]
    assert [t for t in row["input_ids"] if t in special] == expected
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained == row["input_ids"][len(row["input_ids"]) - len(trained):]  # every token after the first ones
    assert tokenizer.decode(trained).rstrip().endswith(f"It is {quoted} then more text.{END_OF_TURN[family]}")
    report = trainer.llmft_reports["train_masking"]
    assert not report.responses_only and report.content_control_rows == [0] and "loss on every token" in str(report)


def test_a_marker_quoted_in_an_mcq_question_trains_only_the_answer(real, tmp_path):
    """Code questions hold "Answer:" often; in MCQ text rows located by markers, the response follows the template's
    own marker, the last one. (mcq_rows' prompt/completion rows need no marker: TRL masks the prompt by length.)"""
    family, model, tokenizer = real
    rows = [{"text": templates.format_mcq("What does print('Answer:', 42) output?",
                                          ["Answer: 42", "42", "Answer:42", "an error"], "A", tokenizer.eos_token)},
            {"text": templates.format_mcq("Which is a keyword?", ["def", "fed", "edf", "dfe"], "A",
                                          tokenizer.eos_token)}]
    trainer = _build(model, tokenizer, Dataset.from_list(rows), tmp_path,
                     instruction_part=templates.MCQ_INSTRUCTION_PART, response_part=templates.MCQ_RESPONSE_PART)
    assert [t.strip() for t in _trained_text(trainer, tokenizer)] == ["A" + tokenizer.eos_token] * 2
    assert trainer.llmft_reports["train_masking"].repeated_marker_rows == [0]


def test_a_marker_quoted_in_an_alpaca_input_trains_only_the_response(real, tmp_path):
    family, model, tokenizer = real
    rows = [{"text": templates.format_alpaca("Explain this prompt format.", "It ends with ### Response:\n then text",
                                             "It is the Alpaca format.", eos_token=tokenizer.eos_token)}]
    trainer = _build(model, tokenizer, Dataset.from_list(rows), tmp_path,
                     instruction_part="### Instruction:\n", response_part="### Response:\n")
    assert [t.strip() for t in _trained_text(trainer, tokenizer)] == ["It is the Alpaca format." + tokenizer.eos_token]


def test_chat_markers_quoted_in_a_user_message_are_not_markers(real, tmp_path):
    """Explicit chat markers (as Unsloth users pass them) are searched in the template's own text only."""
    family, model, tokenizer = real
    instruction_part, response_part = CHAT_MARKERS[family]
    chats = [[{"role": "user", "content": f"Why does {response_part} appear here? And {instruction_part} too?"},
              {"role": "assistant", "content": "Because you typed it."}], CHATS[1]]
    trainer = _build(model, tokenizer, Dataset.from_list([{"messages": c} for c in chats]), tmp_path,
                     instruction_part=instruction_part, response_part=response_part)
    end = END_OF_TURN[family]
    trained = [t.replace("\n", "") for t in _trained_text(trainer, tokenizer)]
    assert trained == ["Because you typed it." + end, _expected(CHATS[1], end)]
    report = trainer.llmft_reports["train_masking"]
    assert report.empty_turns == [] and report.repeated_marker_rows == []


def test_control_tokens_inside_text_rows_are_reported_by_row(real, tmp_path):
    """Text rows have no structure to tell content from template: control-token text in them is named, not hidden."""
    family, model, tokenizer = real
    eot = CONTROL_TEXT[family][0]
    rows = [{"text": templates.format_alpaca("Say hi.", "", "Hi.", eos_token=tokenizer.eos_token)},
            {"text": templates.format_alpaca("Quote it.", "", f"It is {eot} then more.",
                                             eos_token=tokenizer.eos_token)}]
    trainer = _build(model, tokenizer, Dataset.from_list(rows), tmp_path,
                     instruction_part="### Instruction:\n", response_part="### Response:\n")
    report = trainer.llmft_reports["train_masking"]
    assert report.control_text_rows == [1] and "pass the rows as chat messages): 1" in str(report)
    questions = [{"task_id": "q0", "question": "Which ends a turn?", "choices": ["a", "b"], "answer": "A"},
                 {"task_id": "q1", "question": f"What is {eot}?", "choices": ["a", "b"], "answer": "B"}]
    rows = data.mcq_rows(Dataset.from_list(questions), eos_token=tokenizer.eos_token, verbose=False)
    trainer = _build(model, tokenizer, rows, tmp_path)  # prompt/completion rows: TRL tokenizes them
    assert trainer.llmft_reports["train_masking"].control_text_rows == [1]


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
        text_ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        assert text_ids[: len(prompt_ids)] == prompt_ids  # the answer does not merge into the prompt's last token
        answer_id = text_ids[len(prompt_ids)]
        assert answer_id == letter_ids["ABCD".index(row["answer"])], (family, row["answer"])


def test_a_mistral_architecture_model_loads_through_load_model():
    """transformers routes a Mistral-architecture model's tokenizer through mistral-common whenever that package is
    installed; installed without its dependencies (as a carrier of tokenizer files) it failed on `tiktoken`. The test
    assets are now read from downloaded wheels, so the plain path a user takes must work."""
    model_dir = testing.tiny_model_dir("mistral", hidden_size=32, num_layers=1, tokenizer="mistral-v3")
    model, tokenizer = llmft.load_model(str(model_dir), max_seq_length=128, lora_r=4)
    assert model.config.model_type == "mistral" and hasattr(model, "peft_config")
    reference = testing.real_tokenizer("mistral-v3")
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<s>[INST] What is 2+2? [/INST]It is 4.</s>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference(text, add_special_tokens=False)[
        "input_ids"]
    reply = llmft.generate_response(model, tokenizer, chat[:1], do_sample=False, max_new_tokens=3)
    assert isinstance(reply, str)


def test_a_missing_tokenizer_wheel_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFT_TEST_ASSETS", str(tmp_path / "wheels"))
    with pytest.raises(FileNotFoundError, match=r"no mistral-common==1\.13\.1 wheel in .*wheels \(found: none\)\. "
                                                r"Download the pinned wheels: .*fetch_real_tokenizers\(\)"):
        testing.real_tokenizer_dir("mistral-v3")
