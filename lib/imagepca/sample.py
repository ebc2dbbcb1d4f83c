"""Synthetic Fruits-360-like sample data set.

The project cannot ship third-party photographs, yet the pipeline, the notebooks and
the tests all need a folder-per-class image tree whose classes are visually distinct
enough for MobileNetV2 features + PCA to separate them. This module paints such a tree
with numpy and Pillow only, so it is fast, dependency-light and byte-for-byte
reproducible from a seed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ParameterError
from .fruits import CLASS_NAMES, render

__all__ = ["CLASS_NAMES", "SampleSummary", "write_sample"]

_JPEG_QUALITY = 90
_MIN_SIZE = 32
_MAX_SIZE = 1024  # each image is drawn in memory, supersampled: 2,048 pixels took 2.6 GB


@dataclass(frozen=True)
class SampleSummary:
    """What `write_sample` produced, so callers need not rescan the tree.

    Attributes
    ----------
    root : pathlib.Path
        The output directory (one sub-folder per class).
    class_names : tuple of str
        Class folder names, in generation order.
    counts : tuple of int
        Number of images per class, aligned with `class_names`.
    """

    root: Path
    class_names: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        """Total number of images written."""
        return sum(self.counts)


# ----------------------------------------------------------------------------- public API

_FILE_RE = re.compile(r"^(?P<cls>.+)_(?P<num>\d{3,})\.jpg$")


def _is_sample_tree(root: Path) -> bool:
    """True if `root` holds nothing but (possibly stale) output of this generator."""
    for entry in root.iterdir():
        if not entry.is_dir() or entry.name not in CLASS_NAMES:
            return False
        for f in entry.iterdir():
            m = _FILE_RE.match(f.name)
            if not f.is_file() or m is None or m.group("cls") != entry.name:
                return False
    return True


def write_sample(
    output_dir: str | os.PathLike[str],
    *,
    classes: int = 6,
    per_class: int = 40,
    size: int = 100,
    seed: int = 0,
) -> SampleSummary:
    """Write a deterministic folder-per-class fruit image set for demos and tests.

    Stands in for Fruits-360 (which cannot be redistributed here): each class has its
    own shape, colour and texture, while rotation, scale, position and lighting vary per
    image, so MobileNetV2 features + PCA have real but non-trivial structure to find.
    Files are ``output_dir/<Class>/<Class>_<NNN>.jpg``; one class name contains a space
    to exercise path handling.

    Parameters
    ----------
    output_dir : str or os.PathLike
        Created if missing. An existing non-empty directory is only accepted if it holds
        nothing but a previous sample, which is then replaced (stale files removed), so
        unrelated data can never be clobbered.
    classes : int, default 6
        How many of `CLASS_NAMES` to generate, taken in order.
    per_class : int, default 40
        Images per class.
    size : int, default 100
        Side of the square images in pixels (Fruits-360 uses 100).
    seed : int, default 0
        Same seed gives byte-identical files; each image depends only on
        (seed, class, index), so smaller samples are subsets of larger ones.

    Returns
    -------
    SampleSummary

    Raises
    ------
    ValueError
        If an argument is out of range or `output_dir` holds foreign content.
    """
    n_max = len(CLASS_NAMES)
    for name, value in (
        ("classes", classes),
        ("per_class", per_class),
        ("size", size),
        ("seed", seed),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= classes <= n_max:
        raise ParameterError(f"must be between 1 and {n_max}, got {classes}", "classes")
    if per_class < 1:
        raise ParameterError(f"must be >= 1, got {per_class}", "per_class")
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ParameterError(f"must be from {_MIN_SIZE} to {_MAX_SIZE} pixels, got {size}", "size")
    if seed < 0:
        raise ParameterError(f"must be >= 0, got {seed}", "seed")

    root = Path(output_dir)
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"output_dir {str(root)!r} exists and is not a directory")
        if any(root.iterdir()) and not _is_sample_tree(root):
            raise ValueError(
                f"output_dir {str(root)!r} is not empty and does not contain only a "
                "previous sample; choose an empty or new directory"
            )
    names = CLASS_NAMES[:classes]
    width = max(3, len(str(per_class - 1)))
    wanted: set[Path] = set()
    for ci, name in enumerate(names):
        cdir = root / name
        cdir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = cdir / f"{name}_{i:0{width}d}.jpg"
            render(ci, i, size, seed).save(path, "JPEG", quality=_JPEG_QUALITY)
            wanted.add(path)
    # Remove leftovers of an earlier, larger sample so the tree is exactly this one.
    for cdir in [p for p in root.iterdir() if p.is_dir()]:
        for f in cdir.iterdir():
            if f not in wanted:
                f.unlink()
        if not any(cdir.iterdir()):
            cdir.rmdir()
    return SampleSummary(root=root, class_names=names, counts=(per_class,) * classes)
