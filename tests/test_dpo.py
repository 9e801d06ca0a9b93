"""DPO through Unsloth's CPU path: orca adapter, build_dpo_trainer, the reference policy, control and plots."""
import csv
import gc
import json
from pathlib import Path

import matplotlib
import pytest
import torch
import trl
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, TrainerCallback

import llmft
from llmft import callbacks, data, plots, testing, trainers

matplotlib.use("Agg")


class _Rows(list):
    """Rows Arrow would refuse to store (mixed types), with the column_names the adapters read."""

    @property
    def column_names(self):
        return list(self[0])


@pytest.fixture(scope="module")
def pairs():
    return data.orca_to_dpo(testing.tiny_orca_dpo(32), verbose=False)


def test_orca_rows_become_conversational_pairs():
    rows = testing.orca_dpo_rows(6)
    ds, report = data.orca_to_dpo(Dataset.from_list(rows), return_report=True, verbose=False)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and report.n_skipped == 0
    for row, src in zip(ds, rows):
        roles = [m["role"] for m in row["prompt"]]
        assert roles == (["system", "user"] if src["system"] else ["user"])  # system kept when present
        assert row["prompt"][-1]["content"] == src["question"]
        assert row["chosen"] == [{"role": "assistant", "content": src["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": src["rejected"]}]


GOOD = {"system": "", "question": "q?", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "chosen": None}, r"row 1, field 'chosen': expected a string, got NoneType"),
    ({**GOOD, "question": "  "}, r"row 1, field 'question': empty question"),
    ({**GOOD, "chosen": ""}, r"row 1, field 'chosen': empty chosen.*strict=False"),
    ({**GOOD, "rejected": "yes"}, r"row 1, field 'rejected': chosen == rejected"),
    ({**GOOD, "system": 3}, r"row 1, field 'system': expected a string, got int"),
])
def test_broken_orca_rows_name_row_and_field(bad, message):
    with pytest.raises(data.DataError, match=message):
        data.orca_to_dpo(_Rows([GOOD, bad]), verbose=False)


def test_non_strict_skips_and_counts():
    rows = [GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": "yes"}, GOOD]
    ds, report = data.orca_to_dpo(Dataset.from_list(rows), strict=False, return_report=True, verbose=False)
    assert len(ds) == 2 and report.skipped == {"empty chosen": [1], "chosen == rejected": [2]}
    with pytest.raises(data.DataError, match=r"no column\(s\) \['question'\]"):
        data.orca_to_dpo(Dataset.from_dict({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}))


def test_generic_preference_pairs():
    ds = data.preference_pairs(Dataset.from_dict({"prompt": ["Hi?"], "chosen": ["Hello."], "rejected": ["No."]}),
                               verbose=False)
    assert ds[0]["prompt"] == [{"role": "user", "content": "Hi?"}]
    again = data.preference_pairs(ds, verbose=False)  # conversational rows pass through unchanged
    assert again[0] == ds[0]
    with pytest.raises(data.DataError, match="row 0, field 'prompt'"):
        data.preference_pairs(_Rows([{"prompt": "", "chosen": "a", "rejected": "b"}]), verbose=False)


def test_over_long_pairs_are_counted(pairs):
    tok = testing.tiny_tokenizer()
    lengths = data.sample_lengths(pairs, tok)
    limit = sorted(set(lengths))[-2]  # the longest rows are over it
    report = data.count_overlong(pairs, tok, limit)
    assert report.overlong == [i for i, n in enumerate(lengths) if n > limit] and report.overlong


def _dpo(model, tokenizer, pairs, out, **kw):
    options = dict(max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                   warmup_steps=1, eval_steps=3, output_dir=str(out), verbose=False)
    return llmft.build_dpo_trainer(model, tokenizer, pairs.select(range(24)), pairs.select(range(24, 32)),
                                   **{**options, **kw})


def test_defaults_and_errors(lora_model, pairs, tmp_path):
    model, tokenizer = lora_model
    trainer = llmft.build_dpo_trainer(model, tokenizer, pairs, pairs, output_dir=str(tmp_path), verbose=False)
    assert isinstance(trainer, trl.DPOTrainer)
    args = trainer.args
    assert (args.beta, args.learning_rate, args.weight_decay, args.max_grad_norm) == (0.1, 5e-6, 0.0, 1.0)
    assert args.max_length == 128 and not args.fp16
    assert getattr(args.optim, "value", args.optim) in ("adamw_torch", "adamw_torch_fused")  # no 8-bit on CPU
    # one object: TRL's DPOConfig with llmft's fields is the trainer's args and what the builder recorded
    assert isinstance(args, trainers.LlmftDPOConfig) and isinstance(args, trl.DPOConfig)
    assert trainer.llmft_options is args and args.eval_strategy == "steps" and args.save_steps == args.eval_steps
    with pytest.raises(data.DataError, match="orca_to_dpo"):
        llmft.build_dpo_trainer(model, tokenizer, testing.tiny_orca_dpo(4))
    with pytest.raises(TypeError, match=r"'max_prompt_length'.*trl.DPOConfig"):
        llmft.build_dpo_trainer(model, tokenizer, pairs, max_prompt_length=64)


def test_plain_model_is_refused(tiny_dir, pairs):
    plain, tok = llmft.load_model(tiny_dir, lora_r=None)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        llmft.build_dpo_trainer(plain, tok, pairs)


def _lora(model, adapter):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


@pytest.mark.numeric
def test_reference_is_the_adapter_disabled_model_not_a_second_model(lora_model, pairs, tmp_path):
    model, tokenizer = lora_model
    gc.collect()
    before = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())
    trainer = _dpo(model, tokenizer, pairs, tmp_path, early_stopping_patience=None)
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == before  # no second model
    assert trainer.ref_model is None and set(model.peft_config) == {"default", "ref"}
    start = _lora(model, "default")
    trainer.train()
    ref = _lora(model, "ref")
    assert all(torch.count_nonzero(v) == 0 for n, v in ref.items() if "lora_B" in n)  # ref = adapter disabled
    assert any(not torch.equal(v, start[n]) for n, v in _lora(model, "default").items())  # the policy moved
    # the reference's log-probs are exactly the adapter-disabled model's
    ids = tokenizer.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], return_tensors="pt",
                                        return_dict=True)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(**ids).logits
        model.set_adapter("ref")
        ref_logits = model(**ids).logits
        model.set_adapter("default")
    assert torch.allclose(base_logits, ref_logits, atol=1e-6)


@pytest.mark.numeric
def test_dpo_from_sft_adapters_keeps_them_as_reference(lora_model, pairs, tmp_path):
    model, tokenizer = lora_model
    with torch.no_grad():  # stand-in for SFT: adapters that differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    sft_dir = llmft.save_adapters(model, tokenizer, tmp_path / "sft")
    sft = {n: v.float() for n, v in load_file(sft_dir / "adapter_model.safetensors").items()}
    policy, tok = llmft.load_model(str(sft_dir), max_seq_length=128)
    trainer = _dpo(policy, tok, pairs, tmp_path / "dpo", early_stopping_patience=None)
    trainer.train()
    ref = {n.replace(".ref.", "."): v
           for n, v in _lora(policy, "ref").items()}
    assert len(ref) == len(sft)
    for name, value in sft.items():
        match = [v for n, v in ref.items() if n.replace(".weight", "") == name.replace(".weight", "")]
        assert match and torch.allclose(match[0], value, atol=1e-6), name  # reference = the SFT adapters, frozen
    out = llmft.save_adapters(policy, tok, tmp_path / "dpo_adapters")
    assert not (out / "ref").exists()  # only the trained adapter is saved


class _Snapshots(TrainerCallback):
    """The adapter weights at each evaluation, to compare with what BestCheckpoint wrote."""

    def __init__(self):
        self.at = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {n: p.detach().float().clone() for n, p in model.named_parameters()
                                      if ".default." in n}


@pytest.mark.numeric
def test_dpo_run_logs_rewards_early_stops_and_keeps_the_best(lora_model, pairs, tmp_path):
    model, tokenizer = lora_model
    snapshots = _Snapshots()
    metric = "eval_rewards/margins"
    trainer = _dpo(model, tokenizer, pairs, tmp_path, max_steps=30, metric=metric, early_stopping_patience=2,
                   early_stopping_min_delta=0.05, keep_best=1, callbacks=[snapshots])
    llmft.train(trainer)
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins",
            "eval_rewards/chosen", "eval_rewards/rejected"} <= set(rows[0])
    evals = [(int(r["step"]), float(r[metric])) for r in rows if r["event"] == "eval"]
    best, bad, expected = None, 0, 30
    for step, value in evals:  # replay the rule independently
        if best is None or value > best + 0.05:
            best, bad = value, 0
        else:
            bad += 1
            if bad >= 2:
                expected = step
                break
    assert trainer.state.global_step == expected
    assert callbacks.find_callback(trainer, callbacks.EarlyStopping).stopped_at_step == (
        expected if expected < 30 else None)
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    best_step = max(evals, key=lambda e: (e[1], -e[0]))[0]
    assert record["best_step"] == best_step and record["greater_is_better"] is True
    on_disk = load_file(Path(record["best_path"]) / "adapter_model.safetensors")
    at_best = snapshots.at[best_step]
    assert len(on_disk) == len(at_best)
    for name, value in on_disk.items():
        key = next(k for k in at_best if k.replace(".default", "") == name)
        assert torch.equal(value.float(), at_best[key]), name  # the files are that step's adapters
    fig = plots.plot_dpo(tmp_path, tmp_path / "dpo.png")
    assert [ax.get_title() for ax in fig.axes] == ["DPO: loss", "DPO: reward accuracy", "DPO: reward margin",
                                                   "DPO: rewards"]
    assert len(fig.axes[3].get_lines()) == 4


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q?", "chosen": "yes", "rejected": "no"}, {"prompt": "q2?", "chosen": "same", "rejected": " same "}],
     r"train_dataset: 1 pairs carry no preference \(chosen == rejected: rows 1\)"),
    ([{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": ""}]}],
     r"\(empty rejected: rows 0\).*preference_pairs\(dataset, strict=False\)"),
    ([], r"train_dataset: empty \(0 rows\)"),
    ([{"prompt": "q?", "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}]}],
     r"row 0: prompt, chosen and rejected must be all strings"),
])
def test_pairs_without_a_preference_are_refused_by_the_builder(rows, message):
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(data.DataError, match=message):
        llmft.build_dpo_trainer(None, None, dataset)  # before the model is touched
    if rows and "no preference" in message:  # the one check preference_pairs makes too
        with pytest.raises(data.DataError, match="carries no preference"):
            data.preference_pairs(dataset, verbose=False)


def test_plain_string_pairs_train_as_text(lora_model, tmp_path):
    model, tokenizer = lora_model
    pairs = Dataset.from_list([{"prompt": "Question: what is 2 + 2?\nAnswer:", "chosen": " 4", "rejected": " 5"},
                               {"prompt": "Question: what is 3 + 3?\nAnswer:", "chosen": " 6", "rejected": " 9"}] * 2)
    trainer = llmft.build_dpo_trainer(model, tokenizer, pairs, max_steps=2, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=1, output_dir=str(tmp_path), verbose=False)
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]).endswith("Question: what is 2 + 2?\nAnswer:")  # no chat template
    assert tokenizer.decode(row["chosen_ids"]).startswith(" 4")
    assert trainer.train().global_step == 2


def test_building_twice_on_one_model_keeps_the_reference(lora_model, pairs, tmp_path):
    """A notebook cell re-run: the second trainer finds TRL's 'ref' adapter and keeps it as the reference (the
    policy trained since is not the reference)."""
    model, tokenizer = lora_model
    options = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
                   verbose=False)
    first = llmft.build_dpo_trainer(model, tokenizer, pairs, output_dir=str(tmp_path / "a"), **options)
    reference = _lora(model, "ref")
    first.train()
    assert any(not torch.equal(v, reference[n.replace(".default.", ".ref.")])
               for n, v in _lora(model, "default").items())  # the policy moved
    second = llmft.build_dpo_trainer(model, tokenizer, pairs, output_dir=str(tmp_path / "b"), **options)
    assert set(model.peft_config) == {"default", "ref"}
    kept = _lora(model, "ref")
    assert kept.keys() == reference.keys() and all(torch.equal(kept[n], reference[n]) for n in reference)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    assert second.train().global_step == 2
