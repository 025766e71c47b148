"""Matplotlib figure builders for the analysis tools, and atomic PNG writing.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), with a
fixed size and dpi, so a PNG's pixel size is ``figsize * dpi`` whatever the content. Every drawn set of
levels carries a ``gid`` so that tests can read back exactly what was plotted.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

from ahcq.data.coco_io import atomic_write_bytes

__all__ = [
    "DPI",
    "LevelPanel",
    "LevelSet",
    "MaskPanel",
    "cag_channel_figure",
    "level_figure",
    "mask_overlay_figure",
    "save_png",
]

DPI = 100
BINS = 200
MASK_ALPHA = 0.45


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically (no half-written file on failure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def cag_channel_figure(
    title: str, channels: np.ndarray, values: np.ndarray, cosine: np.ndarray, samples: int
) -> Figure:
    """(a) per-channel activation distribution, whiskers at the min and max; (b) per-channel cosine
    similarity of the per-sample optimal (scale, zero point) over every pair of samples.

    ``values`` is ``[rows, len(channels)]``, ``cosine`` is ``[len(channels), pairs]``.
    """
    fig = Figure(figsize=(12, 7), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1)
    box = {"positions": channels, "whis": (0, 100), "showfliers": False, "widths": 0.6,
           "manage_ticks": False}
    top.boxplot(values, **box)
    top.set(ylabel="activation", title="(a) range per channel (box: quartiles, whiskers: min and max)")
    bottom.boxplot(cosine.T, **box)
    low = min(0.9, float(cosine.min())) - 0.01
    bottom.set(xlabel="channel", ylabel="cosine similarity", ylim=(low, 1.01),
               title=f"(b) optimal (scale, zero point) cosine similarity over {samples} samples, pairwise")
    for ax in (top, bottom):
        ax.set_xlim(channels[0] - 1, channels[-1] + 1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig


@dataclass
class LevelSet:
    """Quantization levels (or a single marked value) drawn as vertical lines; ``key`` becomes the gid."""

    key: str
    label: str
    levels: np.ndarray
    color: str
    style: str = "-"


@dataclass
class LevelPanel:
    """One histogram with the level sets of one or more quantizers on top of it."""

    title: str
    values: np.ndarray
    level_sets: list[LevelSet] = field(default_factory=list)
    log_x: bool = False


def _histogram(ax, values: np.ndarray, log_x: bool) -> str:
    """Log-y histogram (log-spaced bins on a log-x axis); returns a note on values a log axis cannot show."""
    note = ""
    if log_x:
        positive = values[values > 0]
        if positive.size == 0:
            raise ValueError("no positive values to draw on a log-x axis")
        if positive.size < values.size:
            note = f" ({values.size - positive.size} values <= 0 not shown)"
        bins = np.geomspace(positive.min(), positive.max(), BINS + 1)
        ax.hist(positive, bins=bins, color="0.6")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.hist(values, bins=BINS, color="0.6")
    ax.set_yscale("log")
    return note


def level_figure(panels: list[list[LevelPanel]]) -> Figure:
    """A grid of histograms (``panels[row][col]``) with quantization levels as vertical lines."""
    rows, cols = len(panels), len(panels[0])
    fig = Figure(figsize=(6 * cols, 4 * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, ax_row in zip(panels, axes):
        for panel, ax in zip(row, ax_row):
            note = _histogram(ax, panel.values, panel.log_x)
            for s in panel.level_sets:
                shown = s.levels[s.levels > 0] if panel.log_x else s.levels
                hidden = s.levels.size - shown.size
                label = f"{s.label} ({s.levels.size}" + (f", {hidden} at <= 0 not shown)" if hidden else ")")
                lines = ax.vlines(shown, 0, 1, transform=ax.get_xaxis_transform(), colors=s.color,
                                  linestyles=s.style, linewidth=0.9, label=label)
                lines.set_gid(s.key)
            ax.set_title(panel.title + note, fontsize=10)
            ax.set(xlabel="value", ylabel="count")
            ax.legend(fontsize=8, loc="upper right")
    return fig


@dataclass
class MaskPanel:
    """One model's masks for the boxes of one image, with one score per box for the title."""

    label: str
    masks: np.ndarray
    scores: list[str]


def _overlay(image: np.ndarray, masks: np.ndarray, colors: np.ndarray) -> np.ndarray:
    out = image.astype(np.float64) / 255.0
    for mask, color in zip(masks, colors):
        out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * color[:3]
    return out


def mask_overlay_figure(rows: list[tuple[np.ndarray, np.ndarray, list[MaskPanel]]]) -> Figure:
    """Per image (``(image, boxes, panels)``) a row of panels: the image, each box's mask filled and outlined
    in its own colour (masks may overlap) and the GT box prompts as rectangles, with the panel's per-box
    scores in its title."""
    cols = max(len(panels) for _, _, panels in rows)
    fig = Figure(figsize=(5 * cols, 5 * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for (image, boxes, panels), ax_row in zip(rows, axes):
        colors = colormaps["tab10"](np.arange(len(boxes)) % 10)
        for panel, ax in zip(panels, ax_row):
            ax.imshow(_overlay(image, panel.masks, colors))
            for mask, color in zip(panel.masks, colors):
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.0)
            for (x0, y0, x1, y1), color in zip(boxes, colors):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.5))
            ax.set_title(f"{panel.label}\n" + " ".join(panel.scores), fontsize=9)
            ax.set_axis_off()
        for ax in ax_row[len(panels):]:
            ax.set_axis_off()
    return fig

