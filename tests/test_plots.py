import csv

import matplotlib
import pytest

matplotlib.use("Agg")

from llmft import plots, probes  # noqa: E402


def _write_csv(path):
    rows = [{"step": 1, "event": "train", "loss": 3.0, "learning_rate": 1e-3, "gpu_mem_reserved_gb": 0.0},
            {"step": 2, "event": "train", "loss": 2.5, "learning_rate": 8e-4, "gpu_mem_reserved_gb": 0.0},
            {"step": 2, "event": "eval", "eval_loss": 2.7}]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "event", "loss", "learning_rate", "gpu_mem_reserved_gb",
                                                    "eval_loss"])
        writer.writeheader()
        writer.writerows(rows)


def test_four_panels_from_the_metrics_csv(tmp_path):
    _write_csv(tmp_path / "metrics.csv")
    fig = plots.plot_training(tmp_path, tmp_path / "curves.png")  # an output dir holding metrics.csv
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Training: train loss", "Training: validation loss", "Training: learning rate",
                      "Training: GPU memory (GB)"]
    loss_line = fig.axes[0].get_lines()[0]
    assert list(loss_line.get_ydata()) == [3.0, 2.5]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [2]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_live_probe_drawn_beside_the_validation_loss():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.7, "eval_probe/fibonacci": 1.0},
            {"step": 4, "eval_loss": 2.5, "eval_probe/fibonacci": 0.5, "eval_probe_runtime": 1.5}]
    fig = plots.plot_training(rows)
    twin = fig.axes[4]  # the validation panel's second axis
    assert twin.bbox.bounds == fig.axes[1].bbox.bounds
    line = twin.get_lines()[0]
    assert line.get_label() == "probe fibonacci" and list(line.get_ydata()) == [1.0, 0.5]
    assert len(twin.get_lines()) == 1  # eval_probe_runtime is not a probe


def test_missing_metrics_are_said_not_hidden(tmp_path):
    fig = plots.plot_training([{"step": 1, "loss": 2.0}])
    assert "no validation loss logged" in [t.get_text() for t in fig.axes[1].texts]
    try:
        plots.load_metrics(tmp_path)
    except FileNotFoundError as err:
        assert "metrics.csv" in str(err)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_schedule_plot(tmp_path):
    fig = plots.plot_schedule(["chebyshev", "chebyshev_fractal"], 50, peak_lr=1e-3, warmup_steps=5,
                              path=tmp_path / "s.png")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["chebyshev", "chebyshev_fractal", "linear (transformers)"]
    assert max(fig.axes[0].get_lines()[0].get_ydata()) == 1e-3
    assert (tmp_path / "s.png").exists()


def test_frontier_points_carry_the_spread_and_probe_curves_span_the_seeds(tmp_path):
    import pandas as pd

    from llmft.experiments import summarize

    table = pd.DataFrame({"run": ["base", "1 epoch", "1 epoch"], "task": [0.3, 0.5, 0.6], "probe": [1.0, 0.8, 0.7]})
    fig = plots.plot_frontier(summarize(table, ["task", "probe"]), "task", "probe", tmp_path / "f.png",
                              baseline=0.35)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert set(labels) == {"base (n=1)", "1 epoch (n=2)", "majority baseline 0.35"}
    point = ax.containers[1]  # the 1-epoch errorbar: mean with a bar of one sd
    assert list(point.lines[0].get_xydata()[0]) == pytest.approx([0.55, 0.75])
    assert (tmp_path / "f.png").stat().st_size > 10_000
    runs = {}
    for seed, values in ((1, [1.0, 0.8]), (2, [1.0, 0.6])):
        rows = [{"step": s, "eval_loss": 1.0, "eval_probe/fibonacci": v} for s, v in zip((10, 20), values)]
        runs.setdefault("1 epoch", []).append(pd.DataFrame(rows))
    fig = probes.plot_probe_curves(runs, "fibonacci")
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([1.0, 0.7]) and line.get_label() == "1 epoch (n=2)"
