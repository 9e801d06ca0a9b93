"""The offline demo (``python -m llmft demo``): the CodeMMLU report's learning-vs-forgetting finding, measured on a
laptop CPU with its spread across seeds.

The CodeMMLU report fine-tuned on multiple-choice questions and found that 0.2 epoch beat 1 epoch on the task (0.64 vs
0.55) while the longer run forgot what the model knew (a Fibonacci prompt it had answered). Here:

1. The base is a tiny Llama (``llmft.testing.pretrained_base``, shipped with the package) fully trained on Fibonacci
   windows, arithmetic sequences and programming Q&A: it answers the Fibonacci probe.
2. The task is multiple-choice questions it can learn from what it knows: "What is the next term of 3, 7, 11, 15?"
   with four ranges as choices (``llmft.testing.sequence_mcq_rows``; held-out questions never repeat a training one).
3. LoRA runs through ``build_trainer`` for 0.2 epoch, 1 epoch, 1 epoch with knowledge distillation from the base and 1
   epoch with the Chebyshev schedule, each over several seeds; the 1-epoch runs score the Fibonacci probe live at every
   evaluation (the forgetting curve) and their adapters get an intruder-dimension repair sweep (Shuttleworth et al.
   2024).
4. Every run is scored on the probe (117 windows) and the held-out questions (against the majority baseline); the
   summary gives mean and standard deviation over seeds, the learning-vs-forgetting frontier and the forgetting curve.

``--model smollm2`` runs the same table on a real pretrained model, SmolLM2-135M-Instruct in 4-bit
(:func:`llmft.testing.real_model_dir`): the probe is then the knowledge probe calibrated on that base
(:func:`llmft.probes.calibrate_probe`: the simple sequences and well-known facts the base answers right), so a run's
probe accuracy is its retention, the share of what the base knew that it still knows.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llmft import testing
from llmft._unsloth import pinned_cpu_precision
from llmft.experiments import mcq_accuracy, repair_hook, run_experiment, summarize, with_repaired
from llmft.log import quiet_libraries, say

BASE_RUN = "base (no fine-tuning)"
CURVE_RUN = "1 epoch"  # scored live (the forgetting curve) and repaired (intruder dimensions)
REPAIR_RUN = "1 epoch + intruder repair"
RUNS = (
    ("0.2 epoch", dict(num_train_epochs=0.2)),
    ("1 epoch", dict(num_train_epochs=1.0)),
    ("1 epoch + KD", dict(num_train_epochs=1.0, distill={"weight": 0.3})),
    ("1 epoch + Chebyshev", dict(num_train_epochs=1.0, scheduler="chebyshev")),
)
SEEDS = (3407, 1, 2)
REPAIR_LAMBDAS = (1.0, 0.5, 0.0)
# 16-bit LoRA and no gradient checkpointing: on a CPU, Unsloth's 4-bit path is several times slower per step for this
# tiny model, and recomputing activations buys nothing at 0.8M parameters (the 4-bit path is what the suite tests).
LOAD_OPTIONS = dict(max_seq_length=256, lora_r=16, load_in_4bit=False, use_gradient_checkpointing=False)
THREADS = 2  # 60 steps: 3.3 s on 2 threads vs 4.0 s on 1 (idle 2-core machine); pinned so the numbers do not move


@dataclass(frozen=True)
class DemoModel:
    """What the demo's bases differ in; everything else (runs, seeds, task, checks) is shared."""

    title: str  # the summary's heading
    load_options: dict
    learning_rate: float
    batch_size: int
    mcq_rows: int
    probe_label: str  # the probe column's name in the summary
    seeds: tuple


DEMO_MODELS = {
    "tiny": DemoModel("a tiny model", LOAD_OPTIONS, 2e-3, 4, 472, "Fibonacci probe", SEEDS),
    # 4-bit QLoRA as on a T4; the calibrated probe's accuracy is the retention of what the base knew
    "smollm2": DemoModel("SmolLM2-135M-Instruct (4-bit)", dict(max_seq_length=256, lora_r=16), 1e-3, 8, 160,
                         "knowledge retained", SEEDS[:2]),
}
SMOLLM2_PROBE_CANDIDATES = 2  # calibrate every 2nd candidate of the knowledge probe (~300): ~2 min on 2 cores
SMOLLM2_PROBE_ITEMS = 60  # score at most this many calibrated items per run (a step of 1.7%)


def run_forgetting_demo(output_dir: str = "llmft_demo", *, model: str = "tiny", pretrain_steps: int = 600,
                        mcq_rows: int | None = None, seeds=None, learning_rate: float | None = None,
                        batch_size: int | None = None, runs=RUNS, probe_items: int | None = None,
                        verbose: bool = True) -> dict:
    """The main job: see the module docstring. Returns the results written to ``output_dir/results.json``.
    ``model``: ``"tiny"`` (the shipped tiny base, about two minutes) or ``"smollm2"`` (SmolLM2-135M-Instruct in
    4-bit, see :data:`DEMO_MODELS`). ``mcq_rows`` training questions (1 epoch = ``mcq_rows / batch_size`` steps),
    ``learning_rate``, ``batch_size`` and ``seeds``: None takes the model's setting; ``probe_items`` limits the probe
    to its first items (tiny: the Fibonacci probe's 117; smollm2: the calibrated items, 60 by default);
    ``pretrain_steps`` other than 600 builds another tiny base."""
    if model not in DEMO_MODELS:
        raise ValueError(f"run_forgetting_demo(model={model!r}): use one of {sorted(DEMO_MODELS)}")
    setup = DEMO_MODELS[model]
    # Same numbers on bf16 and fp32 CPUs: fp32 is not slower for models this small (50 LoRA steps on the demo base:
    # 4.9 s in fp32, 9.9 s in bf16 on a CPU with native bf16).
    with pinned_cpu_precision(bf16=False, threads=THREADS) as pinned, quiet_libraries(), _frozen_heap():
        return _forgetting_demo(output_dir, model=model, setup=setup, pretrain_steps=pretrain_steps,
                                mcq_rows=mcq_rows or setup.mcq_rows, seeds=list(seeds or setup.seeds),
                                learning_rate=learning_rate or setup.learning_rate,
                                batch_size=batch_size or setup.batch_size, runs=runs, probe_items=probe_items,
                                verbose=verbose, pinned=pinned)


@contextlib.contextmanager
def _frozen_heap():
    """Within the block, Python's garbage collector skips the objects that exist when it starts (the imported
    torch, transformers and Unsloth: hundreds of thousands of objects that live as long as the process). Each full
    collection (one per run here, by accelerate and by :func:`llmft.experiments.run_experiment`) then takes about 1 ms
    instead of 0.3 s. ``gc.freeze`` is the standard library's own remedy for this."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _base_and_probe(model_name: str, setup: DemoModel, *, pretrain_steps, probe_items, seed, verbose):
    """The demo's base loaded with its LoRA adapter, and its probe: the Fibonacci probe for the tiny base; for a real
    model the knowledge probe calibrated on it (the items the base answers right)."""
    from llmft import probes
    from llmft.models import load_model

    if model_name == "tiny":
        base_dir = testing.pretrained_base(pretrain_steps, verbose=verbose)
        say("[1/4] loading the tiny pretrained base and the sequence questions", verbose)
        model, tokenizer = load_model(str(base_dir), **setup.load_options, seed=seed)
        return base_dir, model, tokenizer, probes.fibonacci_probe(max_items=probe_items)
    base_dir = testing.real_model_dir(model_name)
    say(f"[1/4] loading {setup.title}, calibrating the knowledge probe on it, and the sequence questions", verbose)
    model, tokenizer = load_model(str(base_dir), **setup.load_options, seed=seed)
    candidates = probes.knowledge_probe("raw")
    candidates = candidates.subset(range(0, len(candidates.prompts), SMOLLM2_PROBE_CANDIDATES))
    with model.disable_adapter():
        probe, _ = probes.calibrate_probe(model, tokenizer, candidates, max_new_tokens=6, progress=verbose)
    calibration = probe.calibration
    kept, scored = len(probe.prompts), min(len(probe.prompts), probe_items or SMOLLM2_PROBE_ITEMS)
    probe = probe.subset(sorted({i * kept // scored for i in range(scored)}))  # evenly spread: sequences and facts
    probe.calibration = {**calibration, "scored": len(probe.prompts)}
    return base_dir, model, tokenizer, probe


def _forgetting_demo(output_dir, *, model, setup, pretrain_steps, mcq_rows, seeds, learning_rate, batch_size, runs,
                     probe_items, verbose, pinned) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from llmft import data
    from llmft import callbacks, mcq, plots, probes

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_name = model
    base_dir, model, tokenizer, probe = _base_and_probe(model_name, setup, pretrain_steps=pretrain_steps,
                                                        probe_items=probe_items, seed=seeds[0], verbose=verbose)
    rows = data.mcq_rows(testing.tiny_sequence_mcq("train", mcq_rows), eos_token=tokenizer.eos_token, verbose=False)
    val = data.mcq_rows(testing.tiny_sequence_mcq("val"), eos_token=tokenizer.eos_token, verbose=False)
    baseline_letter, baseline = mcq.majority_baseline(list(val["answer"]))
    task = mcq_accuracy(val)
    steps_per_epoch = -(-len(rows) // batch_size)
    live = callbacks.ProbeCallback([probe], tokenizer, max_items=32)  # the live forgetting curve (32 windows)
    # Only CURVE_RUN evaluates (a few held-out questions, for the live probe); nothing saves checkpoints.
    variants = {name: {**options, **({"eval_strategy": "steps", "eval_on_start": True, "probes": live}
                                     if name == CURVE_RUN
                                     else {"eval_strategy": "no"})} for name, options in runs}
    sweeps = {}
    repair = repair_hook(CURVE_RUN, probe, task, REPAIR_LAMBDAS, sweeps=sweeps)

    n_runs = len(variants) * len(seeds)
    say(f"[2/4] {n_runs} LoRA runs ({', '.join(variants)}; seeds {', '.join(map(str, seeds))}), each probed and "
        f"scored; the 1-epoch adapters repaired at λ = {', '.join(map(str, REPAIR_LAMBDAS))}", verbose)
    experiment = run_experiment(
        str(base_dir), variants, rows, val.select(range(16)),
        output_dir=str(out / "runs"), load_options={**setup.load_options, "seed": seeds[0]}, loaded=(model, tokenizer),
        trainer_options=dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                             learning_rate=learning_rate, warmup_steps=5, early_stopping_patience=None, keep_best=0,
                             save_strategy="no", eval_steps=max(1, steps_per_epoch // 6), disable_tqdm=not verbose,
                             gradient_checkpointing=False),
        probes={"probe": probe}, scorers={"mcq_accuracy": task}, base_name=BASE_RUN, seeds=seeds,
        on_run=repair, resume=False, save_adapters=False, progress=verbose, verbose=False)
    del model, tokenizer

    say("[3/4] mean and spread over seeds, frontier and forgetting curve", verbose)
    table = with_repaired(experiment.table, CURVE_RUN, "mcq_accuracy", REPAIR_RUN)
    summary = summarize(table, ["probe_accuracy", "mcq_accuracy", "steps", "train_seconds"])
    figures = {"frontier": str(out / "frontier.png"), "forgetting_curve": str(out / "forgetting_curve.png")}
    plots.plot_frontier(summary, "mcq_accuracy", "probe_accuracy", figures["frontier"], baseline=baseline,
                        x_label="held-out MCQ accuracy (task learned)",
                        y_label=f"{setup.probe_label} ({len(probe.prompts)} items, skill kept)",
                        title="Learning vs forgetting (mean ± 1 sd over seeds)")
    curve_dirs = table.loc[(table["run"] == CURVE_RUN), "output_dir"].tolist()
    probes.plot_probe_curves({CURVE_RUN: curve_dirs}, probe.name, figures["forgetting_curve"],
                            title=f"Live {setup.probe_label} (32 items) during 1 epoch: mean, min-max over seeds")
    import matplotlib.pyplot as plt

    plt.close("all")

    say("[4/4] summary", verbose)
    import pandas as pd

    checks = _checks(summary, baseline, setup.probe_label)
    results = {"model": model_name, "title": setup.title, "probe_label": setup.probe_label,
               "probe_calibration": probe.calibration, "precision": pinned, "probe_items": len(probe.prompts),
               "mcq_train_rows": len(rows),
               "mcq_val_rows": len(val), "seeds": seeds, "batch_size": batch_size, "learning_rate": learning_rate,
               "majority_baseline": {"letter": baseline_letter, "accuracy": baseline},
               "summary": json.loads(summary.to_json(orient="records")),
               "runs": json.loads(table[["run", "seed", "steps", "probe_accuracy", "probe_headline", "mcq_accuracy",
                                         "train_seconds"]].to_json(orient="records")),
               "repair_sweeps": json.loads(pd.concat([r.table.assign(seed=seed) for seed, r in sweeps.items()])
                                         .to_json(orient="records")) if sweeps else [],
               "checks": checks, "versus_1_epoch": _versus(summary, CURVE_RUN), "figures": figures}
    experiment.answers.to_csv(out / "probe_answers.csv", index=False)
    results.update(seconds=round(time.time() - started, 1), probe_answers=str(out / "probe_answers.csv"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = _summary_markdown(summary, results)
    (out / "summary.md").write_text(text)
    say(text, verbose)
    say(f"done in {results['seconds']} s; results in {out}", verbose)
    return results


def _row(summary, run: str) -> dict:
    return summary[summary["run"] == run].iloc[0].to_dict()


def _checks(summary, baseline: float, probe_label: str = "Fibonacci probe") -> dict:
    """The two claims the demo tests, each against the spread across seeds (1 sd)."""
    base, short, full = _row(summary, BASE_RUN), _row(summary, "0.2 epoch"), _row(summary, CURVE_RUN)
    return {
        "short_run_learned": {
            "what": "0.2-epoch MCQ accuracy above the majority baseline by more than its sd across seeds",
            "margin": round(short["mcq_accuracy_mean"] - baseline, 4), "sd": round(short["mcq_accuracy_sd"], 4),
            "holds": bool(short["mcq_accuracy_mean"] - baseline > short["mcq_accuracy_sd"])},
        "full_run_learned": {
            "what": "1-epoch MCQ accuracy above the majority baseline by more than its sd across seeds",
            "margin": round(full["mcq_accuracy_mean"] - baseline, 4), "sd": round(full["mcq_accuracy_sd"], 4),
            "holds": bool(full["mcq_accuracy_mean"] - baseline > full["mcq_accuracy_sd"])},
        "full_run_forgot": {
            "what": f"1-epoch {probe_label} below the base's by more than its sd across seeds",
            "margin": round(base["probe_accuracy_mean"] - full["probe_accuracy_mean"], 4),
            "sd": round(full["probe_accuracy_sd"], 4),
            "holds": bool(base["probe_accuracy_mean"] - full["probe_accuracy_mean"] > full["probe_accuracy_sd"])},
    }


def _versus(summary, reference: str) -> list[dict]:
    """Each later run against ``reference``: the difference of the means of the probe and the task, and whether it is
    larger than the spread across seeds (the larger of the two runs' sd)."""
    ref, rows = _row(summary, reference), summary.to_dict("records")
    out = []
    for r in rows[[x["run"] for x in rows].index(reference) + 1:]:
        item = {"run": r["run"]}
        for key in ("probe_accuracy", "mcq_accuracy"):
            delta, spread = r[f"{key}_mean"] - ref[f"{key}_mean"], max(r[f"{key}_sd"], ref[f"{key}_sd"])
            item[key] = {"delta": round(delta, 4), "sd": round(spread, 4), "beyond_spread": bool(abs(delta) > spread)}
        out.append(item)
    return out


def _summary_markdown(summary, results: dict) -> str:
    pinned, baseline = results["precision"], results["majority_baseline"]
    n_seeds, checks = len(results["seeds"]), results["checks"]
    label, calibration = results.get("probe_label", "Fibonacci probe"), results.get("probe_calibration")
    model = results.get("model", "tiny")
    command = "python -m llmft demo" + (f" --model {model}" if model != "tiny" else "")
    probe_text = (f"{label}: {results['probe_items']} of the {calibration['kept']} items the base answered right "
                  f"among {calibration['candidates']} simple-sequence and well-known-fact candidates (base accuracy "
                  f"{calibration['base_accuracy']:.2f}), so the base scores 1.00 by construction"
                  if calibration else f"Fibonacci probe {results['probe_items']} windows")
    lines = [f"# Learning vs forgetting on {results.get('title', 'a tiny model')} ({command})", "",
             "**The CodeMMLU report's claim**: fine-tuning on multiple-choice questions for 0.2 epoch beat 1 epoch on "
             "the task (0.64 vs 0.55) while the longer run forgot what the model knew (the Fibonacci prompt).", "",
             f"**Measured** (mean ± sd over {n_seeds} seeds; {results['mcq_train_rows']} training questions, batch "
             f"{results['batch_size']}, lr {results['learning_rate']}; {results['mcq_val_rows']} held-out questions, "
             f"majority answer '{baseline['letter']}' = {baseline['accuracy']:.2f}; {probe_text}):", "",
             f"| run | steps | {label} | MCQ accuracy | train time (s) |", "|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['run']} | {r['steps_mean']:.0f} | {r['probe_accuracy_mean']:.2f} ± "
                     f"{r['probe_accuracy_sd']:.2f} | {r['mcq_accuracy_mean']:.2f} ± {r['mcq_accuracy_sd']:.2f} | "
                     f"{r['train_seconds_mean']:.1f} |")
    lines += ["", "**What held** (each margin against the spread across seeds):", ""]
    for check in checks.values():
        verdict = "yes" if check["holds"] else "**no**"
        lines.append(f"- {check['what']}: {verdict} (margin {check['margin']:+.2f}, sd {check['sd']:.2f})")
    lines += ["", f"**Against the {CURVE_RUN} run** (difference of means; \"within the spread\" when it is not larger "
              "than the larger sd of the two):", ""]
    for item in results["versus_1_epoch"]:
        parts = [f"{name} {item[key]['delta']:+.2f}" + ("" if item[key]["beyond_spread"] else " (within the spread)")
                 for name, key in ((label, "probe_accuracy"), ("MCQ accuracy", "mcq_accuracy"))]
        lines.append(f"- {item['run']}: " + ", ".join(parts))
    scale = ("a 135M-parameter model in 4-bit" if calibration else "a 0.8M-parameter model")
    lines += ["", f"**Caveats**: {scale} and a synthetic task, not CodeMMLU; the repair row is the "
              "λ the sweep chose per seed (largest probe gain within 0.02 of the task score; "
              f"λ ∈ {list(REPAIR_LAMBDAS)}). "
              + ("The 0.2-epoch run did not learn the task here: the report's first claim is not reproduced at this "
                 "scale. "
                 if not checks["short_run_learned"]["holds"] else "")
              + (f"Computed in {pinned['compute_dtype']} with {pinned['threads']} CPU thread(s), pinned so that bf16 "
                 "and fp32 CPUs give the same numbers (CPUs with other instruction sets may still differ slightly)."
                 if pinned.get("device") == "cpu" else "Computed on a GPU.")]
    return "\n".join(lines) + "\n"


def run_sft_demo(output_dir: str, max_steps: int, seed: int, arch: str) -> dict:
    """The foundation demo: offline end-to-end SFT on FineTome-shaped chat data (train, evaluate, save and reload
    adapters, generate)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llmft.data import sharegpt_to_messages
    from llmft.generation import generate_batch
    from llmft.models import load_model, save_adapters
    from llmft.trainers import build_trainer
    from llmft import plots

    prompts_text = ["What is the capital of France?", "What is 12 plus 7?", "Explain recursion in one sentence.",
                    "Write a short poem about the color green."]
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = load_model(str(testing.tiny_model_dir(arch)), max_seq_length=256, lora_r=16,
                                        lora_alpha=32, seed=seed)
    chats = sharegpt_to_messages(testing.tiny_finetome(160, seed=seed))
    train, held_out = chats.select(range(128)), chats.select(range(128, 160))
    prompts = [[{"role": "user", "content": p}] for p in prompts_text]
    before = generate_batch(model, tokenizer, prompts, max_new_tokens=24)
    trainer = build_trainer(model, tokenizer, train, held_out, output_dir=str(out / "run"),
                                  max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                  learning_rate=1e-2, warmup_steps=5, eval_steps=max(1, max_steps // 8), seed=seed,
                                  save_total_limit=1)
    eval_before = trainer.evaluate()["eval_loss"]
    train_result = trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]
    after = generate_batch(model, tokenizer, prompts, max_new_tokens=24)
    adapter_dir = save_adapters(model, tokenizer, out / "adapters")
    reloaded, reloaded_tok = load_model(str(adapter_dir), max_seq_length=256)
    after_reload = generate_batch(reloaded, reloaded_tok, prompts, max_new_tokens=24)
    plots.plot_training(out / "run", out / "training_curves.png", title="Demo SFT")
    results = {
        "model": f"tiny {arch} (llmft.testing), 4-bit, LoRA r=16", "train_rows": len(train),
        "eval_rows": len(held_out), "steps": train_result.global_step, "eval_loss_before": round(eval_before, 4),
        "eval_loss_after": round(eval_after, 4), "train_loss": round(train_result.training_loss, 4),
        "reloaded_adapters_match": after_reload == after, "seconds": round(time.time() - started, 1),
        "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts_text, before, after)],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| prompt | before | after SFT |", "|---|---|---|"]
    lines += [f"| {g['prompt']} | {g['before']!r} | {g['after']!r} |" for g in results["generations"]]
    (out / "generations.md").write_text("\n".join(lines) + "\n")
    say(f"eval loss {eval_before:.3f} -> {eval_after:.3f} after {train_result.global_step} steps; reloaded adapters "
        f"identical: {results['reloaded_adapters_match']}; results in {out}")
    return results
