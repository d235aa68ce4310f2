"""Reports and plots, one style for every caller: JSON Lines logs, reports as JSON (NaN and inf as null),
and the figures. Every figure of the library (training, `deepmoe analyze`, `deepmoe study`) is drawn in
`figure` and written by `save_figure`: one backend, one rc style, one resolution, atomic PNG writes. The
training run's own figures are here: `loss.png` (training and held-out loss against the unigram entropy)
and `expert_load.png` (a layer × expert heatmap of the held-out load).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from deepmoe.io.files import atomic_write, write_json

# ---- JSON ---------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file ([] if it does not exist); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write `report` as JSON (NaN/inf as null), atomically (temporary file, fsync, rename)."""
    return write_json(path, _finite(report))


# ---- plots --------------------------------------------------------------------------------------
#
# Every figure of the library goes through here: `figure` opens one in the house style (the Agg backend,
# so no display is needed, and STYLE's rc settings while it is drawn and saved), `save_figure` lays it
# out and writes it as a PNG at DPI, atomically. No other module imports matplotlib.

DPI = 120
"""Resolution of every PNG the library writes."""

STYLE: dict[str, Any] = {
    "savefig.dpi": DPI,
    "legend.fontsize": 8,
    "grid.alpha": 0.3,
    "image.interpolation": "nearest",
}
"""matplotlib rc settings of every figure (on top of matplotlib's defaults; only inside `figure`)."""

SMALL_TICKS = 7
"""Font size of the tick labels of axes that label every expert."""


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported on first use: matplotlib is slow to
    import and only the figures need it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(figsize: tuple[float, float], **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """A (figure, axes) pair of `figsize` inches in the house style (STYLE applies until the block ends,
    so save it inside the block); the figure is closed when the block ends. `subplots`: arguments of
    `plt.subplots` (nrows, sharex, height_ratios...: the axes are then an array)."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=figsize, **subplots)
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def integer_ticks(axis) -> None:
    """Only whole numbers on `axis` (e.g. `ax.xaxis`: steps, no 2.5)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay `fig` out (tight) and write it to `path` as a PNG at DPI, atomically (temporary file, fsync,
    rename)."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        fig.tight_layout()
        return atomic_write(Path(path), lambda f: fig.savefig(f, dpi=DPI, format="png"))


def plot_losses(
    log: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    unigram_entropy: float | None = None,
) -> Path:
    """loss.png: training loss, LM loss and held-out loss per step, and the unigram entropy baseline; below
    it, a small panel of the learning rate per step (log.jsonl's "lr")."""
    with figure((7, 5.2), nrows=2, sharex=True, height_ratios=(3, 1)) as (fig, (ax, lr_ax)):
        steps = [r["step"] for r in log]
        if log:
            ax.plot(steps, [r.get("loss") for r in log], lw=1, alpha=0.6, label="train loss (LM + aux + MTP)")
            ax.plot(steps, [r.get("lm_loss") for r in log], lw=1.2, label="train LM loss")
        periodic = [r for r in evals if not r.get("final") and r.get("heldout_loss") is not None]
        if periodic:
            ax.plot(
                [r["step"] for r in periodic], [r["heldout_loss"] for r in periodic], "o-", ms=3, label="held-out loss"
            )
        final = [r for r in evals if r.get("final") and r.get("heldout_loss") is not None]
        if final:
            ax.plot([final[-1]["step"]], [final[-1]["heldout_loss"]], "*", ms=11, label="held-out loss (final)")
        if unigram_entropy is not None and math.isfinite(unigram_entropy):
            ax.axhline(unigram_entropy, color="grey", ls="--", lw=1, label=f"unigram entropy {unigram_entropy:.2f}")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Loss")
        ax.grid(True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        rates = [(r["step"], r["lr"]) for r in log if r.get("lr") is not None]
        if rates:
            lr_ax.plot(*zip(*rates, strict=True), lw=1.2, color="tab:purple")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lr_ax.set_xlabel("step")
        lr_ax.grid(True)
        integer_ticks(lr_ax.xaxis)
        return save_figure(fig, path)


def plot_expert_load(load: Sequence[Sequence[float]], layers: Sequence[int], path: str | os.PathLike) -> Path:
    """expert_load.png: heatmap of each expert's share of its layer's routed slots, relative to uniform
    (1.0 = the mean load), layer × expert; layers with fewer experts (Pyramid-MoE) are blank on the right."""

    with figure((7, 1.2 + 0.45 * max(1, len(layers)))) as (fig, ax):
        if load:
            width = max(len(row) for row in load)
            relative = np.full((len(load), width), np.nan)
            for i, row in enumerate(load):
                relative[i, : len(row)] = np.asarray(row, dtype=float) * len(row)
            image = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0)
            fig.colorbar(image, ax=ax, label="load / mean load")
            ax.set_yticks(range(len(layers)), [str(i) for i in layers])
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
        else:
            ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center")
            ax.set_axis_off()
        ax.set_title("Held-out expert load")
        return save_figure(fig, path)
