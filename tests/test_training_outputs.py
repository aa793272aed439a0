"""Fast checks of what a training run writes besides weights (no training run)."""


def test_loss_plot_keeps_negative_series_on_a_symlog_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tsa.training.loop import plot_losses

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k)))
    repa = [{"step": step, "loss": 0.2 - 0.1 * step, "diffusion": 0.3, "align": -0.5 - 0.1 * step, "drift": 0.0,
             "predictor": 0.0} for step in (1, 2, 3)]
    plot_losses(repa, tmp_path / "repa.png")
    plot_losses([{**row, "loss": 1.0, "align": 0.5} for row in repa], tmp_path / "positive.png")
    (axis,), (positive,) = figures[0].axes, figures[1].axes
    assert axis.get_yscale() == "symlog" and positive.get_yscale() == "log"
    legend = axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["loss", "diffusion", "align"]
    # The legend sits right of the axes, off the curves; the switched-off terms are named beside it.
    figures[0].canvas.draw()
    legend_box, axes_box = legend.get_window_extent(), axis.get_window_extent()
    assert legend_box.x0 >= axes_box.x1
    assert "Training loss components per optimizer step" in axis.get_title()
    assert [text.get_text() for text in axis.texts] == ["not drawn (0 throughout):\ndrift, predictor"]
    assert (tmp_path / "repa.png").stat().st_size > 10_000
