"""A training run used by test_resume.py, in-process or as a subprocess that kills itself mid-run.

    python tests/resume_worker.py OUTPUT_DIR [KILL_AT_STEP] [sft|dpo]

With KILL_AT_STEP the process SIGKILLs itself at the end of that step: no cleanup, no final save, like a Colab
disconnect.
"""
import os
import signal
import sys

from transformers import TrainerCallback

MAX_STEPS = 40
SAVE_EVERY = 5
# Every evaluation after the first counts as "no improvement" (min_delta is huge), so early stopping fires at the
# 6th evaluation (step 30) in an uninterrupted run, and only there if the counter survives a resume.
PATIENCE = 5
DPO_STEPS = 12  # DPO: evaluated and saved every DPO_EVERY steps, no early stop
DPO_EVERY = 4


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def build(output_dir, extra_callbacks=(), kind="sft"):
    import llmft
    from llmft import testing

    model, tokenizer = llmft.load_model(str(testing.tiny_model_dir()), max_seq_length=128, lora_r=8, seed=0)
    if kind == "dpo":
        from llmft.data import orca_to_dpo

        pairs = orca_to_dpo(testing.tiny_orca_dpo(32), verbose=False)
        return llmft.build_dpo_trainer(
            model, tokenizer, pairs.select(range(24)), pairs.select(range(24, 32)), output_dir=str(output_dir),
            max_steps=DPO_STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
            warmup_steps=1, eval_steps=DPO_EVERY, save_total_limit=2, early_stopping_patience=None, seed=0,
            verbose=False, callbacks=list(extra_callbacks), disable_tqdm=True)
    chats = llmft.sharegpt_to_messages(testing.tiny_finetome(64), verbose=False)
    return llmft.build_trainer(
        model, tokenizer, chats.select(range(48)), chats.select(range(48, 64)), output_dir=str(output_dir),
        max_steps=MAX_STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
        warmup_steps=3, eval_steps=SAVE_EVERY, save_total_limit=3, scheduler="chebyshev_fractal",
        early_stopping_patience=PATIENCE, early_stopping_min_delta=1e9, seed=0, verbose=False,
        callbacks=list(extra_callbacks), disable_tqdm=True)


def run(output_dir, kill_at=None, resume="auto", kind="sft", spelling="llmft"):
    """``spelling="llmft"``: ``llmft.train(trainer, resume=resume)``; ``"trl"``: the trainer's own
    ``trainer.train(resume_from_checkpoint=resume)``, as TRL's and Unsloth's notebooks resume."""
    import llmft

    trainer = build(output_dir, [KillAt(kill_at)] if kill_at else [], kind)
    if spelling == "trl":
        trainer.train(resume_from_checkpoint=resume)
    else:
        llmft.train(trainer, resume=resume)
    return trainer


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None,
        kind=sys.argv[3] if len(sys.argv) > 3 else "sft")
