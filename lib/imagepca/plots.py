"""The run's figures: sample inputs, explained variance, 2-D projection, and notebook 03's
confusion matrix and accuracy against k.

Each function draws on a new pyplot figure and returns it, so a notebook cell can show it
with ``%matplot plt`` (sparkmagic's magic, and the lib's equivalent in a local kernel), and
:func:`save_figure` writes it next to the other outputs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .magics import remember_png
from .storage import Storage, join


def plot_explained_variance(
    explained_variance: Sequence[float], k: int, threshold: float | None
) -> Figure:
    """Variance per component (bars) and cumulative (line), threshold and chosen k marked."""
    explained = np.asarray(explained_variance, dtype=float)
    cumulative = np.cumsum(explained)
    shown = int(min(len(explained), max(2 * k, 30)))
    components = np.arange(1, shown + 1)
    fig = plt.figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    ax.bar(components, explained[:shown], color="#4c72b0", label="per component")
    ax.step(components, cumulative[:shown], where="mid", color="#dd8452", label="cumulative")
    if threshold is not None:
        ax.axhline(threshold, color="#55a868", linestyle="--", label=f"threshold {threshold:g}")
    ax.axvline(k, color="#c44e52", linestyle=":", label=f"k = {k}")
    ax.annotate(
        f"k = {k}: {cumulative[k - 1]:.1%}",
        xy=(k, cumulative[k - 1]),
        xytext=(8, -18),
        textcoords="offset points",
    )
    ax.set(
        xlabel="principal component",
        ylabel="explained variance ratio",
        ylim=(0, 1.02),
        title=f"Explained variance (first {shown} of {len(explained)} components)",
    )
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig


def plot_projection(points: pd.DataFrame) -> Figure:
    """Scatter of the first two components, one colour per label.

    ``points`` has columns ``label``, ``pc1``, ``pc2``.
    """
    fig = plt.figure(figsize=(7.5, 6))
    ax = fig.add_subplot()
    labels = sorted(points["label"].unique())
    colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    for index, label in enumerate(labels):
        group = points[points["label"] == label]
        ax.scatter(
            group["pc1"], group["pc2"], s=12, alpha=0.75, color=colours(index % 20), label=label
        )
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Images on the first two principal components")
    if len(labels) <= 20:
        ax.legend(fontsize="small", markerscale=1.5, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_samples(samples: Sequence[tuple[str, np.ndarray]], columns: int = 6) -> Figure:
    """A grid of input images (as the model sees them) with their labels."""
    rows = max(1, -(-len(samples) // columns))
    height = rows * 2.0 + 0.6
    fig = plt.figure(figsize=(columns * 1.8, height))
    # Fixed spacing (inches: 0.6 for the title and the first labels, a label's line above
    # each image) instead of tight_layout, which draws the whole grid once more to measure
    # it: 1.8-2.2 -> 1.3-1.5 s for 36 images, drawn and saved.
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height, wspace=0.05, hspace=0.2
    )
    for index, (label, pixels) in enumerate(samples):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(pixels)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle("Sample input images", y=1 - 0.1 / height, va="top")
    return fig


def save_figure(fig: Figure, storage: Storage, output: str, name: str) -> str:
    """Write ``fig`` as ``OUTPUT/name`` (PNG) through the output's file system."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    uri = join(output, name)
    storage.write_bytes(uri, buffer.getvalue())
    remember_png(fig, buffer.getvalue())  # %matplot then shows this file, not a new drawing
    return uri


# -- notebook 03 -------------------------------------------------------------------------


def plot_confusion_matrix(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str = ""
) -> Figure:
    """Test-set confusion matrix: rows true labels, columns predictions, counts written in.

    Colours are row-normalized (recall per class), so small classes read as clearly as
    large ones.
    """
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(labels)
    side = min(16.0, 3.0 + 0.55 * n)
    fig = plt.figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if shares[i, j] > 0.6 else "black",
                    )
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=9 if n <= 20 else 6)
    ax.set_yticks(ticks, labels, fontsize=9 if n <= 20 else 6)
    ax.set(
        xlabel="predicted label", ylabel="true label", title=title or "Confusion matrix (test set)"
    )
    fig.tight_layout()
    return fig


def _readable_ticks(ks: Sequence[int], k: int) -> list[int]:
    """The sweep's k values as log-scale ticks, without labels printed over each other."""
    ticks: list[int] = []
    for value in sorted(set(ks)):
        if ticks and value / ticks[-1] < 1.25:
            if value == k:
                ticks[-1] = value  # the chosen k wins over a neighbour
            continue
        ticks.append(value)
    return ticks


def plot_k_sweep(
    sweep: Sequence[dict],
    cumulative_variance: Sequence[float],
    k: int,
    full_accuracy: float | None = None,
) -> Figure:
    """Test accuracy and macro F1 against k, over the cumulative explained variance.

    Shows what the variance threshold costs: where the accuracy curve flattens, more
    components buy variance but no accuracy.
    """
    cumulative = np.asarray(cumulative_variance, dtype=float)
    ks = [row["k"] for row in sweep]
    fig = plt.figure(figsize=(9, 4.8))
    ax = fig.add_subplot()
    components = np.arange(1, len(cumulative) + 1)
    ax.plot(components, cumulative, color="#dd8452", label="cumulative explained variance")
    ax.plot(ks, [row["accuracy"] for row in sweep], "o-", color="#4c72b0", label="test accuracy")
    ax.plot(ks, [row["f1_macro"] for row in sweep], "s--", color="#55a868", label="test macro F1")
    if full_accuracy is not None:
        ax.axhline(
            full_accuracy,
            color="#8172b2",
            linestyle=":",
            label=f"accuracy on all features ({full_accuracy:.3f})",
        )
    ax.axvline(k, color="#c44e52", linestyle=":", label=f"chosen k = {k} ({cumulative[k - 1]:.1%})")
    ax.set_xscale("log")
    ticks = _readable_ticks(ks, k)
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set(
        xlabel="k (principal components kept, log scale)",
        ylabel="fraction",
        ylim=(0, 1.02),
        xlim=(max(0.8, min(ks) * 0.8), len(cumulative) * 1.1),
        title="Accuracy against k, next to the explained variance",
    )
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
