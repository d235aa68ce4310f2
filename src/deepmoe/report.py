"""Reports and plots, one style for every caller: JSON Lines logs, reports as JSON (NaN and inf as null),
and the figures (`loss.png`: training and held-out loss against the unigram entropy; `expert_load.png`: a
layer × expert heatmap of the held-out load), written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))


def plot_losses(
    log: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    unigram_entropy: float | None = None,
) -> Path:
    """loss.png: training loss, LM loss and held-out loss per step, and the unigram entropy baseline."""
    plt = pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        steps = [r["step"] for r in log]
        if log:
            ax.plot(steps, [r.get("loss") for r in log], lw=1, alpha=0.6, label="train loss (total)")
            ax.plot(steps, [r.get("lm_loss") for r in log], lw=1.2, label="train LM loss")
        periodic = [r for r in evals if not r.get("final") and r.get("heldout_loss") is not None]
        if periodic:
            ax.plot(
                [r["step"] for r in periodic], [r["heldout_loss"] for r in periodic], "o-", ms=3, label="held-out loss"
            )
        final = [r for r in evals if r.get("final") and r.get("heldout_loss") is not None]
        if final:
            ax.plot([final[-1]["step"]], [final[-1]["heldout_loss"]], "*", ms=11, label="held-out loss (full set)")
        if unigram_entropy is not None and math.isfinite(unigram_entropy):
            ax.axhline(unigram_entropy, color="grey", ls="--", lw=1, label=f"unigram entropy {unigram_entropy:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_expert_load(load: Sequence[Sequence[float]], layers: Sequence[int], path: str | os.PathLike) -> Path:
    """expert_load.png: heatmap of each expert's share of its layer's routed slots, relative to uniform
    (1.0 = the mean load), layer × expert; layers with fewer experts (Pyramid-MoE) are blank on the right."""
    plt = pyplot()
    import numpy as np

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * max(1, len(layers))))
    try:
        if load:
            width = max(len(row) for row in load)
            relative = np.full((len(load), width), np.nan)
            for i, row in enumerate(load):
                relative[i, : len(row)] = np.asarray(row, dtype=float) * len(row)
            image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
            fig.colorbar(image, ax=ax, label="load / mean load")
            ax.set_yticks(range(len(layers)), [str(i) for i in layers])
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
        else:
            ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center")
            ax.set_axis_off()
        ax.set_title("Held-out expert load")
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)
