"""build_trainer gives a real TRL SFTTrainer that trains through Unsloth's CPU path."""
import pytest
import torch
import trl
from datasets import Dataset

import llmft
from llmft import data, testing, trainers


def _tiny_trainer(model, tokenizer, train, eval_=None, **kw):
    defaults = dict(max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                    warmup_steps=2, verbose=False)
    return llmft.build_trainer(model, tokenizer, train, eval_, **{**defaults, **kw})


def test_defaults_are_t4_safe_and_overridable(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, chat_dataset, output_dir=str(tmp_path),
                                  eval_max_samples=8, verbose=False)
    assert isinstance(trainer, trl.SFTTrainer)
    args = trainer.args
    assert args.max_grad_norm == 1.0 and args.learning_rate == 2e-4 and args.weight_decay == 0.01
    assert args.max_length == 128  # from load_model(max_seq_length=128)
    assert len(trainer.eval_dataset) == 8  # bounded eval subset
    assert args.eval_strategy == "steps" and args.eval_steps == max(1, 8 // 10)  # 64 rows / (2*4) = 8 steps
    assert trainers.default_optim() == "adamw_torch"  # adamw_8bit needs a GPU (bitsandbytes kernels)
    assert trainers.precision_flags() == {"fp16": False, "bf16": False}
    custom = llmft.build_trainer(model, tokenizer, chat_dataset, output_dir=str(tmp_path), max_grad_norm=0.3,
                                 packing=False, lr_scheduler_type="cosine", verbose=False)
    assert custom.args.max_grad_norm == 0.3 and custom.args.lr_scheduler_type == "cosine"
    assert custom.args.eval_strategy == "no"


def test_unknown_option_suggests_the_right_name(lora_model, chat_dataset):
    model, tokenizer = lora_model
    with pytest.raises(TypeError, match=r"'max_seq_len'.*did you mean"):
        llmft.build_trainer(model, tokenizer, chat_dataset, max_seq_len=64)


def test_dataset_shape_errors(lora_model):
    model, tokenizer = lora_model
    with pytest.raises(data.DataError, match="sharegpt_to_messages"):
        llmft.build_trainer(model, tokenizer, testing.tiny_finetome(4))
    with pytest.raises(data.DataError, match=r"'messages' \(chat\), 'text' or 'prompt' \+ 'completion' column, "
                                             r"got \['question'\]"):
        llmft.build_trainer(model, tokenizer, Dataset.from_dict({"question": ["q"]}))
    with pytest.raises(ValueError, match="needs instruction_part and response_part"):
        llmft.build_trainer(model, tokenizer, Dataset.from_dict({"text": ["q"]}), responses_only=True)


@pytest.mark.parametrize("train, eval_, message", [
    (Dataset.from_dict({"text": []}), None, r"train_dataset: empty \(0 rows\)"),
    (Dataset.from_dict({"text": ["a"]}), Dataset.from_dict({"text": []}), r"eval_dataset: empty \(0 rows\)"),
    (Dataset.from_dict({"prompt": ["q"], "text": ["q a"]}), None,
     r"train_dataset: has 'prompt' but no 'completion'.*drop 'prompt'.*to train on 'text'"),
])
def test_empty_or_misread_datasets_are_refused_before_the_model_is_touched(train, eval_, message):
    with pytest.raises(data.DataError, match=message):
        llmft.build_trainer(None, None, train, eval_)  # model and tokenizer None: the data fails first


def test_loss_only_on_assistant_responses(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    trainer = _tiny_trainer(model, tokenizer, chat_dataset, output_dir=str(tmp_path))
    assert len(trainer.train_dataset) == len(chat_dataset)
    for row, source in zip(trainer.train_dataset, chat_dataset):
        kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        expected = "".join(m["content"] + tokenizer.eos_token for m in source["messages"] if m["role"] == "assistant")
        assert tokenizer.decode(kept) == expected
        users = [m["content"] for m in source["messages"] if m["role"] != "assistant"]
        assert not any(u in tokenizer.decode(kept) for u in users)


def test_alpaca_text_with_markers_trains_on_the_response_only(lora_model, tmp_path):
    model, tokenizer = lora_model
    rows = [{"instruction": "Continue the fibonnaci sequence.", "input": "1, 1, 2, 3, 5, 8", "output": "13"}] * 4
    ds = data.alpaca_to_text(Dataset.from_list(rows), tokenizer.eos_token, verbose=False)
    trainer = _tiny_trainer(model, tokenizer, ds, output_dir=str(tmp_path), instruction_part="### Instruction:\n",
                            response_part="### Response:\n")
    row = trainer.train_dataset[0]
    kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(kept).strip() == "13" + tokenizer.eos_token


@pytest.mark.numeric
def test_short_sft_run_lowers_eval_loss_and_checkpoints(lora_model, chat_dataset, tmp_path):
    model, tokenizer = lora_model
    train, held_out = chat_dataset.select(range(48)), chat_dataset.select(range(48, 64))
    trainer = _tiny_trainer(model, tokenizer, train, held_out, output_dir=str(tmp_path), eval_steps=10)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert result.global_step == 30
    assert after < before - 0.05, (before, after)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) >= 4  # before + steps 10, 20, 30 (+ the final call)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]

    # Trained adapters (TRL keeps QLoRA adapters in bf16) reload exactly: same greedy answers as in memory.
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 plus 4?", "Explain LoRA in one sentence.")]
    answers = llmft.generate_batch(model, tokenizer, prompts, max_new_tokens=16, progress=False)
    path = llmft.save_adapters(model, tokenizer, tmp_path / "adapters")
    reloaded, tok2 = llmft.load_model(str(path), max_seq_length=128)
    assert llmft.generate_batch(reloaded, tok2, prompts, max_new_tokens=16, progress=False) == answers
    inputs = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_overlong_rows_are_counted(lora_model, chat_dataset, capsys, tmp_path):
    model, tokenizer = lora_model
    lengths = data.sample_lengths(chat_dataset, tokenizer)
    limit = sorted(lengths)[-5]  # the few longest rows are over the limit
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, output_dir=str(tmp_path), max_seq_length=limit)
    report = trainer.llmft_reports["train"]
    assert report.overlong == [i for i, n in enumerate(lengths) if n > limit] and report.overlong
    assert f"longer than max_seq_length={limit}" in capsys.readouterr().out
