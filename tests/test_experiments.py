"""The experiment runner: every variant from the same base, one tidy table, the paths of every run."""
from pathlib import Path

import llmft
from llmft import experiments, probes, testing


def test_runs_each_variant_from_the_same_base(tiny_dir, tmp_path):
    _, tokenizer = llmft.load_model(tiny_dir, max_seq_length=256, lora_r=None)
    rows = llmft.mcq_rows(testing.tiny_codemmlu(24), eos_token=tokenizer.eos_token, verbose=False)
    train, val = rows.select(range(16)), rows.select(range(16, 24))
    probe = probes.fibonacci_probe(max_items=4)
    seen = []

    def on_run(name, model, tokenizer, trainer):
        seen.append((name, trainer.args.max_steps, sum(p.requires_grad for p in model.parameters()) > 0))
        return {"note": f"{name} done"}

    result = experiments.run_experiment(
        tiny_dir, {"2 steps": dict(max_steps=2), "4 steps + KD": dict(max_steps=4, distill={"weight": 0.3})},
        train, val, output_dir=str(tmp_path),
        load_options=dict(max_seq_length=256, lora_r=8), probes={"fib": probe},
        scorers={"mcq": experiments.mcq_accuracy(val)}, on_run=on_run, progress=False, verbose=False,
        trainer_options=dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                             early_stopping_patience=None))
    table = result.table
    assert list(table["run"]) == ["base", "2 steps", "4 steps + KD"] and list(table["steps"]) == [0, 2, 4]
    assert seen == [("2 steps", 2, True), ("4 steps + KD", 4, True)]
    assert list(table["note"])[1:] == ["2 steps done", "4 steps + KD done"]
    assert all(0 <= v <= 1 for v in table["fib_accuracy"]) and all(0 <= v <= 1 for v in table["mcq"])
    for name in ("2 steps", "4 steps + KD"):
        run = result.runs[name]
        assert Path(run["output_dir"]).name == experiments.run_slug(name)
        assert (Path(run["adapters"]) / "adapter_config.json").exists() and Path(run["metrics"]).exists()
        assert (Path(run["output_dir"]) / "llmft_config.json").exists()
    kd_metrics = Path(result.runs["4 steps + KD"]["metrics"]).read_text()
    assert "kd_loss" in kd_metrics.splitlines()[0]  # each variant's own options reached its trainer
    assert set(result.answers["run"]) == {"base", "2 steps", "4 steps + KD"} and len(result.answers) == 3 * 4
    assert result.model is not None and experiments.run_slug("0.2 epoch + KD") == "0p2_epoch_plus_KD"


def test_seeds_repeat_every_variant_and_summarize_gives_mean_and_spread(tiny_dir, tmp_path, capsys):
    _, tokenizer = llmft.load_model(tiny_dir, max_seq_length=256, lora_r=None)
    rows = llmft.mcq_rows(testing.tiny_codemmlu(16), eos_token=tokenizer.eos_token, verbose=False)
    capsys.readouterr()
    result = experiments.run_experiment(
        tiny_dir, {"2 steps": dict(max_steps=2)}, rows, output_dir=str(tmp_path),
        load_options=dict(max_seq_length=256, lora_r=8), scorers={"mcq": experiments.mcq_accuracy(rows)},
        seeds=[1, 2], progress=False, verbose=False, save_adapters=False,
        trainer_options=dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-2,
                             logging_steps=1))
    out = capsys.readouterr().out
    assert "{'loss'" not in out  # no dict per log on the console: metrics.csv has them
    assert out.count("Unsloth (CPU): LlamaForCausalLM") == 1  # three loads, Unsloth's identical line shown once
    table = result.table
    assert list(table["run"]) == ["base", "2 steps", "2 steps"] and list(table["seed"])[1:] == [1, 2]
    first, second = (llmft.load_metrics(tmp_path / "2_steps" / f"seed-{s}") for s in (1, 2))
    assert first["loss"].dropna().iloc[0] != second["loss"].dropna().iloc[0]  # seeds change init and data order
    summary = experiments.summarize(table, ["mcq", "steps"])
    assert list(summary["run"]) == ["base", "2 steps"] and list(summary["n"]) == [1, 2]
    runs = table[table["run"] == "2 steps"]["mcq"]
    assert abs(summary.loc[1, "mcq_mean"] - runs.mean()) < 1e-12
    assert abs(summary.loc[1, "mcq_sd"] - runs.std(ddof=1)) < 1e-12 and summary.loc[0, "mcq_sd"] == 0.0
