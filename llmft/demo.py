"""The offline demo (``python -m llmft demo``): the CodeMMLU report's forgetting finding reproduced on a laptop CPU.

1. Build (once, cached) a tiny "pretrained" Llama that knows the Fibonacci sequence: full training on an Alpaca mix of
   Fibonacci windows, programming Q&A and arithmetic sequences.
2. Fine-tune it with LoRA through ``build_trainer`` on multiple-choice questions for 0.2 epoch and 1 epoch, 1 epoch
   with knowledge distillation from the base, and 1 epoch with the Chebyshev schedule (separate runs).
3. Probe every run with the Fibonacci probe (the CodeMMLU report's headline prompt and 116 other windows), score the MCQ
   validation set against the majority-letter baseline, and write plots, a JSON and a Markdown summary.

Such a tiny model learns the answer-letter *format*, not programming knowledge: MCQ accuracy is reported next to the
majority baseline and is not a result about CodeMMLU. What it does show is forgetting, measured.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llmft import testing
from llmft.testing import pretrained_base  # noqa: F401  (the demo's base; built and cached by llmft.testing)
from llmft._unsloth import pinned_cpu_precision
from llmft.experiments import mcq_accuracy, run_experiment
from llmft.log import say

CURVE_RUN = "1 epoch"  # the run whose checkpoints are probed for the forgetting curve
# LoRA runs use a 16-bit base: on a CPU, Unsloth's 4-bit path is several times slower per step for this tiny model,
# and the demo must fit in minutes (the 4-bit path is what the test suite exercises).
LOAD_IN_4BIT = False
RUNS = (
    ("0.2 epoch", dict(num_train_epochs=0.2)),
    ("1 epoch", dict(num_train_epochs=1.0)),
    ("1 epoch + KD", dict(num_train_epochs=1.0, distill={"weight": 0.3})),
    ("1 epoch + Chebyshev", dict(num_train_epochs=1.0, scheduler="chebyshev")),
)


def run_forgetting_demo(output_dir: str = "llmft_demo", *, pretrain_steps: int = 600, mcq_rows: int = 1000,
                        seed: int = 3407, learning_rate: float = 2e-3, batch_size: int = 8,
                        runs=RUNS, probe_items: int | None = None, verbose: bool = True) -> dict:
    """The main job: see the module docstring. Returns the results written to ``output_dir/results.json``.
    ``probe_items`` limits the Fibonacci probe to its first items (all 117 by default)."""
    # Same numbers on bf16 and fp32 CPUs: fp32 is not slower for models this small (GUIDE §7), 2 threads as CI has.
    with pinned_cpu_precision(bf16=False, threads=2) as pinned:
        return _forgetting_demo(output_dir, pretrain_steps=pretrain_steps, mcq_rows=mcq_rows, seed=seed,
                                learning_rate=learning_rate, batch_size=batch_size, runs=runs,
                                probe_items=probe_items, verbose=verbose, pinned=pinned)


def _forgetting_demo(output_dir, *, pretrain_steps, mcq_rows, seed, learning_rate, batch_size, runs, probe_items,
                     verbose, pinned) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import llmft
    import pandas as pd
    from llmft import mcq, plots, probes, templates

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base_dir = pretrained_base(pretrain_steps, verbose=verbose)
    probe = probes.fibonacci_probe(max_items=probe_items)

    say("[1/4] loading the pretrained base and the MCQ data")
    load_options = dict(max_seq_length=384, lora_r=16, seed=seed, load_in_4bit=LOAD_IN_4BIT)
    model, tokenizer = llmft.load_model(str(base_dir), **load_options)
    rows = llmft.mcq_rows(testing.tiny_codemmlu(mcq_rows, seed=seed), eos_token=tokenizer.eos_token, verbose=False)
    val = llmft.mcq_rows(testing.tiny_codemmlu(100, seed=seed + 1), eos_token=tokenizer.eos_token, verbose=False)
    baseline_letter, baseline = mcq.majority_baseline(list(val["answer"]))
    steps_per_epoch = -(-len(rows) // batch_size)
    # Only CURVE_RUN evaluates and keeps checkpoints (for the forgetting curve): the others just train.
    variants = {name: {**options, **({"save_strategy": "steps"} if name == CURVE_RUN else
                                     {"save_strategy": "no", "eval_strategy": "no"})} for name, options in runs}
    curve_run = {}

    def keep_curve(name, model, tokenizer, trainer):
        if name == CURVE_RUN:  # probed now, while this run's model is loaded
            curve_run["curve"] = probes.probe_checkpoints(model, tokenizer, probe, trainer.args.output_dir)
            curve_run["run_dir"] = trainer.args.output_dir

    say(f"[2/4] base + {len(variants)} LoRA runs on MCQ: {', '.join(variants)}")
    experiment = run_experiment(
        str(base_dir), variants, rows.select_columns(["text"]), val.select_columns(["text"]),
        output_dir=str(out / "runs"), load_options=load_options, loaded=(model, tokenizer),
        trainer_options=dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                             learning_rate=learning_rate, warmup_steps=5,
                             instruction_part=templates.MCQ_INSTRUCTION_PART,
                             response_part=templates.MCQ_RESPONSE_PART, early_stopping_patience=None,
                             save_total_limit=None, eval_steps=max(1, steps_per_epoch // 5), seed=seed,
                             disable_tqdm=not verbose),
        probes={"probe": probe}, scorers={"mcq_accuracy": mcq_accuracy(val)}, base_name="base (no fine-tuning)",
        on_run=keep_curve, resume=False, save_adapters=False, progress=verbose, verbose=verbose)
    table = experiment.table.rename(columns={"probe_headline": "headline_answer"})
    results = {"precision": pinned, "probe_items": len(probe.prompts), "mcq_train_rows": len(rows),
               "mcq_val_rows": len(val),
               "majority_baseline": {"letter": baseline_letter, "accuracy": baseline},
               "runs": json.loads(table[["run", "steps", "probe_accuracy", "headline_answer", "mcq_accuracy",
                                         "train_seconds"]].to_json(orient="records"))}
    tables = [experiment.answers]

    say("[3/4] forgetting curve across the 1-epoch run's checkpoints")
    figures = {}
    if curve_run:
        run_dir, curve = curve_run["run_dir"], curve_run["curve"]
        by_step = probes.accuracy_by(curve, "step")
        results["forgetting_curve"] = [
            {"step": int(step), "probe_accuracy": float(row.probe_accuracy), "headline_answer": row.headline_answer}
            for step, row in by_step.iterrows()]
        probes.plot_forgetting(curve, run_dir, path=out / "forgetting_curve.png",
                               title="Fibonacci probe during 1 epoch of MCQ fine-tuning")
        plots.plot_training(run_dir, out / "training_curves.png", title="1 epoch")
        figures = {"forgetting_curve": str(out / "forgetting_curve.png"),
                   "training_curves": str(out / "training_curves.png")}

    say("[4/4] summary")
    summary = pd.DataFrame(results["runs"])
    _plot_runs(summary, baseline, out / "forgetting_by_run.png")
    figures["forgetting_by_run"] = str(out / "forgetting_by_run.png")
    pd.concat(tables).to_csv(out / "probe_answers.csv", index=False)
    results.update(seconds=round(time.time() - started, 1), figures=figures,
                   probe_answers=str(out / "probe_answers.csv"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table_md = _summary_markdown(summary, baseline_letter, baseline, len(probe.prompts), pinned)
    (out / "summary.md").write_text(table_md)
    say(table_md)
    say(f"done in {results['seconds']} s; results in {out}")
    return results


def _plot_runs(summary, baseline: float, path):
    import matplotlib.pyplot as plt

    from llmft.plots import save_figure

    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(summary))
    ax.bar([i - 0.2 for i in x], summary["probe_accuracy"], width=0.4, label="Fibonacci probe accuracy")
    ax.bar([i + 0.2 for i in x], summary["mcq_accuracy"], width=0.4, label="MCQ accuracy")
    ax.axhline(baseline, color="gray", linestyle="--", label="MCQ majority baseline")
    ax.set_xticks(list(x), summary["run"], rotation=15)
    ax.set(ylim=(0, 1.05), title="What fine-tuning on MCQ costs: probe vs task")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _summary_markdown(summary, letter: str, baseline: float, n_items: int, pinned: dict) -> str:
    precision = (f"Computed in {pinned['compute_dtype']} with {pinned['threads']} CPU threads, pinned so that bf16 and "
                 "fp32 CPUs give the same numbers (CPUs with other instruction sets may still differ slightly).\n\n"
                 if pinned.get("device") == "cpu" else "Computed on a GPU.\n\n")
    lines = [precision + f"| run | steps | Fibonacci probe ({n_items} items) | headline answer (expected 13) | "
             f"MCQ accuracy (majority '{letter}': {baseline:.2f}) | train time (s) |", "|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['run']} | {r['steps']} | {r['probe_accuracy']:.2f} | {r['headline_answer']!r} | "
                     f"{r['mcq_accuracy']:.2f} | {r['train_seconds']} |")
    return "\n".join(lines) + "\n"


def run_sft_demo(output_dir: str, max_steps: int, seed: int, arch: str) -> dict:
    """The foundation demo: offline end-to-end SFT on FineTome-shaped chat data (train, evaluate, save and reload
    adapters, generate)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llmft
    from llmft import plots

    prompts_text = ["What is the capital of France?", "What is 12 plus 7?", "Explain recursion in one sentence.",
                    "Write a short poem about the color green."]
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir(arch)), max_seq_length=256, lora_r=16,
                                        lora_alpha=32, seed=seed)
    chats = llmft.sharegpt_to_messages(testing.tiny_finetome(160, seed=seed))
    train, held_out = chats.select(range(128)), chats.select(range(128, 160))
    prompts = [[{"role": "user", "content": p}] for p in prompts_text]
    before = llmft.generate_batch(model, tokenizer, prompts, max_new_tokens=24)
    trainer = llmft.build_trainer(model, tokenizer, train, held_out, output_dir=str(out / "run"),
                                  max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                  learning_rate=1e-2, warmup_steps=5, eval_steps=max(1, max_steps // 8), seed=seed,
                                  save_total_limit=1)
    eval_before = trainer.evaluate()["eval_loss"]
    train_result = trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]
    after = llmft.generate_batch(model, tokenizer, prompts, max_new_tokens=24)
    adapter_dir = llmft.save_adapters(model, tokenizer, out / "adapters")
    reloaded, reloaded_tok = llmft.load_model(str(adapter_dir), max_seq_length=256)
    after_reload = llmft.generate_batch(reloaded, reloaded_tok, prompts, max_new_tokens=24)
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
