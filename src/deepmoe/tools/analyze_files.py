"""The files of `deepmoe analyze`: `write_analysis(report, out_dir)` writes an `analyze` report as
report.json, CSV tables and PNG plots (drawn in the house style of `deepmoe.report`), and `is_analysis`
recognises a directory it wrote (so an earlier analysis may be replaced, nothing else).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmoe.io.files import atomic_write, claim_directory, visible_entries
from deepmoe.report import SMALL_TICKS, figure, pyplot, save_figure, write_report
from deepmoe.tools.routing_metrics import MIN_COUNT, coactivation_lift, finite


def write_analysis(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write `report` to `out_dir` (created): report.json, layers.csv, load.csv, js.csv,
    specific_experts.csv, coactivation.csv, vocabulary.csv, load_heatmap.png and, per layer L,
    sources_layer_L.png and coactivation_layer_L.png. Every file is written atomically.
    Returns the paths written. A non-empty `out_dir` is refused unless it holds an earlier analysis.
    """
    with claim_directory(out_dir, "routing analysis (deepmoe analyze)", is_analysis) as out:
        out.mkdir(exist_ok=True)
        return _write_analysis(report, out)


_ANALYSIS_FILE = re.compile(r"report\.json|(layers|load|js|specific_experts|coactivation|vocabulary)\.csv"
                            r"|load_heatmap\.png|(sources|coactivation)_layer_\d+\.png")  # fmt: skip


def is_analysis(directory: Path) -> bool:
    """Whether `directory` holds only what `write_analysis` writes, with its report.json."""
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        return False
    names = visible_entries(directory)
    return (
        isinstance(report, dict)
        and {"sources", "layers"} <= report.keys()
        and all(_ANALYSIS_FILE.fullmatch(n) for n in names)
    )


def _write_analysis(report: dict[str, Any], out: Path) -> list[Path]:
    layers = report["layers"]
    names = list(report["sources"])
    written = [write_report(out / "report.json", report)]

    rows = []
    for idx, layer in layers.items():
        best = layer["max_js"]
        rows.append(
            [
                idx,
                layer["routing"],
                layer["tokens"],
                layer["maxvio"],
                layer["cv"],
                layer["entropy"],
                layer["normalized_entropy"],
                layer["effective_experts"],
                len(layer["dead_experts"]),
                " ".join(map(str, layer["dominant_experts"])),
                int(layer["collapse"]["warning"]),
                None if best is None else best["js"],
                "" if best is None else " vs ".join(best["sources"]),
            ]
        )
    header = ["layer", "routing", "tokens", "maxvio", "cv", "entropy", "normalized_entropy", "effective_experts"]
    header += ["dead_experts", "dominant_experts", "collapse", "max_js", "max_js_sources"]
    written.append(_csv(out / "layers.csv", header, rows))

    header = ["layer", "expert", "tokens", "share", "selection_ratio", "average_gate"]
    for name in names:
        header += [f"tokens[{name}]", f"share[{name}]"]
        if len(names) > 1:
            header.append(f"specificity[{name}]")
    rows = []
    for idx, layer in layers.items():
        for i in range(layer["experts"]):
            row = [idx, i, layer["tokens_per_expert"][i], layer["share"][i]]
            row += [layer["selection_ratio"][i], layer["average_gate"][i]]
            for name in names:
                src = layer["sources"][name]
                row += [src["tokens_per_expert"][i], src["share"][i]]
                if len(names) > 1:
                    row.append(layer["specificity"][name][i])
            rows.append(row)
    written.append(_csv(out / "load.csv", header, rows))

    rows = [[idx, *e["sources"], e["js"]] for idx, layer in layers.items() for e in layer["js_divergence"]]
    written.append(_csv(out / "js.csv", ["layer", "source_a", "source_b", "js"], rows))

    rows = []
    for idx, layer in layers.items():
        for name, experts in layer["specific_experts"].items():
            for rank, e in enumerate(experts, 1):
                rows.append([idx, name, rank, e["expert"], e["specificity"], e["share"], e["share_others"]])
    header = ["layer", "source", "rank", "expert", "specificity", "share", "share_others"]
    written.append(_csv(out / "specific_experts.csv", header, rows))

    rows = []
    for idx, layer in layers.items():
        coact = torch.tensor(layer["coactivation"]["matrix"], dtype=torch.long)
        lift = coactivation_lift(coact, layer["tokens"])
        n = coact.shape[0]
        for i in range(n):
            for j in range(i + 1, n):
                rows.append([idx, i, j, int(coact[i, j]), finite(lift[i, j])])
    written.append(_csv(out / "coactivation.csv", ["layer", "expert_i", "expert_j", "count", "lift"], rows))

    rows = []
    for idx, layer in layers.items():
        for i, tokens in enumerate(layer["vocabulary"]):
            for rank, t in enumerate(tokens, 1):
                row = [idx, i, rank, t["token_id"], t["token"], t["occurrences"], t["count"]]
                rows.append(row + [t["p_expert_given_token"], t["lift"]])
    header = ["layer", "expert", "rank", "token_id", "token", "occurrences", "count", "p_expert_given_token", "lift"]
    written.append(_csv(out / "vocabulary.csv", header, rows))

    if layers:
        written.append(plot_load_heatmap(report, out / "load_heatmap.png"))
    for idx, layer in layers.items():
        written.append(plot_source_distribution(layer, idx, out / f"sources_layer_{idx}.png"))
        written.append(plot_coactivation(layer, idx, out / f"coactivation_layer_{idx}.png"))
    return written


# ---- tables and plots ------------------------------------------------------------------------------


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return atomic_write(path, buffer.getvalue())


def plot_load_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Layer × expert heatmap of each expert's load relative to the mean (share · N), all sources."""

    layers = report["layers"]
    names = list(layers)
    with figure((8, 1.4 + 0.45 * max(1, len(names)))) as (fig, ax):
        matrix = np.array([[s or 0.0 for s in layers[n]["share"]] for n in names], dtype=float)
        relative = matrix * matrix.shape[1]
        image = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0)
        fig.colorbar(image, ax=ax, label="load / mean load")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title("Expert load (all sources)")
        return save_figure(fig, path)


def plot_source_distribution(layer: dict[str, Any], idx: str, path: Path) -> Path:
    """One layer: each source's expert shares relative to uniform (share · N), grouped bars."""

    sources = layer["sources"]
    n = layer["experts"]
    with figure((max(6, 0.35 * n + 2), 3.6)) as (fig, ax):
        width = 0.8 / max(1, len(sources))
        x = np.arange(n)
        for s, (name, data) in enumerate(sources.items()):
            shift = (s - (len(sources) - 1) / 2) * width
            ax.bar(x + shift, [(v or 0.0) * n for v in data["share"]], width, label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [str(i) for i in x], fontsize=SMALL_TICKS)
        ax.set_xlabel("expert")
        ax.set_ylabel("load / mean load")
        best = layer.get("max_js")
        title = f"Layer {idx}: routing distribution per source"
        if best:
            title += f" (JS {best['js']:.3f})"
        ax.set_title(title)
        ax.legend()
        return save_figure(fig, path)


def coactivation_colours(layer: dict[str, Any], min_count: int = MIN_COUNT) -> tuple[np.ndarray, float, float]:
    """What `plot_coactivation` colours: the [N, N] log2 lift, NaN on the diagonal and for the pairs seen
    fewer than `min_count` times (their lift is noise: a near-dead expert's pairs reach lift ~100), and the
    colour range (low, high), centred on the lift of uniform random top-K routing (independent_lift, in
    log2) and m wide on each side: the 98th percentile of the other pairs' distance to it (at least 1, a
    factor 2), so that a few extreme pairs do not darken the rest."""
    coact = torch.tensor(layer["coactivation"]["matrix"], dtype=torch.long)
    with np.errstate(divide="ignore"):
        values = np.log2(coactivation_lift(coact, layer["tokens"]).numpy())
    values[coact.numpy() < min_count] = np.nan
    np.fill_diagonal(values, np.nan)
    uniform = layer["coactivation"]["independent_lift"]
    centre = float(np.log2(uniform)) if uniform > 0 else 0.0
    seen = np.abs(values[np.isfinite(values)] - centre)
    half = max(1.0, float(np.percentile(seen, 98))) if seen.size else 1.0
    return values, centre - half, centre + half


def plot_coactivation(layer: dict[str, Any], idx: str, path: Path) -> Path:
    """One layer: the co-activation lift P(i,j)/(P(i)P(j)) on a log2 scale, white at the lift of uniform
    random top-K routing (red: chosen together more often, blue: less often), clipped to a robust range
    (`coactivation_colours`); grey: the diagonal and the pairs seen fewer than MIN_COUNT times."""

    values, low, high = coactivation_colours(layer)
    n = values.shape[0]
    uniform = layer["coactivation"]["independent_lift"]
    with figure((5.6, 4.8)) as (fig, ax):
        cmap = pyplot().get_cmap("RdBu_r").with_extremes(bad="lightgrey")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high)
        fig.colorbar(image, ax=ax, extend="both", label="log2 lift;  lift = P(i,j) / (P(i) P(j))")
        ticks = range(0, n, max(1, n // 16))
        ax.set_xticks(ticks, [str(i) for i in ticks], fontsize=SMALL_TICKS)
        ax.set_yticks(ticks, [str(i) for i in ticks], fontsize=SMALL_TICKS)
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
        ax.set_title(
            f"Layer {idx}: co-activation lift\n"
            f"white: lift {uniform:.2f} (uniform random top-K); grey: pairs seen < {MIN_COUNT} times",
            fontsize=9,
        )
        return save_figure(fig, path)


__all__ = [
    "coactivation_colours",
    "is_analysis",
    "plot_coactivation",
    "plot_load_heatmap",
    "plot_source_distribution",
    "write_analysis",
]
