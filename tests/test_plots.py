"""Figures a reader must be able to read: which points belong to which label."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from imagepca.plots import (  # noqa: E402
    plot_confusion_matrix,
    plot_explained_variance,
    plot_k_sweep,
    plot_projection,
    plot_samples,
    save_figure,
)
from imagepca.storage import Storage  # noqa: E402


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


def figures_with_labels(labels: list[str]) -> list:
    """The confusion matrix, the projection and the samples of three labels."""
    return [
        plot_confusion_matrix(labels, np.eye(3, dtype=int) * 4),
        plot_projection(pd.DataFrame({"label": labels * 2, "pc1": range(6), "pc2": range(6)})),
        plot_samples([(label, np.zeros((16, 16, 3), np.uint8)) for label in labels]),
    ]


def test_labels_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib reads text between two $ as maths: an unbalanced one ("sale $5 (50% off)
    $10") failed notebook 01 with a ParseException, a balanced one came out in italics."""
    labels = ["sale $5 (50% off) $10", "$x^2$", "plain"]
    figures = figures_with_labels(labels)
    for fig in figures:
        fig.savefig(tmp_path / "figure.png", format="png")
    confusion, projection, samples = figures
    texts = [
        *confusion.axes[0].get_yticklabels(),
        *confusion.axes[0].get_xticklabels(),
        *projection.axes[0].get_legend().get_texts(),
        *samples.texts,
        *(text for ax in samples.axes for text in ax.texts),
    ]
    drawn = {text.get_text() for text in texts}
    assert set(labels) <= drawn
    assert not [
        text.get_text() for text in texts if text.get_text() in labels and text.get_parse_math()
    ]


def test_labels_in_scripts_dejavu_sans_lacks_are_drawn_with_an_installed_font(tmp_path):
    """Chinese class folders: matplotlib's DejaVu Sans has none of their characters (boxes,
    and a warning per character at every drawing). `make test` installs a CJK font
    (fonts-wqy-microhei): every figure with labels falls back to it, glyph by glyph."""
    import warnings

    labels = ["苹果", "香蕉", "橙子 blood"]
    figures = figures_with_labels(labels)
    for fig in figures:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Glyph ... missing from font(s)" fails the test
            fig.savefig(tmp_path / "figure.png", format="png")
    ticks = figures[0].axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks] == labels
    assert len(ticks[0].get_fontfamily()) == 2  # matplotlib's own, then the CJK font


def test_labels_no_installed_font_has_get_one_warning(spark, tmp_path):
    """Without a font for a label's script, the figures still draw (boxes), and the user gets
    one warning naming the label and what to install, not one per character and drawing."""
    import warnings

    labels = ["ivy", "\U00010000\U00010001 (Linear B)"]  # a script no font here has
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion = plot_confusion_matrix(labels, [[2, 0], [1, 1]])
        projection = plot_projection(pd.DataFrame({"label": labels, "pc1": [0, 1], "pc2": [1, 0]}))
        for fig, name in ((confusion, "confusion_matrix.png"), (projection, "projection.png")):
            save_figure(fig, Storage(spark), str(tmp_path), name)
    assert [str(w.message).split(":")[0] for w in caught] == [
        "1 label(s) have characters no installed font has, drawn as boxes in the figures"
    ]
    assert labels[1] in str(caught[0].message) and "fonts-noto-cjk" in str(caught[0].message)
    assert caught[0].filename == __file__  # where the figure was asked for
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_saving_a_figure_draws_it_once(spark, tmp_path, monkeypatch):
    """Each figure is laid out as it is made; its save draws it once. ``tight_layout`` left
    a placeholder layout engine, for which ``savefig`` laid the figure out once more before
    drawing it: 0.2-0.3 s of a 60-label confusion matrix or projection, for the same pixels."""
    from matplotlib.figure import Figure

    drawn = []
    draw = Figure.draw
    monkeypatch.setattr(
        Figure, "draw", lambda fig, renderer: drawn.append(fig) or draw(fig, renderer)
    )
    sweep = [{"k": k, "accuracy": 0.8, "f1_macro": 0.7} for k in (2, 5)]
    figures = [
        *figures_with_labels(["apple", "kiwi", "pear"]),
        plot_explained_variance([0.5, 0.3, 0.2], 2, 0.75),
        plot_k_sweep(sweep, [0.5, 0.8, 1.0], 2, 0.9),
    ]
    for index, fig in enumerate(figures):
        save_figure(fig, Storage(spark), str(tmp_path), f"{index}.png")
    assert drawn == figures
