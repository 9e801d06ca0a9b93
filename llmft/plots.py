"""Plots people would rather look at than read: training curves from a trainer's log history."""
from __future__ import annotations

import os


def log_history_frame(log_history):
    """``trainer.state.log_history`` (a list of dicts) → a pandas DataFrame, one row per log/eval event."""
    import pandas as pd

    frame = pd.DataFrame(list(log_history))
    if "step" not in frame:
        raise ValueError("log_history has no 'step' field; pass trainer.state.log_history")
    return frame


def plot_training(log_history, path: str | os.PathLike | None = None, title: str = "Training"):
    """Train loss and eval loss against step, and the learning rate, side by side. Saves to ``path`` if given and
    returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    frame = log_history_frame(log_history)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for column, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        if column in frame:
            points = frame[["step", column]].dropna()
            ax_loss.plot(points["step"], points[column], style, label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    ax_loss.legend()
    if "learning_rate" in frame:
        points = frame[["step", "learning_rate"]].dropna()
        ax_lr.plot(points["step"], points["learning_rate"])
    ax_lr.set(xlabel="step", ylabel="learning rate", title=f"{title}: learning rate")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
