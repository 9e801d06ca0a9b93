"""Forgetting probes and distillation against forgetting."""
import gc

import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

import llmft
from llmft import probes, templates, trainers


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
