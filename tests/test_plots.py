"""Figures a reader must be able to read: which points belong to which label."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from imagepca.plots import plot_projection  # noqa: E402


def projection_points(n_labels: int, *, k: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = [f"fruit {i:02d}" for i in range(n_labels) for _ in range(3)]
    return pd.DataFrame(
        {
            "label": labels,
            "pc1": rng.normal(size=len(labels)),
            "pc2": rng.normal(size=len(labels)) if k > 1 else [None] * len(labels),
        }
    )


def test_projection_tells_45_labels_apart():
    """Past tab20's 20 colours, the marker changes: no two labels look alike, and the
    legend names every label."""
    fig = plot_projection(projection_points(45))
    ax = fig.axes[0]
    looks = {
        (to_hex(c.get_facecolor()[0], keep_alpha=False), c.get_paths()[0].vertices.tobytes())
        for c in ax.collections
    }
    assert len(ax.collections) == 45 and len(looks) == 45
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"fruit {i:02d}" for i in range(45)
    ]


def test_projection_with_one_component_draws_no_second_axis():
    """k = 1: reduced/ has no PC 2; each label gets a row along PC 1 instead of a made-up
    PC 2 of zeros."""
    fig = plot_projection(projection_points(3, k=1))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "" and "first principal component" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fruit 00", "fruit 01", "fruit 02"]
    rows = [set(c.get_offsets()[:, 1]) for c in ax.collections]
    assert rows == [{0.0}, {1.0}, {2.0}]


def test_each_new_figure_closes_the_ones_made_before():
    """Livy's %matplot never closes the figure it shows: on a cluster's driver, re-running
    plot cells must not pile figures up (matplotlib warns past 20)."""
    import matplotlib.pyplot as plt

    plt.close("all")
    for _ in range(25):
        plot_projection(projection_points(3))
    assert len(plt.get_fignums()) == 1
    assert plt.gcf().axes[0].get_title().startswith("Images on the first")  # what %matplot shows
