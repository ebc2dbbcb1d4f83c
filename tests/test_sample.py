"""Tests for the synthetic Fruits-360-like sample generator (no TensorFlow, no Spark)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagepca.sample import CLASS_NAMES, SampleSummary, write_sample

SMALL = {"classes": 6, "per_class": 3, "size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    write_sample(tmp_path / "a", seed=7, **SMALL)
    write_sample(tmp_path / "b", seed=7, **SMALL)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a and a == b


def test_different_seed_differs(tmp_path: Path) -> None:
    write_sample(tmp_path / "a", seed=0, **SMALL)
    write_sample(tmp_path / "b", seed=1, **SMALL)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_layout_and_summary(tmp_path: Path) -> None:
    root = tmp_path / "out dir"
    summary = write_sample(root, classes=4, per_class=5, size=40)
    assert isinstance(summary, SampleSummary)
    assert summary.root == root
    assert summary.class_names == CLASS_NAMES[:4]
    assert summary.counts == (5, 5, 5, 5)
    assert summary.total == 20
    assert any(" " in name for name in summary.class_names)
    assert sorted(p.name for p in root.iterdir()) == sorted(summary.class_names)
    for name in summary.class_names:
        got = sorted(p.name for p in (root / name).iterdir())
        assert got == [f"{name}_{i:03d}.jpg" for i in range(5)]
    with pytest.raises(AttributeError):
        summary.total = 3  # type: ignore[misc]


@pytest.mark.parametrize("size", [32, 100])
def test_images_are_rgb_jpegs_of_requested_size(tmp_path: Path, size: int) -> None:
    summary = write_sample(tmp_path, classes=2, per_class=2, size=size)
    paths = list(summary.root.rglob("*.jpg"))
    assert len(paths) == summary.total
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (size, size)


def test_background_is_near_white(tmp_path: Path) -> None:
    write_sample(tmp_path, classes=len(CLASS_NAMES), per_class=2, size=64)
    for p in tmp_path.rglob("*.jpg"):
        corner = np.asarray(Image.open(p), float)[:4, :4]
        assert corner.mean() > 225, p


def test_classes_differ_in_mean_colour(tmp_path: Path) -> None:
    summary = write_sample(tmp_path, classes=len(CLASS_NAMES), per_class=4, size=64)
    means = {
        name: np.mean(
            [
                np.asarray(Image.open(p), float).mean(axis=(0, 1))
                for p in (tmp_path / name).glob("*")
            ],
            axis=0,
        )
        for name in summary.class_names
    }
    for a, b in itertools.combinations(summary.class_names, 2):
        assert np.linalg.norm(means[a] - means[b]) > 4.0, (a, b, means[a], means[b])


def test_smaller_sample_is_subset_of_larger(tmp_path: Path) -> None:
    write_sample(tmp_path / "big", classes=3, per_class=4, size=40)
    write_sample(tmp_path / "small", classes=2, per_class=2, size=40)
    big, small = _files(tmp_path / "big"), _files(tmp_path / "small")
    assert all(big[k] == v for k, v in small.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 0}, f"classes must be between 1 and {len(CLASS_NAMES)}"),
        ({"classes": len(CLASS_NAMES) + 1}, f"classes must be between 1 and {len(CLASS_NAMES)}"),
        ({"per_class": 0}, "per_class must be >= 1"),
        ({"size": 31}, "size must be from 32 to 1024 pixels, got 31"),
        ({"size": 20_000}, "size must be from 32 to 1024 pixels, got 20000"),  # not 36 GiB
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_sample(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_int_arguments_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="per_class must be an int"):
        write_sample(tmp_path, per_class=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="classes must be an int"):
        write_sample(tmp_path, classes=True)  # type: ignore[arg-type]


def test_refuses_foreign_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        write_sample(tmp_path, classes=1, per_class=1, size=32)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / CLASS_NAMES[0]).exists()


def test_refuses_foreign_file_inside_class_folder(tmp_path: Path) -> None:
    write_sample(tmp_path, classes=1, per_class=1, size=32)
    (tmp_path / CLASS_NAMES[0] / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        write_sample(tmp_path, classes=1, per_class=1, size=32)


def test_refuses_file_as_output_dir(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_sample(target, classes=1, per_class=1, size=32)


def test_overwrites_previous_sample_exactly(tmp_path: Path) -> None:
    write_sample(tmp_path / "ref", classes=2, per_class=2, size=40)
    write_sample(tmp_path / "out", classes=3, per_class=4, size=40)
    summary = write_sample(tmp_path / "out", classes=2, per_class=2, size=40)
    assert summary.total == 4
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_the_command_names_its_options(tmp_path: Path, capsys) -> None:
    from imagepca.cli import main

    assert main(["sample", str(tmp_path / "out"), "--per-class", "0"]) == 2
    assert capsys.readouterr().err == "error: --per-class must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()
