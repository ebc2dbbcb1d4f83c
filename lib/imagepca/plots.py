"""The run's figures: sample inputs, explained variance, 2-D projection, and notebook 03's
confusion matrix and accuracy against k.

Each function draws on a new pyplot figure and returns it, so a notebook cell can show it
with ``%matplot plt`` (sparkmagic's magic, and the lib's equivalent in a local kernel), and
:func:`save_figure` writes it next to the other outputs. Livy's ``%matplot`` shows the
current figure but never closes it, so each new figure closes the ones this module made
before it: a cluster's driver holds one, not one per plot cell run.
"""

from __future__ import annotations

import io
import warnings
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from functools import lru_cache

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure

from .magics import remember_png
from .storage import Storage, join

_FIGURES: weakref.WeakSet = weakref.WeakSet()  # the figures made here and not closed yet
# What matplotlib warns, at each drawing, for each character its fonts lack.
_MISSING_GLYPH = r"Glyph .* missing from"


def _new_figure(figsize: tuple[float, float]) -> Figure:
    for earlier in list(_FIGURES):
        plt.close(earlier)
    fig = plt.figure(figsize=figsize)
    _FIGURES.add(fig)
    return fig


def _lay_out(fig: Figure) -> None:
    """``tight_layout``, once. It leaves the figure a placeholder layout engine, for which
    every ``savefig`` lays the whole figure out once more before drawing it: the same
    pixels, 0.2-0.3 s more for a 60-label confusion matrix or projection."""
    fig.tight_layout()
    with plt.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)  # None, not tight or constrained, whatever the rc says


@contextmanager
def _drawing_labels(labels: Iterable[str]):
    """Draw ``labels`` in matplotlib's font, falling back glyph by glyph to installed fonts
    that have the characters it lacks (Chinese, Japanese, Korean, Thai...: DejaVu Sans has
    none of them). Texts keep the fonts they were made with, so the figure's later drawings
    use them too; and as written: not text between two ``$`` as maths (a label "sale $5
    (50% off) $10" failed the figure)."""
    fallback = _fallback_fonts(tuple(sorted(set(labels))))
    settings = {"font.family": [*plt.rcParams["font.family"], *fallback], "text.parse_math": False}
    with plt.rc_context(settings), _missing_glyphs_said_once():
        yield


@contextmanager
def _missing_glyphs_said_once():
    """Without matplotlib's warning for each character no font has, at every drawing:
    :func:`_fallback_fonts` has said it once, for the labels."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _MISSING_GLYPH, UserWarning)
        yield


@lru_cache(maxsize=32)
def _fallback_fonts(labels: tuple[str, ...]) -> tuple[str, ...]:
    """The families of the installed fonts that draw what matplotlib's default font cannot
    in ``labels``; a label no font can draw gets one warning saying what to install, not
    matplotlib's, one per character at every drawing."""
    default = _characters(font_manager.findfont(font_manager.FontProperties()))
    missing = {char for label in labels for char in label if not char.isspace()} - default
    families: list[str] = []
    # The system's fonts, read afresh: matplotlib's cached list misses fonts installed
    # after it was made.
    for path in sorted(font_manager.findSystemFonts()) if missing else []:
        drawn = missing & _characters(path)
        if drawn:
            font_manager.fontManager.addfont(path)
            families.append(font_manager.FontProperties(fname=path).get_name())
            missing -= drawn
    if missing:
        undrawable = [label for label in labels if missing & set(label)]
        warnings.warn(
            f"{len(undrawable)} label(s) have characters no installed font has, drawn as "
            f"boxes in the figures: {', '.join(undrawable[:3])}. Install a font that has them "
            "(for Chinese, Japanese and Korean, Noto Sans CJK: Debian's and Ubuntu's "
            "fonts-noto-cjk), then restart the kernel.",
            stacklevel=5,  # the plot function's caller (through the context manager)
        )
    return tuple(dict.fromkeys(families))


def _characters(font_path: str) -> set[str]:
    try:
        return {chr(code) for code in ft2font.FT2Font(font_path).get_charmap()}
    except (OSError, RuntimeError):  # not a font FreeType can read
        return set()


def plot_explained_variance(
    explained_variance: Sequence[float], k: int, threshold: float | None
) -> Figure:
    """Variance per component (bars) and cumulative (line), threshold and chosen k marked."""
    explained = np.asarray(explained_variance, dtype=float)
    cumulative = np.cumsum(explained)
    shown = int(min(len(explained), max(2 * k, 30)))
    components = np.arange(1, shown + 1)
    fig = _new_figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    # One filled step outline, not a bar per component: hundreds of bars are hundreds of
    # artists to lay out and draw (0.4-0.6 s of the figure for k = 387).
    ax.stairs(
        explained[:shown], np.arange(shown + 1) + 0.5, fill=True, color="#4c72b0",
        label="per component",
    )  # fmt: skip
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
        title=f"Explained variance ({'' if shown == len(explained) else f'first {shown} of '}"
        f"{len(explained)} components)",
    )
    ax.legend(loc="center right")
    _lay_out(fig)
    return fig


# A label's marker changes with each block of tab20's colours: distinct up to 160 labels.
PROJECTION_COLOURS = 20
PROJECTION_MARKERS = "os^DvPX*"
PROJECTION_LEGEND_MAX = 60  # labels named in the legend (PROJECTION_COLOURS per column)


def plot_projection(points: pd.DataFrame) -> Figure:
    """Scatter of the first two components, one colour and marker per label.

    ``points`` has columns ``label``, ``pc1``, ``pc2`` (null when k = 1: then each label
    gets a row of its own along PC 1).
    """
    labels = sorted(points["label"].unique())
    one_component = bool(points["pc2"].isna().all()) and len(points) > 0
    legend_columns = (
        -(-len(labels) // PROJECTION_COLOURS) if len(labels) <= PROJECTION_LEGEND_MAX else 0
    )
    with _drawing_labels(labels):
        fig = _new_figure(figsize=(7.5 + 2.2 * max(legend_columns - 1, 0), 6))
        ax = fig.add_subplot()
        colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
        for index, (label, group) in enumerate(points.groupby("label", sort=True)):
            y = np.full(len(group), index) if one_component else group["pc2"]
            block, colour = divmod(index, PROJECTION_COLOURS)
            marker = PROJECTION_MARKERS[block % len(PROJECTION_MARKERS)]
            ax.scatter(
                group["pc1"], y, s=12, alpha=0.75, color=colours(colour), marker=marker, label=label
            )
        if one_component:
            ax.set(xlabel="PC 1", title="Images on the first principal component (k = 1)")
            named = labels if len(labels) <= PROJECTION_LEGEND_MAX else []
            ax.set_yticks(range(len(labels)), named, fontsize="small")
            ax.invert_yaxis()
        else:
            ax.set(
                xlabel="PC 1", ylabel="PC 2", title="Images on the first two principal components"
            )
        if legend_columns and not one_component:
            ax.legend(
                fontsize="small" if len(labels) <= 20 else "x-small", markerscale=1.5,
                ncols=legend_columns, bbox_to_anchor=(1.02, 1), loc="upper left",
            )  # fmt: skip
        elif not legend_columns:
            ax.set_title(
                f"{ax.get_title()}\n{len(labels)} labels: too many to name here", fontsize=10
            )
        _lay_out(fig)
    return fig


def plot_samples(samples: Sequence[tuple[str, np.ndarray]], columns: int = 6) -> Figure:
    """A grid of input images (as the model sees them) with their labels.

    The grid is one image (the samples pasted into a white canvas) under one axes, labels
    written on the figure: an axes per sample made matplotlib lay out and draw 36 axes,
    1.5-1.9 s of every run for 36 images, drawn and saved.
    """
    rows = max(1, -(-len(samples) // columns))
    side = max((pixels.shape[0] for _, pixels in samples), default=1)
    label_px, gap_px = side // 7, side // 14  # a label's line above each image, a gap
    cell_w, cell_h = side + gap_px, side + label_px + gap_px
    canvas = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for index, (_, pixels) in enumerate(samples):
        top = (index // columns) * cell_h + label_px
        left = (index % columns) * cell_w + gap_px // 2
        canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels[..., :3]
    title_in = 0.5
    width_in = columns * 1.8
    grid_in = width_in * canvas.shape[0] / canvas.shape[1]
    with _drawing_labels(label for label, _ in samples):
        fig = _new_figure(figsize=(width_in, grid_in + title_in))
        ax = fig.add_axes((0, 0, 1, grid_in / (grid_in + title_in)))
        ax.imshow(canvas, interpolation="antialiased")
        ax.axis("off")
        for index, (label, _) in enumerate(samples):
            x = (index % columns) * cell_w + cell_w / 2
            y = (index // columns) * cell_h + label_px * 0.55
            ax.text(x, y, label, ha="center", va="center", fontsize=9, clip_on=True)
        fig.suptitle("Sample input images", y=1 - 0.08 / (grid_in + title_in), va="top")
    return fig


def save_figure(fig: Figure, storage: Storage, output: str, name: str) -> str:
    """Write ``fig`` as ``OUTPUT/name`` (PNG) through the output's file system."""
    buffer = io.BytesIO()
    # Each figure lays itself out (tight_layout or fixed margins): bbox_inches="tight"
    # would draw it once more to measure it. zlib level 3 here gave smaller files than
    # the default 6 (the samples: 406 against 440 kB), in two thirds of the time.
    with _missing_glyphs_said_once():
        fig.savefig(buffer, format="png", dpi=110, pil_kwargs={"compress_level": 3})
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
    with _drawing_labels(labels):
        fig = _new_figure(figsize=(side + 1.5, side))
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
            xlabel="predicted label",
            ylabel="true label",
            title=title or "Confusion matrix (test set)",
        )
        _lay_out(fig)
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
    if not sweep:
        raise ValueError("no sweep to plot: run clf.k_sweep() (the cell above) first")
    cumulative = np.asarray(cumulative_variance, dtype=float)
    ks = [row["k"] for row in sweep]
    fig = _new_figure(figsize=(9, 4.8))
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
    _lay_out(fig)
    return fig
