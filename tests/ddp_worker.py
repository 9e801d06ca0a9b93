"""One process of a torchrun job for test_distributed.py: a recipe run exactly as ``python -m llmft train|dpo`` runs it
(:func:`llmft.recipes.run_recipe`), plus two test callbacks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py train|dpo RECIPE REPORT_DIR \
        [KILL_AT_STEP]

Every process writes ``REPORT_DIR/rank-<rank>.json`` at the end of training: the step it stopped at, the evaluation
metrics it saw, a digest of its LoRA weights, what ``any_process`` answered when only process 1 said yes, and whether
``generate_batch(across_processes=True)`` returned every prompt's answer once and in order. With KILL_AT_STEP the
main process SIGKILLs the launcher, the other processes and itself at the end of that step: no cleanup, no final
save, like a disconnect.
"""
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import llmft  # noqa: F401  (first, as `python -m llmft` does: Unsloth before transformers, the Kaggle GPU pin)
from transformers import TrainerCallback

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(7)]  # 7: the two processes get 4 and 3


class RankReport(TrainerCallback):
    def __init__(self, directory):
        self.directory = Path(directory)
        self.report = {"evaluations": []}

    def on_train_begin(self, args, state, control, **kwargs):
        from llmft.runtime import any_process, process_count, process_rank

        self.report.update(rank=process_rank(), world_size=process_count(), parallel_mode=str(args.parallel_mode),
                           any_when_only_rank_1=any_process(process_rank() == 1), any_when_none=any_process(False),
                           cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        keep = {k: v for k, v in (metrics or {}).items() if k.startswith("eval_") and "runtime" not in k
                and "per_second" not in k}
        self.report["evaluations"].append({"step": state.global_step, **keep})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.report.setdefault("train_logs", []).append({"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        import torch

        from llmft.generation import generate_batch

        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                digest.update(param.detach().float().cpu().numpy().tobytes())
        options = dict(batch_size=1, max_new_tokens=4, progress=False)  # batch 1: no padding, same answers anywhere
        shared = generate_batch(model, processing_class, PROMPTS, across_processes=True, **options)
        local = generate_batch(model, processing_class, PROMPTS, **options)
        self.report.update(global_step=state.global_step, max_steps=state.max_steps, lora_sha256=digest.hexdigest(),
                           generated_across_processes=shared, generated_here=local,
                           distributed=torch.distributed.is_initialized())
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank-{self.report['rank']}.json").write_text(json.dumps(self.report, indent=1))


class KillAt(TrainerCallback):
    """At the end of step ``step`` the main process SIGKILLs the launcher, the other processes and itself."""

    def __init__(self, step):
        self.step = step
        self.pids = []

    def on_train_begin(self, args, state, control, **kwargs):
        from accelerate.utils import gather_object

        self.pids = gather_object([os.getpid()])  # torchrun starts each process in a session of its own

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            sys.stdout.flush()
            for pid in [os.getppid(), *[p for p in self.pids if p != os.getpid()], os.getpid()]:
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    from llmft import recipes

    command, recipe, report_dir = sys.argv[1:4]
    callbacks = [RankReport(report_dir)]
    if len(sys.argv) > 4:
        callbacks.append(KillAt(int(sys.argv[4])))
    recipes.run_recipe(recipe, command, smoke=True, callbacks=callbacks)
