"""The run browser's metrics plot: the validation loss beside the training loss."""

from __future__ import annotations

from app.callbacks import metrics_figure


def lines_by_label(figure) -> dict:
    loss_axes = figure.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_axes.get_lines()}


def test_validation_loss_is_plotted_at_its_steps_on_the_loss_axes():
    rows = [{"step": s, "loss": 1.0 / s, "sigma_t": 0.1} for s in range(1, 6)]
    rows[1]["val_loss"], rows[3]["val_loss"], rows[4]["val_loss"] = 0.9, 0.7, 0.65
    lines = lines_by_label(metrics_figure(rows))
    assert lines["validation loss"] == ([2, 4, 5], [0.9, 0.7, 0.65])
    assert lines["loss"][0] == [1, 2, 3, 4, 5]


def test_runs_without_validation_loss_plot_no_such_line():
    lines = lines_by_label(metrics_figure([{"step": 1, "loss": 0.5, "sigma_t": 0.0}]))
    assert set(lines) == {"loss", "smoothed"}
