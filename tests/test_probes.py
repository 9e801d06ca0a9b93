"""Forgetting probes and distillation against forgetting."""
import gc

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

import llmft
from llmft import probes, templates, testing, trainers


def test_fibonacci_probe_headline_and_windows():
    probe = probes.fibonacci_probe()
    assert probe.prompts[0] == templates.format_alpaca("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8")
    assert probe.answers[0] == "13" and probe.labels[0] == "1, 1, 2, 3, 5, 8"
    assert len(probe.prompts) == 117  # all windows of 3-8 terms of the first 25 terms (the headline is one of them)
    fib = probes.fibonacci(30)
    for label, answer in zip(probe.labels, probe.answers):
        terms = [int(x) for x in label.split(", ")]
        start = next(i for i in range(30) if fib[i:i + len(terms)] == terms)
        assert int(answer) == fib[start + len(terms)]


def test_scoring_keeps_answers():
    probe = probes.fibonacci_probe(max_items=3)
    table = probes.score_answers(probe, [" 13\n", "2", "no idea"], "tuned")
    assert list(table["correct"]) == [True, False, False]
    assert list(table["answer"]) == ["13", "2", "no idea"] and (table["model"] == "tuned").all()
    assert probes.next_term_match("13, 21, 34", "13") and not probes.next_term_match("130", "13")


def test_custom_probes():
    chat = probes.custom_probe("capitals", [("Capital of France?", "Paris")])
    assert chat.prompts[0] == [{"role": "user", "content": "Capital of France?"}]
    assert chat.scorer(" paris ", "Paris")
    ds = Dataset.from_dict({"q": ["2+2?"], "a": ["4"]})
    alpaca = probes.custom_probe("math", dataset=ds, question="q", answer="a", template="alpaca",
                                 scorer=probes.next_term_match)
    assert alpaca.prompts[0].endswith("### Response:\n") and alpaca.scorer("4.", "4")
    with pytest.raises(ValueError, match="no column"):
        probes.custom_probe("x", dataset=ds)


@pytest.mark.numeric
def test_probe_on_base_vs_adapters_and_across_checkpoints(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    probe = probes.fibonacci_probe(max_items=6)
    base = probes.run_probe(model, tokenizer, probe, progress=False)
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, max_steps=6, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=1, learning_rate=2e-2, eval_steps=3,
                                  save_total_limit=None, output_dir=str(tmp_path / "run"), verbose=False)
    trainer.train()
    curve = probes.probe_checkpoints(model, tokenizer, probe, tmp_path / "run")
    assert sorted(curve["step"].unique()) == [0, 3, 6]
    assert list(curve.loc[curve["step"] == 0, "answer"]) == list(base["answer"])  # step 0 = adapter disabled
    last = curve[curve["step"] == 6]
    with torch.no_grad():
        now = probes.run_probe(model, tokenizer, probe, progress=False)
    assert list(last["answer"]) == list(now["answer"])  # the last checkpoint = the trained model
    summary = probes.accuracy_by(curve, "step")
    assert list(summary.columns) == ["probe_accuracy", "headline_answer"]
    fig = probes.plot_forgetting(curve, tmp_path / "run", path=tmp_path / "f.png")
    assert len(fig.axes) == 2 and (tmp_path / "f.png").exists()


def test_kd_loss_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert trainers.kd_loss(logits, logits.clone(), labels).item() == pytest.approx(0.0, abs=1e-7)
    other = logits + torch.randn(2, 5, 11)
    assert trainers.kd_loss(other, logits, labels).item() > 0
    assert trainers.kd_loss(other, logits, labels, temperature=2.0).item() > 0
    # only the masked (response) positions count: changing a prompt position changes nothing
    changed = other.clone()
    changed[0, 0] += 5.0
    assert trainers.kd_loss(changed, logits, labels).item() == pytest.approx(trainers.kd_loss(other, logits,
                                                                                               labels).item())
    none_right = trainers.kd_loss(other, torch.zeros_like(logits), labels, only_where_teacher_right=True)
    assert none_right.item() == 0.0  # the all-zero teacher predicts token 0, never a label here: nothing distilled


@pytest.mark.numeric
def test_distillation_uses_the_adapter_disabled_model_as_teacher(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    gc.collect()
    before = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, max_steps=6, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=1, learning_rate=2e-2, output_dir=str(tmp_path),
                                  distill={"weight": 0.5}, verbose=False)
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == before  # no second model
    trainer.train()
    kd = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert kd[0] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: student == teacher
    assert kd[-1] > 0  # the adapter moved the student away from the base
    # the teacher really is the base: the KL computed by hand against disable_adapter() logits matches
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd_by_hand = trainers.kd_loss(student, teacher, batch["labels"])
    assert kd_by_hand.item() > 0
    # and the trainer's loss is exactly CE + 0.5 x that KL: its teacher is the adapter-disabled model
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    ce = torch.nn.functional.cross_entropy(student[:, :-1][mask].float(), targets[mask])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * kd_by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="DistillConfig"):
        trainers.DistillConfig(weight=-1)


def test_next_term_skips_a_restated_input_but_not_a_wrong_sequence():
    given = ["1", "1", "2", "3", "5", "8"]
    assert probes.next_term("1, 1, 2, 3, 5, 8, 13, 21", given) == "13"  # the input restated, then the answer
    assert probes.next_term("8, 13", given) == "13"  # the last term restated
    assert probes.next_term("The next number is 13.", given) == "13"  # a lead-in of words
    assert probes.next_term("1, 2, 4, 8, 13", given) == "1"  # a different sequence: its first number is the answer
    assert probes.next_term("1, 1, 2, 3, 5, 8", given) == "1"  # only the input: no next term given
    assert probes.next_term("no number") is None
    probe = probes.fibonacci_probe(max_items=2)
    assert probe.correct(["1, 1, 2, 3, 5, 8, 13", "13"]) == [True, False]  # item 1 is not the headline window


def test_word_answers_tolerate_a_short_lead_in():
    question = ["What is the capital of France? Answer in one word."]
    assert probes.word_answer_match(" Paris.\n\nThe French", "Paris", ["The capital of France is"])
    assert probes.word_answer_match("The capital of France is Paris.", "Paris", question)  # repeats the question
    assert probes.word_answer_match(" new delhi", "New Delhi") and not probes.word_answer_match(" New York", "New Delhi")
    assert not probes.word_answer_match("It is a city in the north, and its largest is Paris", "Paris", question)
    assert not probes.word_answer_match(" Parisian", "Paris")  # whole words only


def test_knowledge_probes_have_hundreds_of_candidates_in_both_formats():
    raw, chat = probes.knowledge_probe("raw"), probes.knowledge_probe("chat")
    assert len(raw.prompts) == len(chat.prompts) >= 450 and raw.answers == chat.answers
    seq = probes.sequence_probe()
    assert seq.prompts[0] == "1, 2, 3, 4, 5," and seq.answers[0] == "6"
    for label, answer, context in zip(seq.labels, seq.answers, seq.contexts):  # every item is a real continuation
        terms = [int(t) for t in context] + [int(answer)]
        assert label == ", ".join(context)
        steps, ratios = {b - a for a, b in zip(terms, terms[1:])}, {b / a for a, b in zip(terms, terms[1:]) if a}
        roots = [round(t ** 0.5) ** 2 == t for t in terms]
        cubes = [round(t ** (1 / 3)) ** 3 == t for t in terms]
        diffs2 = {(c - b) - (b - a) for a, b, c in zip(terms, terms[1:], terms[2:])}
        assert len(steps) == 1 or len(ratios) == 1 or all(roots) or all(cubes) or diffs2 == {1}, label
    facts = probes.facts_probe()
    assert ("The capital of France is", "Paris") in zip(facts.prompts, facts.answers)
    assert ("Friday, Saturday, Sunday,", "Monday") in zip(facts.prompts, facts.answers)
    assert chat.prompts[0] == [{"role": "user", "content": probes.NEXT_NUMBER_QUESTION.format(terms="1, 2, 3, 4, 5")}]
    assert raw.correct([" 6, 7"] + [" no"] * (len(raw.prompts) - 1)).count(True) == 1
    assert raw.subset([0, len(seq.prompts)]).answers == ["6", facts.answers[0]]
    with pytest.raises(ValueError, match="prompt_format"):
        probes.sequence_probe("alpaca")


def test_calibration_keeps_what_the_base_knows_and_warns_when_it_is_too_little():
    base = testing.pretrained_base()  # the tiny base that knows the Fibonacci sequence
    model, tokenizer = llmft.load_model(str(base), max_seq_length=256, lora_r=None, load_in_4bit=False)
    candidates = probes.fibonacci_probe(max_items=12) + probes.sequence_probe(max_items=8)  # raw sequences: unknown
    with pytest.warns(UserWarning, match="too few to measure forgetting"):
        calibrated, table = probes.calibrate_probe(model, tokenizer, candidates, max_new_tokens=6, progress=False)
    kept = list(table.loc[table["correct"], "item"])
    assert calibrated.calibration["kept"] == len(kept) == len(calibrated.prompts) >= 6
    assert calibrated.calibration["candidates"] == 20
    assert calibrated.calibration["base_accuracy"] == pytest.approx(len(kept) / 20)
    assert calibrated.answers == [candidates.answers[i] for i in kept]
    again = probes.run_probe(model, tokenizer, calibrated, max_new_tokens=6, progress=False)
    assert probes.retention(again)["retention"].iloc[0] == 1.0  # the base keeps all it knows
    with pytest.raises(ValueError, match="nothing to measure forgetting"):
        probes.calibrate_probe(model, tokenizer, probes.facts_probe(max_items=4), max_new_tokens=4, progress=False)
