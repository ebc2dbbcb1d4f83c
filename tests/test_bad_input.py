"""A folder mixing real photos with broken files: nothing lost, nothing crashes."""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca import pipeline, rejects
from imagepca.config import ExtractParams
from imagepca.images import CONTENT_BATCH_BYTES, ImageDecodeError, content_batch_rows, decode_image
from imagepca.inputs import list_folder
from imagepca.listing import SAMPLE_MAX_BYTES
from imagepca.pipeline import extract_features
from imagepca.rejects import Outcomes
from imagepca.session import ARROW_BATCH_KEY


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
    # The empty file is one the scan never returned: the labels were counted in features/.
    assert extraction.metadata["images_per_label"] == {"apple": 4, "banana": 4, "orange": 4}


def test_rejects_observed_by_the_featurization_job_every_file_scanned(spark, mixed_input, tmp_path):
    """Without a file the scan drops, the rejected rows and the counts per label come from
    what the featurization job observed as it wrote features/: no pass over them."""
    root, valid, broken = mixed_input
    copy = tmp_path / "input"
    shutil.copytree(root, copy)
    (copy / "apple" / "empty.jpg").unlink()
    output = tmp_path / "out"
    extraction = extract_features(
        spark, ExtractParams(input=str(copy), output=str(output), weights=str(WEIGHTS))
    )
    features = pd.read_parquet(output / "features")
    rejected = pd.read_parquet(output / "rejected")
    assert extraction.metadata["images_per_label"] == {"apple": 4, "banana": 4, "orange": 4}
    assert features.groupby("label").size().to_dict() == {"apple": 4, "banana": 4, "orange": 4}
    assert sorted(name.rsplit("/", 2)[-2] for name in rejected["path"]) == [
        "apple", "banana", "banana", "orange",
    ]  # fmt: skip
    assert extraction.metadata["rejected_by_kind"] == {
        "corrupt image": 1,
        "decompression bomb": 1,
        "not an image": 2,
    }


def test_featurized_per_label_is_the_listing_less_the_rejects():
    rejects = [
        {"path": "a/1.jpg", "label": "a", "reason": "corrupt image: x"},
        {"path": "b/2.jpg", "label": "b", "reason": "not an image: y"},
    ]
    outcomes = Outcomes(scanned=10, rejects=rejects, sums={}, n_rejected=2)
    assert outcomes.complete and outcomes.n_featurized == 8
    assert outcomes.featurized_per_label({"b": 4, "a": 5, "c": 1}) == {"a": 4, "b": 3, "c": 1}
    assert outcomes.featurized_per_label({"a": 1, "b": 1}) is None  # not what was scanned
    assert outcomes.featurized_per_label({"a": 7, "b": 0, "c": 3}) is None  # b below zero
    # A label left with no featurized image is not one of features/'s labels.
    alone = Outcomes(scanned=3, rejects=rejects[:1], sums={}, n_rejected=1)
    assert alone.featurized_per_label({"a": 1, "c": 2}) == {"c": 2}
    # A rejected row not reported: the listing's counts less the reported ones are not it.
    partial = Outcomes(scanned=10, rejects=rejects[:1], sums={}, n_rejected=2)
    assert not partial.complete and partial.n_featurized == 8
    assert partial.featurized_per_label({"b": 4, "a": 5, "c": 1}) is None


def _observed_outcomes(monkeypatch) -> list[Outcomes]:
    seen: list[Outcomes] = []
    original = Outcomes.observed
    monkeypatch.setattr(
        Outcomes,
        "observed",
        classmethod(lambda cls, metrics: seen.append(original(metrics)) or seen[-1]),
    )
    return seen


def _expected_reason(path: Path, params: ExtractParams) -> str:
    try:
        decode_image(
            path.read_bytes(), params.image_size, fast_decode=params.fast_decode,
            max_pixels=params.max_image_pixels,
        )  # fmt: skip
    except ImageDecodeError as error:
        return str(error)
    raise AssertionError(f"{path} decodes")


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_rejects_the_tasks_do_not_report_are_read_again_on_the_executors(
    spark, mixed_input, tmp_path, monkeypatch, source
):
    """The driver receives at most REPORTED_REJECTS_MAX rejected rows from the featurization
    job (here one per task); the others are found and read again on the executors, once
    (cached), and rejected/ and the counts are what a run reporting every row gives."""
    root, valid, broken = mixed_input
    monkeypatch.setattr(rejects, "REPORTED_REJECTS_MAX", 1)
    observed = _observed_outcomes(monkeypatch)
    cached = []
    returned = pipeline.rejected_files

    def cached_when_returned(*args):
        rejected, by_kind = returned(*args)
        cached.append(rejected.is_cached)
        return rejected, by_kind

    monkeypatch.setattr(pipeline, "rejected_files", cached_when_returned)
    cached_before = spark.sparkContext._jsc.getPersistentRDDs().size()
    output = tmp_path / "out"
    where = {"input": str(root)}
    if source == "manifest":  # read on the executors, the empty file among them
        files = [*map(str, valid), *broken]
        manifest = tmp_path / "images.csv"
        pd.DataFrame({"path": files, "label": [Path(f).parent.name for f in files]}).to_csv(
            manifest, index=False
        )
        where = {"input": None, "manifest": str(manifest)}
    params = ExtractParams(
        **where, output=str(output), weights=str(WEIGHTS), tasks_per_core=1
    )  # fmt: skip
    extraction = extract_features(spark, params)

    (outcomes,) = observed
    # A folder's scan never returns the empty file; a manifest's reading does.
    assert outcomes.n_rejected == (4 if source == "folder" else 5)
    assert len(outcomes.rejects) < 4 and not outcomes.complete  # one row per task
    assert cached == [True]
    rejected = pd.read_parquet(output / "rejected")
    features = pd.read_parquet(output / "features")
    assert sorted(map(_local, features["path"])) == sorted(map(str, valid))
    assert len(rejected) == len(broken)
    by_path = {_local(row.path): row for row in rejected.itertuples()}
    assert sorted(by_path) == sorted(broken)
    for path, kind in broken.items():
        row = by_path[path]
        assert row.label == Path(path).parent.name
        if kind == "empty file":
            assert row.reason == "empty file: 0 bytes"
            continue
        assert row.reason == _expected_reason(Path(path), params)
        if source == "folder":  # what tells an increment the file is unchanged
            assert row.size == Path(path).stat().st_size
            stat = Path(path).stat()
            assert row.modified.timestamp() == pytest.approx(stat.st_mtime, abs=1e-3)
    assert extraction.n_rejected == len(broken) and extraction.n_images == len(valid)
    assert extraction.metadata["rejected_by_kind"] == {
        "corrupt image": 1, "decompression bomb": 1, "empty file": 1, "not an image": 2,
    }  # fmt: skip
    assert extraction.metadata["images_per_label"] == {"apple": 4, "banana": 4, "orange": 4}
    # The rows read again were cached for the count by kind and the write, then released.
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == cached_before


def _local(uri: str) -> str:
    return re.sub(r"^file:(//)?", "", uri)


def test_an_increments_unreported_rejects_are_read_again(spark, mixed_input, tmp_path, monkeypatch):
    """An increment's new rejected files, past what its tasks report, are read again too,
    beside the earlier run's rejected file it keeps: its rejected/ and counts are what
    reporting every row gives."""
    root, valid, broken = mixed_input
    copy = tmp_path / "input"
    shutil.copytree(root, copy)
    kept = copy / "banana" / "text.jpg"  # rejected by the first run, not read again
    moved = {}
    for path in broken:  # the second run finds the other broken files
        if copy / Path(path).relative_to(root) == kept:
            continue
        target = tmp_path / "later" / Path(path).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        moved[copy / Path(path).relative_to(root)] = shutil.move(
            copy / Path(path).relative_to(root), target
        )
    params = ExtractParams(
        input=str(copy), output=str(tmp_path / "out"), weights=str(WEIGHTS), incremental=True,
        tasks_per_core=1,
    )  # fmt: skip
    extract_features(spark, params)
    for back, later in moved.items():
        shutil.move(later, back)
    monkeypatch.setattr(rejects, "REPORTED_REJECTS_MAX", 1)
    observed = _observed_outcomes(monkeypatch)
    increment = extract_features(spark, params)

    assert increment.metadata["incremental"]["featurized"] == 0
    (outcomes,) = observed
    assert outcomes.n_rejected == 3 and not outcomes.complete  # the empty file is not read
    assert increment.metadata["incremental"]["still_rejected"] == 1
    rejected = pd.read_parquet(tmp_path / "out" / "rejected")
    reasons = dict(zip(map(_local, rejected["path"]), rejected["reason"], strict=True))
    assert len(rejected) == len(broken) and sorted(reasons) == sorted(map(str, [*moved, kept]))
    for path in [*moved, kept]:
        if path.stat().st_size:
            assert reasons[str(path)] == _expected_reason(path, params)
    assert increment.metadata["rejected_by_kind"] == {
        "corrupt image": 1, "decompression bomb": 1, "empty file": 1, "not an image": 2,
    }  # fmt: skip
    assert increment.n_images == len(valid)


def test_many_files_no_scan_returned_are_looked_up_on_the_executors(
    spark, mixed_input, tmp_path, monkeypatch
):
    """Past DRIVER_LOOKUPS_MAX files the folder's scan never returned (here past none), the
    driver does not ask for each one after the other: the executors look them up, and the
    reasons are the driver's kinds (empty, larger than binaryFile holds, gone or a folder
    since the listing), for names Spark spells with escapes."""
    root, valid, broken = mixed_input
    copy = tmp_path / "input"
    shutil.copytree(root, copy)
    huge = copy / "banana" / "panorama é+%.tif"
    with huge.open("wb") as file:
        file.truncate(2_200 * 2**20)  # sparse: no disk used
    gone, folder = copy / "orange" / "gone é+%.jpg", copy / "apple" / "a folder now.jpg"
    for path in (gone, folder):
        shutil.copyfile(valid[0], path)
    listed = pipeline.list_inputs

    def list_then_delete(*args):
        listing = listed(*args)
        gone.unlink()
        folder.unlink()
        folder.mkdir()
        return listing

    monkeypatch.setattr(pipeline, "list_inputs", list_then_delete)
    monkeypatch.setattr(rejects, "DRIVER_LOOKUPS_MAX", 0)
    looked_up = []
    monkeypatch.setattr(rejects, "unread_reason", lambda storage, path: looked_up.append(path))
    cached_before = spark.sparkContext._jsc.getPersistentRDDs().size()
    output = tmp_path / "out"
    extraction = extract_features(
        spark, ExtractParams(input=str(copy), output=str(output), weights=str(WEIGHTS))
    )

    assert looked_up == []  # no request from the driver
    rejected = pd.read_parquet(output / "rejected")
    reasons = dict(zip(map(_local, rejected["path"]), rejected["reason"], strict=True))
    empty = str(copy / "apple" / "empty.jpg")
    assert reasons[empty] == "empty file: 0 bytes"
    assert reasons[str(huge)] == (
        "unreadable: 2,306,867,200 bytes, more than the 2,147,483,647 Spark's binaryFile "
        "reader holds as one file"
    )
    assert reasons[str(gone)].startswith("missing: ") and str(gone) in reasons[str(gone)]
    assert reasons[str(folder)].startswith("unreadable: ") and "not a file" in reasons[str(folder)]
    others = {str(copy / Path(path).relative_to(root)): kind for path, kind in broken.items()}
    assert sorted(reasons) == sorted([*others, str(huge), str(gone), str(folder)])
    for path, kind in others.items():
        assert reasons[path].split(":")[0] == kind
    assert extraction.metadata["rejected_by_kind"] == {
        "corrupt image": 1, "decompression bomb": 1, "empty file": 1, "missing": 1,
        "not an image": 2, "unreadable": 2,
    }  # fmt: skip
    assert extraction.n_images == len(valid)
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == cached_before


def test_files_too_large_for_a_batch_or_for_the_scan(spark, tmp_path, monkeypatch):
    """Large files shrink the Arrow batches to what they can carry (Arrow's binary column
    holds 2 GiB: 256 photos of 10 MB failed the job), and a file larger than Spark's
    binaryFile reads is rejected as unreadable, not fatal; reuse and increments treat it
    as the empty files. Sparse files: no disk used."""
    root = tmp_path / "input"
    for label in ("apple", "banana"):
        (root / label).mkdir(parents=True)
        for photo in sorted((FRUIT_PHOTOS / label).iterdir())[:2]:
            shutil.copyfile(photo, root / label / photo.name)
    huge = root / "apple" / "panorama.tif"
    with huge.open("wb") as file:
        file.truncate(2_200 * 2**20)  # more than 2**31 - 1 bytes
    large = [root / "banana" / f"scan{i}.jpg" for i in range(3)]
    for path in large:
        with path.open("wb") as file:
            file.truncate(100 * 2**20)  # zeros: not an image

    listing = list_folder(spark, str(root))
    # Counted, but not among the files the scan reads (as an empty file).
    assert listing.n_files == 8 and listing.files.count() == 7
    assert listing.largest_file == 100 * 2**20
    # Two of the largest files fit in a batch, three do not.
    assert 2 * 100 * 2**20 <= CONTENT_BATCH_BYTES < 3 * 100 * 2**20
    assert content_batch_rows(listing, most=256) == 2
    assert content_batch_rows(list_folder(spark, str(FRUIT_PHOTOS)), most=256) == 256
    # The first look never reads a file that large on the driver.
    shown = [path for paths in listing.label_samples.values() for path in paths]
    assert shown and all((root / p.split("/input/")[1]).stat().st_size <= SAMPLE_MAX_BYTES
                         for p in shown)  # fmt: skip

    batch_rows = []  # what the featurization job runs with
    recorded = pipeline.spark_settings

    def recording(spark, settings):
        batch_rows.append(settings.get(ARROW_BATCH_KEY))
        return recorded(spark, settings)

    monkeypatch.setattr(pipeline, "spark_settings", recording)
    output = tmp_path / "out"
    params = ExtractParams(input=str(root), output=str(output), weights=str(WEIGHTS))
    extraction = extract_features(spark, params)
    assert extraction.n_images == 4 and "2" in batch_rows
    rejected = pd.read_parquet(output / "rejected").set_index("path")["reason"]
    assert rejected[f"file:{huge}"] == (
        "unreadable: 2,306,867,200 bytes, more than the 2,147,483,647 Spark's binaryFile "
        "reader holds as one file"
    )
    assert {rejected[f"file:{path}"].split(":")[0] for path in large} == {"not an image"}
    assert extraction.metadata["rejected_by_kind"] == {"not an image": 3, "unreadable": 1}
    # The same input again: features/ reused; an increment reads nothing.
    reused = extract_features(spark, replace(params, reuse_features=True))
    assert reused.reused and reused.metadata["rejected_by_kind"] == {
        "not an image": 3, "unreadable": 1,
    }  # fmt: skip
    increment = extract_features(spark, replace(params, incremental=True))
    assert increment.metadata["incremental"]["read"] == 0
    assert increment.metadata["incremental"]["still_rejected"] == 3  # the zeros, not read
    assert increment.metadata["rejected_by_kind"] == {"not an image": 3, "unreadable": 1}


def test_manifest_files_without_a_size_are_not_counted_in_the_batch_bound(spark, tmp_path):
    """A manifest may give some sizes and not others: those are left out of the bound."""
    from imagepca.inputs import read_manifest

    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,size\ns3://b/apple/1.jpg,104857600\ns3://b/apple/2.jpg,\ns3://b/pear/3.jpg,\n"
    )
    listing = read_manifest(spark, str(manifest))
    assert listing.largest_file == 100 * 2**20
    assert content_batch_rows(listing, most=256) == 256  # 100 MB and two unknown
    assert content_batch_rows(listing, most=2) == 2
