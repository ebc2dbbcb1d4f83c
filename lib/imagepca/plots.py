"""The run's figures: explained variance, 2-D projection, sample inputs.

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
    fig = plt.figure(figsize=(columns * 1.8, rows * 2.0))
    for index, (label, pixels) in enumerate(samples):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(pixels)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle("Sample input images")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, storage: Storage, output: str, name: str) -> str:
    """Write ``fig`` as ``OUTPUT/name`` (PNG) through the output's file system."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    uri = join(output, name)
    storage.write_bytes(uri, buffer.getvalue())
    return uri
