"""The report's charts as PNG bytes. matplotlib's object API (``Figure``), not pyplot:
no global state, no display, safe off the main thread; fonts ship with matplotlib."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

BAR = "#4c72b0"
LOW = "#c44e52"
DPI = 100


def plain(text: str) -> str:
    """Text as written: a label holding two ``$`` would be matplotlib mathtext (and fail to
    render, or render as math) unless escaped."""
    return text.replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def label_counts(counts: list[tuple[str, int]]) -> bytes:
    """Horizontal bars, most frequent at the top."""
    fig = Figure(figsize=(6, 0.28 * len(counts) + 1))
    ax = fig.subplots()
    names = [plain(name) for name, _ in counts][::-1]
    values = [count for _, count in counts][::-1]
    ax.barh(names, values, color=BAR)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title(f"Most frequent labels (top {len(counts)})")
    ax.tick_params(axis="y", labelsize=8)
    ax.margins(x=0.12)
    return _png(fig)


def score_histograms(overall: np.ndarray, per_label: list[tuple[str, np.ndarray]]) -> bytes:
    """The top-1 score distribution of every labeled row, then one small panel per label."""
    panels = [("all rows", overall), *per_label]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    edges = np.linspace(0, 1, len(overall) + 1)
    for ax, (title, counts) in zip(axes, panels):
        ax.stairs(counts, edges, fill=True, color=BAR)
        ax.set_title(plain(title), fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Top-1 score distribution")
    fig.supxlabel("score", fontsize=9)
    return _png(fig)


def throughput(progress: list[tuple[float, int]]) -> bytes:
    """Images done over the run and the rate between recorded points."""
    seconds = np.array([p[0] for p in progress], np.float64)
    done = np.array([p[1] for p in progress], np.float64)
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.plot(seconds, done, color=BAR)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("images done", color=BAR)
    if len(seconds) > 1:
        rate = np.diff(done) / np.maximum(np.diff(seconds), 1e-9)
        twin = ax.twinx()
        twin.stairs(rate, seconds, color=LOW, baseline=None)
        twin.set_ylabel("img/s", color=LOW)
    ax.set_title("Throughput over the run")
    return _png(fig)
