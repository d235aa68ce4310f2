"""The figures' content, checked through what they drew (`save_figure` is captured): the training loss
plot's learning-rate panel and integer step ticks, the co-activation heatmap's colour range and blank
cells, the study's loss curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deepmoe import report
from deepmoe.tools import analyze_files, study
from deepmoe.tools.analyze_files import coactivation_colours, plot_coactivation
from deepmoe.tools.routing_metrics import MIN_COUNT, independent_lift

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only


@pytest.fixture
def drawn(monkeypatch):
    """The figures passed to `save_figure` (each written too), in order."""
    figures = []
    original = report.save_figure

    def capture(fig, path):
        figures.append(fig)
        return original(fig, path)

    for module in (report, analyze_files, study):
        monkeypatch.setattr(module, "save_figure", capture)
    return figures


def short_log(steps: int = 9) -> list[dict]:
    return [{"step": s, "loss": 5.0 - 0.1 * s, "lm_loss": 4.8 - 0.1 * s, "lr": 1e-3 * min(s, 3) / 3}
            for s in range(1, steps + 1)]  # fmt: skip


def whole(ticks) -> bool:
    return all(float(t).is_integer() for t in ticks)


def test_loss_plot_has_a_learning_rate_panel_and_integer_steps(tmp_path, drawn):
    log = short_log()
    evals = [{"step": 5, "heldout_loss": 4.5}, {"step": 9, "heldout_loss": 4.2, "final": True}]
    path = report.plot_losses(log, evals, tmp_path / "loss.png", unigram_entropy=4.0)
    assert path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    loss_ax, lr_ax = fig.axes
    assert lr_ax.get_ylabel() == "learning rate"
    (line,) = lr_ax.get_lines()
    assert list(line.get_xdata()) == [r["step"] for r in log]
    assert np.allclose(line.get_ydata(), [r["lr"] for r in log])
    for ax in (loss_ax, lr_ax):
        assert whole(ax.get_xticks()), ax.get_xticks()
    assert any("final" in text.get_text() for text in loss_ax.get_legend().get_texts())


def coactivation_layer() -> dict:
    """4 experts, top-2: 0 and 1 often together, 3 near-dead (chosen twice, with expert 0: lift 50)."""
    tokens = 100
    matrix = [[52, 40, 10, 2], [40, 50, 10, 0], [10, 10, 96, 0], [2, 0, 0, 2]]
    return {"coactivation": {"matrix": matrix, "independent_lift": independent_lift(4, 2)}, "tokens": tokens}


def test_coactivation_colours_are_clipped_and_rare_pairs_blank(tmp_path, drawn):
    layer = coactivation_layer()
    values, low, high = coactivation_colours(layer)
    assert np.isnan(values[0, 3]) and np.isnan(values[3, 0])  # seen twice < MIN_COUNT: blank, not lift 50
    assert all(np.isnan(values[i, i]) for i in range(4))
    assert np.isfinite(values[0, 1]) and math.isfinite(low) and math.isfinite(high)
    centre = math.log2(independent_lift(4, 2))
    assert math.isclose((low + high) / 2, centre) and high - centre >= 1.0
    assert high < math.log2(50)  # the near-dead expert's pair does not set the scale
    plot_coactivation(layer, "1", tmp_path / "coactivation.png")
    (fig,) = drawn
    (image,) = fig.axes[0].get_images()
    assert image.get_clim() == (low, high)
    title = fig.axes[0].get_title()
    assert f"lift {independent_lift(4, 2):.2f} (uniform random top-K)" in title and f"< {MIN_COUNT} times" in title


def fake_run(directory, final: float, steps: int = 9) -> dict:
    directory.mkdir(parents=True)
    log = [{"step": s, "lm_loss": final + 2.0 / s, "maxvio": [0.5 / s]} for s in range(1, steps + 1)]
    (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    evals = [{"step": 5, "heldout_loss": final + 0.3}, {"step": steps, "heldout_loss": final, "final": True}]
    (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return {"name": directory.name, "heldout_loss": final, "steps": steps, "run_dir": str(directory)}


def test_study_loss_curves_mark_the_final_loss_and_sort_the_legend(tmp_path, drawn):
    finals = [4.1, 3.7, 3.9, 4.4, 3.8, 4.0, 3.6, 4.2]
    rows = [fake_run(tmp_path / f"run{i}", final) for i, final in enumerate(finals)]
    study.plot_curves(rows, "loss", tmp_path / "loss.png")
    study.plot_curves(rows, "maxvio", tmp_path / "maxvio.png")
    loss_fig, maxvio_fig = drawn
    (ax,) = loss_fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{r['name']} ({r['heldout_loss']:.3f})" for r in sorted(rows, key=lambda r: r["heldout_loss"])]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert sorted((float(s.get_xdata()[0]), float(s.get_ydata()[0])) for s in stars) == sorted(
        (9.0, final) for final in finals
    )
    curves = [line for line in ax.get_lines() if line.get_label() in labels]
    assert len({(c.get_color(), c.get_linestyle()) for c in curves}) == len(rows)  # no two curves alike
    for fig in (loss_fig, maxvio_fig):
        assert whole(fig.axes[0].get_xticks())
    assert [t.get_text() for t in maxvio_fig.axes[0].get_legend().get_texts()] == labels
