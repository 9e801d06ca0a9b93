"""Plots people would rather look at than read: the NTUA lab report's four training panels (train loss, validation loss,
learning rate, GPU memory) from the metrics CSV or a trainer, and the shape of a learning-rate schedule.

Every function returns the matplotlib Figure (shown inline in notebooks) and saves a PNG when given ``path``.
"""
from __future__ import annotations

import os


def load_metrics(source):
    """A tidy DataFrame of training metrics from: a metrics CSV path (``output_dir/metrics.csv``), an output
    directory holding one, a trainer (its log history), a log history list, or such a DataFrame (returned as is)."""
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        return source

    if hasattr(source, "state") and hasattr(source.state, "log_history"):
        source = source.state.log_history
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "metrics.csv")
        if not os.path.exists(path):
            raise FileNotFoundError(f"load_metrics: no metrics CSV at {path} (build_trainer writes "
                                    "<output_dir>/metrics.csv)")
        return pd.read_csv(path)
    frame = pd.DataFrame(list(source))
    if "step" not in frame:
        raise ValueError("load_metrics: expected rows with a 'step' field (trainer.state.log_history or metrics.csv)")
    return frame


def _series(frame, column):
    if column not in frame:
        return None
    points = frame[["step", column]].dropna()
    return points if len(points) else None


def save_figure(fig, path: str | os.PathLike | None = None):
    """Lay ``fig`` out tightly and, when ``path`` is given, write it (PNG at 110 dpi; by the main process only when
    several train together); returns the figure. Every llmft plot ends here."""
    from llmft.environment import is_main_process

    fig.tight_layout()
    if path is not None and is_main_process():
        fig.savefig(path, dpi=110)
    return fig


def _draw_probes(ax, frame) -> None:
    """Live probes (``eval_probe/<name>`` columns) on a second y axis of ``ax``, if the run had any."""
    columns = [c for c in frame.columns if c.startswith("eval_probe/")]
    if not columns:
        return
    twin = ax.twinx()
    for column in columns:
        points = _series(frame, column)
        if points is not None:
            twin.plot(points["step"], points[column], "s--", label=f"probe {column[len('eval_probe/'):]}")
    twin.set(ylabel="probe accuracy", ylim=(-0.02, 1.02))
    twin.legend(loc="lower left", fontsize="small")


def plot_training(source, path: str | os.PathLike | None = None, title: str = "Training"):
    """The NTUA lab report's four panels: train loss, validation loss, learning rate and GPU memory (reserved and
    allocated, GB; flat at 0 on a CPU) against the step. Live probes (``eval_probe/<name>``, see
    :class:`llmft.callbacks.ProbeCallback`) are drawn on a second axis of the validation panel: the forgetting curve
    beside the loss."""
    import matplotlib.pyplot as plt

    frame = load_metrics(source)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], [("loss", "train loss", "-")], "train loss"),
        (axes[0, 1], [("eval_loss", "validation loss", "o-")], "validation loss"),
        (axes[1, 0], [("learning_rate", "learning rate", "-")], "learning rate"),
        (axes[1, 1], [("gpu_mem_reserved_gb", "reserved", "-"), ("gpu_mem_allocated_gb", "allocated", "--")],
         "GPU memory (GB)"),
    ]
    for ax, lines, name in panels:
        drawn = False
        for column, label, style in lines:
            points = _series(frame, column)
            if points is not None:
                ax.plot(points["step"], points[column], style, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(lines) > 1:
            ax.legend()
        ax.set(xlabel="step", title=f"{title}: {name}")
    _draw_probes(axes[0, 1], frame)
    return save_figure(fig, path)


def plot_schedule(scheduler, num_training_steps: int, peak_lr: float = 2e-4, path: str | os.PathLike | None = None,
                  compare: tuple = ("linear",), **options):
    """The learning rate a schedule gives at each step (a name from :data:`llmft.schedulers.SCHEDULES`, a factory,
    or several names as a list), next to transformers' schedules named in ``compare``."""
    import matplotlib.pyplot as plt

    from llmft.schedulers import schedule_curve, transformers_schedule

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]:
        label = name if isinstance(name, str) else getattr(name, "__name__", "custom")
        ax.plot(schedule_curve(name, num_training_steps, peak_lr, **options), label=label)
    warmup = options.get("warmup_steps", 0)
    for name in compare:
        curve = schedule_curve(transformers_schedule(name), num_training_steps, peak_lr, warmup_steps=warmup)
        ax.plot(curve, "--", color="gray", label=f"{name} (transformers)")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    ax.legend()
    return save_figure(fig, path)


def plot_dpo(source, path: str | os.PathLike | None = None, title: str = "DPO"):
    """DPO's four panels from the same metrics CSV: loss, reward accuracy (how often the chosen answer out-scores
    the rejected one), reward margin, and chosen vs rejected rewards; training as lines, evaluation as dots."""
    import matplotlib.pyplot as plt

    frame = load_metrics(source)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "loss", [("loss", "train"), ("eval_loss", "eval")]),
        (axes[0, 1], "reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
        (axes[1, 0], "reward margin", [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
        (axes[1, 1], "rewards", [("rewards/chosen", "chosen (train)"), ("rewards/rejected", "rejected (train)"),
                                 ("eval_rewards/chosen", "chosen (eval)"), ("eval_rewards/rejected", "rejected (eval)")]),
    ]
    for ax, name, lines in panels:
        drawn = False
        for column, label in lines:
            points = _series(frame, column)
            if points is not None:
                ax.plot(points["step"], points[column], "o-" if column.startswith("eval_") else "-", label=label,
                        alpha=0.9)
                drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xlabel="step", title=f"{title}: {name}")
    _draw_probes(axes[0, 1], frame)
    return save_figure(fig, path)


def plot_frontier(summary, x: str, y: str, path: str | os.PathLike | None = None, *, baseline: float | None = None,
                  x_label: str | None = None, y_label: str | None = None,
                  title: str = "Learning vs forgetting"):
    """The learning-vs-forgetting frontier: one point per run at (task score ``x``, retained skill ``y``) with error
    bars of one standard deviation across seeds, from :func:`llmft.experiments.summarize` (columns ``<x>_mean``,
    ``<x>_sd``, ``<y>_mean``, ``<y>_sd``, ``run``, ``n``). ``baseline``: the task's majority baseline, drawn as a
    vertical line. Up and to the right is better: learned more, forgot less."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for index, row in enumerate(summary.to_dict("records")):
        ax.errorbar(row[f"{x}_mean"], row[f"{y}_mean"], xerr=row[f"{x}_sd"], yerr=row[f"{y}_sd"], fmt="o",
                    capsize=4, color=f"C{index}", label=f"{row['run']} (n={row['n']})")
    if baseline is not None:
        ax.axvline(baseline, color="gray", linestyle="--", label=f"majority baseline {baseline:.2f}")
    ax.set(xlabel=x_label or x, ylabel=y_label or y, title=title, ylim=(-0.02, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    return save_figure(fig, path)
