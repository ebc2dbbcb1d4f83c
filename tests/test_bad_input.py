"""A folder mixing real photos with broken files: nothing lost, nothing crashes."""

from __future__ import annotations

import io
import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca.config import ExtractParams
from imagepca.pipeline import extract_features


def _png_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144 Mpx, a few KB
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "input"
    valid = []
    for label in ("apple", "banana", "orange"):
        (root / label).mkdir(parents=True)
        for photo in sorted((FRUIT_PHOTOS / label).iterdir())[:4]:
            target = root / label / photo.name.replace(".jpg", " é.JPG")  # odd names too
            shutil.copyfile(photo, target)
            valid.append(target)
    good_jpeg = valid[0].read_bytes()
    broken = {
        "apple/empty.jpg": (b"", "empty file"),
        "apple/truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "corrupt image"),
        "banana/text.jpg": (b"not an image at all\n", "not an image"),
        "banana/archive.png": (b"PK\x03\x04" + b"\x00" * 200, "not an image"),
        "orange/bomb.png": (_png_bomb(), "decompression bomb"),
    }
    for name, (data, _) in broken.items():
        (root / name).write_bytes(data)
    (root / "orange" / "readme.txt").write_text("not an image file: ignored")
    return root, valid, {str(root / name): kind for name, (_, kind) in broken.items()}


def test_valid_images_featurized_bad_ones_rejected_with_reasons(spark, mixed_input, tmp_path):
    root, valid, broken = mixed_input
    output = tmp_path / "out"
    extraction = extract_features(
        spark, ExtractParams(input=str(root), output=str(output), weights=str(WEIGHTS))
    )
    features = pd.read_parquet(output / "features")
    rejected = pd.read_parquet(output / "rejected")

    def local(path: str) -> str:
        return path.removeprefix("file:")

    assert sorted(map(local, features["path"])) == sorted(map(str, valid))
    reasons = zip(rejected["path"], rejected["reason"], strict=True)
    assert {local(path): reason.split(":")[0] for path, reason in reasons} == broken
    assert extraction.n_images == len(valid) and extraction.n_rejected == len(broken)
    assert extraction.metadata["n_files_found"] == len(valid) + len(broken)
    assert extraction.metadata["rejected_by_kind"] == {
        "corrupt image": 1,
        "decompression bomb": 1,
        "empty file": 1,
        "not an image": 2,
    }
    assert "readme.txt" not in " ".join(rejected["path"])
