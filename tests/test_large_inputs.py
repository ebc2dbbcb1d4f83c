"""Issue 16 on real Spark: manifests instead of a listing, and incremental runs that
featurize only what is new, exactly once even when a run is killed."""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cluster import (
    base_conf,
    clean_python,
    local_cluster_master,
    run_driver,
    ship_lib,
    write_driver,
)
from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca import pipeline
from imagepca.config import ExtractParams, ReduceParams
from imagepca.console import increment_line, summary
from imagepca.increments import settled_rejections
from imagepca.inputs import read_manifest
from imagepca.pipeline import MOMENTS_FILE, extract_features, finish_run, reduce_features

LABELS = ("apple", "banana", "orange")


def photos(label: str, start: int, stop: int) -> list[Path]:
    return sorted((FRUIT_PHOTOS / label).glob("*.jpg"))[start:stop]


def features_by_path(output: Path) -> pd.DataFrame:
    frame = pd.read_parquet(output / "features")
    return frame.set_index("path").sort_index()


def spelled(path: Path) -> str:
    """A local file as Spark's ``path`` column spells it."""
    return f"file:{path}"


# -- manifests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_run(spark, tmp_path_factory):
    """A CSV manifest of 12 shared photos spelled three ways, a label column for some rows
    (spaces around some, blank for others), a relative path, a duplicate row and three keys
    that do not exist."""
    work = tmp_path_factory.mktemp("manifest")
    chosen = [p for label in LABELS for p in photos(label, 0, 4)]
    rows = []
    for i, path in enumerate(chosen):
        uri = [path.as_uri(), str(path), spelled(path)][i % 3]  # file:///, /, file:/
        given = [" pomme ", "pomme"][i % 2] if "apple" in path.parent.name else ["", "  "][i % 2]
        rows.append({"path": uri, "label": given})
    (work / "local").mkdir()
    relative = work / "local" / "banana" / "copy.jpg"
    relative.parent.mkdir()
    shutil.copy(photos("banana", 10, 11)[0], relative)
    rows.append({"path": "local/banana/copy.jpg", "label": ""})
    rows.append(rows[0])  # the same URI twice counts once
    rows.append({**rows[3], "label": "another"})  # twice, two labels: the smallest wins
    missing = [spelled(FRUIT_PHOTOS / "apple" / f"gone{i}.jpg") for i in range(3)]
    rows += [{"path": uri, "label": ""} for uri in missing]
    # Not image names (an extension-less object key among them): not read, but counted.
    rows += [{"path": "s3://bucket/objects/ab12cd", "label": ""}, {"path": "a.txt", "label": ""}]
    rows.append({"path": "", "label": "no path"})  # read by Spark as null
    manifest = work / "images.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    output = work / "out"
    extraction = extract_features(
        spark, ExtractParams(manifest=str(manifest), output=str(output), weights=str(WEIGHTS))
    )
    return {
        "output": output,
        "extraction": extraction,
        "chosen": chosen,
        "relative": relative,
        "missing": missing,
    }


def test_manifest_accounts_for_every_uri(manifest_run):
    metadata = manifest_run["extraction"].metadata
    assert metadata["input_kind"] == "manifest"
    assert metadata["n_files_found"] == 12 + 1 + 3
    assert metadata["n_duplicate_uris"] == 2
    assert metadata["not_image_rows_skipped"] == [3, f"file:{manifest_run['output'].parent}/a.txt"]
    warning = manifest_run["extraction"].listing.describe().splitlines()[-1]
    assert warning.startswith("warning: 3 manifest rows skipped: their URIs are empty or do not")
    assert metadata["n_images"] == 13 and metadata["n_rejected"] == 3
    assert metadata["rejected_by_kind"] == {"missing": 3}
    rejected = pd.read_parquet(manifest_run["output"] / "rejected")
    assert sorted(rejected.path) == sorted(manifest_run["missing"])
    assert all(reason.startswith("missing: ") for reason in rejected.reason)


def test_a_relative_manifest_location_reads_relative_entries_beside_it(
    spark, manifest_run, monkeypatch
):
    """``--manifest images.csv`` from the manifest's own folder: a bare file name too."""
    monkeypatch.chdir(manifest_run["output"].parent)
    shuffle_partitions = spark.conf.get("spark.sql.shuffle.partitions")
    listing = read_manifest(spark, "images.csv")
    try:
        paths = {row.path for row in listing.files.select("path").collect()}
        # Cached in one partition, not the session's shuffle partitions (a small
        # manifest's listing took 8 s walking 200); the session's setting is left as it was.
        assert listing.files.rdd.getNumPartitions() == 1 < int(shuffle_partitions)
        assert spark.conf.get("spark.sql.shuffle.partitions") == shuffle_partitions
    finally:
        listing.release()
    assert spelled(manifest_run["relative"]) in paths
    assert all(path.startswith("file:/") for path in paths)
    # The manifest's own location spelled as a URI: its relative rows are the same URIs.
    manifest = manifest_run["output"].parent / "images.csv"
    for spelling in (f"file://{manifest}", f"file:{manifest}"):
        listing = read_manifest(spark, spelling)
        try:
            assert {row.path for row in listing.files.select("path").collect()} == paths
        finally:
            listing.release()


def test_first_look_skips_a_manifest_label_whose_files_are_gone(spark, manifest_run):
    """Notebook 01's sample images: the "apple" label (the folder of the three missing
    URIs) has no file to show; the others do, and featurization rejects the three."""
    from imagepca.images import load_samples

    listing = read_manifest(spark, str(manifest_run["output"].parent / "images.csv"))
    try:
        # Which of the three the first look tries, and how many distinct ones (a seed may
        # pick a file another seed picked), follows from the seeded picks.
        tried = [path for label, path in listing.sample(3) if label == "apple"]
        with pytest.warns(UserWarning) as warned:
            samples = load_samples(spark, listing)
    finally:
        listing.release()
    assert tried and set(tried) <= set(manifest_run["missing"])
    assert {label for label, _ in samples} == {"another", "banana", "orange", "pomme"}
    assert all(pixels.shape == (224, 224, 3) for _, pixels in samples)
    (message,) = [str(w.message) for w in warned]
    assert message.startswith(
        f"{len(tried)} sample image(s) could not be read, featurization will reject"
    )
    assert f"the first: {tried[0]}: FileNotFoundError: " in message


def test_first_look_names_why_a_uri_could_not_be_read(spark, tmp_path):
    """A URI the driver's Hadoop cannot read (here: no file system for its scheme) is left
    out of the first look with the JVM's reason, not py4j's call."""
    from imagepca.images import load_samples

    photo = photos("apple", 0, 1)[0]
    unreachable = "gs://imagepca-no-such-bucket/pear/1.jpg"
    pd.DataFrame({"path": [str(photo), unreachable]}).to_csv(tmp_path / "m.csv", index=False)
    listing = read_manifest(spark, str(tmp_path / "m.csv"))
    try:
        with pytest.warns(UserWarning, match="1 sample image") as warned:
            samples = load_samples(spark, listing)
    finally:
        listing.release()
    assert [label for label, _ in samples] == ["apple"]
    assert f"the first: {unreachable}: UnsupportedFileSystemException: " in str(warned[0].message)


def test_manifest_labels_and_paths(manifest_run):
    features = features_by_path(manifest_run["output"])
    expected = {spelled(p) for p in manifest_run["chosen"]} | {spelled(manifest_run["relative"])}
    assert set(features.index) == expected
    labels = features.label.to_dict()
    for i, path in enumerate(manifest_run["chosen"]):
        want = "pomme" if path.parent.name == "apple" else path.parent.name  # empty: folder
        want = "another" if i == 3 else want  # listed again with that label
        assert labels[spelled(path)] == want
    assert labels[spelled(manifest_run["relative"])] == "banana"
    # This manifest gives no size or modification time: changes are noticed by path only.
    assert features["size"].isna().all() and features["modified"].isna().all()


def test_manifest_features_equal_the_folder_run(manifest_run, photos_run):
    """Bytes read by the executors (pyarrow) give the features Spark's reader gives."""
    features = features_by_path(manifest_run["output"])
    reference = features_by_path(Path(photos_run["output"]))
    paths = [spelled(p) for p in manifest_run["chosen"]]
    np.testing.assert_allclose(
        np.stack(features.loc[paths, "features"]),
        np.stack(reference.loc[paths, "features"]),
        atol=1e-5,
    )


def test_a_manifest_spark_cannot_read_is_named_with_how_it_was_read(spark, tmp_path):
    """Not an AnalysisException: the Parquet reader's job fails on a tab-separated file. The
    message is the JVM exception's first line, not py4j's call and Java's stack."""
    from imagepca.images import InputError

    manifest = tmp_path / "list.tsv"
    manifest.write_text("path\tlabel\n/data/a.jpg\tapple\n")
    with pytest.raises(InputError) as caught:
        read_manifest(spark, str(manifest))
    message = str(caught.value)
    assert message.startswith(f"manifest {str(manifest)!r} cannot be read: SparkException: ")
    assert "any other as Parquet" in message and "\tat " not in message


def test_a_manifest_that_is_an_image_a_folder_or_empty_says_so(spark, tmp_path):
    """Read as Parquet, an image or a folder of images failed with a Spark error naming
    neither; an empty CSV said it had no path column."""
    from imagepca.images import InputError

    image = next(FRUIT_PHOTOS.glob("apple/*.jpg"))
    for given in (image, image.parent):
        with pytest.raises(InputError, match="is an image or a folder.*--input"):
            read_manifest(spark, str(given))
    (tmp_path / "list.csv").write_text("")
    with pytest.raises(InputError, match="is empty: its first line names the columns"):
        read_manifest(spark, str(tmp_path / "list.csv"))
    # A Parquet dataset Spark wrote is a folder too, and a manifest.
    spark.createDataFrame([(str(image),)], "path string").write.parquet(str(tmp_path / "ds"))
    listing = read_manifest(spark, str(tmp_path / "ds"))
    assert listing.n_files == 1
    listing.release()


def test_a_csv_manifest_as_python_pandas_and_excel_write_it(spark, tmp_path):
    """RFC 4180: a quote in a field doubled; a header's names trimmed (``path, label``); a
    time as seconds since 1970 (``find -printf %T@``). A size or time that does not parse
    is refused, naming it: read as null, an incremental run would not see the file change."""
    import csv

    from imagepca.images import InputError

    manifest = tmp_path / "list.csv"
    rows = [
        ["/data/a.jpg", ' 12" apple', "1000", "1764571800.5"],
        ["/data/b q.jpg", "pear", "", ""],
    ]
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", " label", " size", "modified"])
        writer.writerows(rows)
    listing = read_manifest(spark, str(manifest))
    found = {row["path"]: row for row in listing.files.collect()}
    assert found["file:/data/a.jpg"]["label"] == '12" apple'
    assert found["file:/data/a.jpg"]["size"] == 1000
    assert found["file:/data/a.jpg"]["modified"].timestamp() == 1764571800.5
    assert found["file:/data/b q.jpg"]["label"] == "pear"
    assert found["file:/data/b q.jpg"]["modified"] is None
    listing.release()
    for column, value in (("size", "2.5 KB"), ("modified", "12/01/2026 06:50")):
        pd.DataFrame({"path": ["/data/a.jpg"], column: [value]}).to_csv(manifest, index=False)
        with pytest.raises(InputError, match=f"`{column}` column holds '{value}', which is not"):
            read_manifest(spark, str(manifest))


def test_a_windows_path_in_a_manifest_is_rejected_not_fatal(spark, tmp_path):
    """Hadoop cannot make a URI of ``C:\\photos\\1.jpg``: the first look skips it with a
    warning, and featurization rejects it, as any URI it cannot read."""
    from imagepca.images import load_samples

    chosen = [spelled(p) for label in ("apple", "orange") for p in photos(label, 0, 2)]
    manifest = tmp_path / "images.csv"
    windows = ["C:\\photos\\pear\\1.jpg", "D:photo.jpg"]
    pd.DataFrame({"path": [*windows, *chosen]}).to_csv(manifest, index=False)
    output = tmp_path / "out"
    params = ExtractParams(manifest=str(manifest), output=str(output), weights=str(WEIGHTS))
    listing = pipeline.start_extraction(spark, params)
    with pytest.warns(UserWarning, match="could not be read.*C:"):
        samples = load_samples(spark, listing, per_label=3)
    assert len(samples) == 4
    extraction = extract_features(spark, params, listing)
    assert extraction.n_images == 4 and extraction.n_rejected == 2
    rejected = pd.read_parquet(output / "rejected").set_index("path").reason
    for path in windows:
        assert rejected[path].startswith(f"unreadable: {path} is a Windows path")


def test_parquet_manifest_without_labels(spark, tmp_path):
    chosen = [p for label in ("apple", "orange") for p in photos(label, 0, 2)]
    manifest = tmp_path / "images.parquet"
    pd.DataFrame({"path": [spelled(p) for p in chosen]}).to_parquet(manifest)
    extraction = extract_features(
        spark,
        ExtractParams(manifest=str(manifest), output=str(tmp_path / "out"), weights=str(WEIGHTS)),
    )
    assert extraction.metadata["images_per_label"] == {"apple": 2, "orange": 2}
    assert extraction.n_rejected == 0


# -- incremental runs -----------------------------------------------------------------------


def copy_photos(root: Path, files: list[Path]) -> None:
    for path in files:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / path.parent.name / path.name)


def run(spark, input_dir: Path, output: Path, **extract):
    extraction = extract_features(
        spark,
        ExtractParams(input=str(input_dir), output=str(output), weights=str(WEIGHTS), **extract),
    )
    reduction = reduce_features(spark, ReduceParams(output=str(output), k=5))
    finish_run(spark, str(output), reduction.metrics)
    return extraction, reduction


@pytest.fixture(scope="module")
def incremental(spark, tmp_path_factory):
    """30 photos, then 20 added and 5 removed: an incremental run, and a fresh full run of
    the final folder to compare it with."""
    work = tmp_path_factory.mktemp("incremental")
    root = work / "input"
    copy_photos(root, [p for label in LABELS for p in photos(label, 0, 10)])
    output = work / "out"
    first, _ = run(spark, root, output, incremental=True)
    first_parts = {p: p.stat().st_mtime_ns for p in (output / "features").rglob("*.parquet")}

    added = [p for label in LABELS for p in photos(label, 10, 16)] + photos("mixed", 0, 2)
    copy_photos(root, added)
    removed = [root / "apple" / p.name for p in photos("apple", 0, 3)]
    removed += [root / "orange" / p.name for p in photos("orange", 5, 7)]
    for path in removed:
        path.unlink()
    # With --reuse-features too (refused: the files changed), as a user may well ask.
    second, second_reduction = run(spark, root, output, incremental=True, reuse_features=True)
    fresh_out = work / "fresh"
    fresh, fresh_reduction = run(spark, root, fresh_out)
    return locals()


def test_first_incremental_run_is_a_full_run(incremental):
    increment = incremental["first"].metadata["incremental"]
    assert increment["full_run_because"] == "no features in the output yet"
    assert increment["featurized"] == 30


def test_incremental_run_featurizes_only_new_files(incremental):
    increment = incremental["second"].metadata["incremental"]
    assert increment["featurized"] == 20
    assert increment["dropped"] == 5
    assert increment["kept"] == 25
    assert len(incremental["second"].metadata["batches"]) == 2
    # What `imagepca run` prints after the run (from metrics.json, as the CLI reads it).
    metrics = json.loads((incremental["output"] / "metrics.json").read_text())
    printed = summary(metrics, str(incremental["output"]))
    assert (
        "incremental: 20 new or changed images featurized, 25 kept, 5 dropped (of files gone "
        "or changed)" in printed
    )
    # The refused reuse is not reported as a second featurization of everything.
    assert metrics["reuse_refused"] is None and "not reused" not in printed
    first = summary({**metrics, "incremental": incremental["first"].metadata["incremental"]}, "o")
    assert "incremental: a full run, because no features in the output yet" in first


def test_only_a_full_run_keeps_the_pca_statistics_of_its_featurization(incremental):
    """An increment's featurization sees only the new rows: its fit makes a pass over all
    of features/, and the first run's statistics file, now stale, is gone."""
    assert incremental["first"].metadata["moments_file"] == MOMENTS_FILE
    assert incremental["second"].metadata["moments_file"] is None
    assert not (incremental["output"] / "features" / MOMENTS_FILE).exists()
    assert incremental["second_reduction"].metrics["pca_statistics"] == "pass over features/"
    assert incremental["fresh_reduction"].metrics["pca_statistics"] == "featurization"


def test_an_incremental_run_with_nothing_new_adds_no_batch(spark, tmp_path):
    copy_photos(
        tmp_path / "input", [p for label in ("apple", "banana") for p in photos(label, 0, 2)]
    )
    (tmp_path / "input" / "apple" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    params = ExtractParams(
        input=str(tmp_path / "input"),
        output=str(tmp_path / "out"),
        weights=str(WEIGHTS),
        incremental=True,
        max_rejected_fraction=1.0,
    )
    first = extract_features(spark, params)
    assert first.n_rejected == 1 and first.metadata["images_per_s"] > 0
    files = sorted((tmp_path / "out" / "features").rglob("*"))
    again = extract_features(spark, params)
    assert again.metadata["incremental"] == {
        "featurized": 0,
        "read": 0,
        "kept": 4,
        "dropped": 0,
        "rewritten_part_files": 0,
        "still_rejected": 1,
        "batch": None,
    }
    assert (
        again.metadata["batches"] == first.metadata["batches"]
        and len(first.metadata["batches"]) == 1
    )
    assert sorted((tmp_path / "out" / "features").rglob("*")) == files
    assert again.n_images == 4
    # The truncated file is still rejected, for the first run's reason, without being read
    # again; nothing was featurized: no rate.
    assert again.n_rejected == 1 and again.metadata["images_per_s"] is None
    assert again.metadata["rejected_by_kind"] == first.metadata["rejected_by_kind"]
    rejected = pd.read_parquet(tmp_path / "out" / "rejected")
    assert list(rejected.path) == [spelled(tmp_path / "input" / "apple" / "truncated.jpg")]
    assert again.summary().endswith(" s, no image featurized")
    # The first run's statistics still describe features/: notebook 02 needs no pass over it.
    assert again.metadata["moments_file"] == first.metadata["moments_file"] == MOMENTS_FILE
    reduction = reduce_features(spark, ReduceParams(output=params.output, k=2))
    assert reduction.metrics["pca_statistics"] == "featurization"
    printed = summary(reduction.metrics, params.output)
    assert " s in stages, no image featurized\n" in printed
    assert "0 dropped (of files gone or changed), 1 rejected before and unchanged" in printed


def test_an_increment_reads_a_rejected_file_again_only_when_it_may_differ(spark, tmp_path):
    """A file rejected for its bytes is kept rejected while unchanged; rewritten, it is
    read again. A manifest's missing key is tried again by every increment (it may have
    been uploaded since), and a row without size or time cannot be seen to be unchanged."""
    root = tmp_path / "input"
    copy_photos(root, [p for label in ("apple", "banana") for p in photos(label, 0, 2)])
    bad = root / "apple" / "bad.jpg"
    bad.write_bytes(b"not a picture at all")
    output = tmp_path / "out"
    params = dict(
        input=str(root), output=str(output), weights=str(WEIGHTS), incremental=True,
        max_rejected_fraction=1.0,
    )  # fmt: skip
    first = extract_features(spark, ExtractParams(**params))
    rejected = pd.read_parquet(output / "rejected").iloc[0]
    assert rejected.reason.startswith("not an image")
    # What tells the next increment the file is unchanged.
    assert (rejected.label, rejected["size"]) == ("apple", bad.stat().st_size)
    assert rejected.modified == pd.Timestamp(bad.stat().st_mtime_ns // 1_000_000, unit="ms")
    assert first.metadata["incremental"]["featurized"] == 4

    shutil.copy(photos("apple", 5, 6)[0], bad)  # the same name, now a photo
    again = extract_features(spark, ExtractParams(**params))
    increment = again.metadata["incremental"]
    assert (increment["read"], increment["featurized"], increment["still_rejected"]) == (1, 1, 0)
    assert (again.n_images, again.n_rejected) == (5, 0)
    assert pd.read_parquet(output / "rejected").empty

    # A manifest: one key missing, one file without size or time, one corrupt file with both.
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    stat = corrupt.stat()
    gone = tmp_path / "apple" / "gone.jpg"
    manifest = tmp_path / "images.csv"
    rows = [
        (str(photos("apple", 0, 1)[0]), None, None),
        (str(gone), None, None),
        (str(corrupt), stat.st_size, stat.st_mtime),
    ]
    table = pd.DataFrame(rows, columns=["path", "size", "modified"]).assign(label="apple")
    table.to_csv(manifest, index=False)
    from_manifest = dict(params, input=None, manifest=str(manifest), output=str(tmp_path / "m"))
    extract_features(spark, ExtractParams(**from_manifest))
    gone.parent.mkdir()
    shutil.copy(photos("apple", 1, 2)[0], gone)  # uploaded since
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short too")
    table.loc[len(table)] = {"path": str(tmp_path / "cut.jpg"), "label": "apple"}
    table.to_csv(manifest, index=False)
    again = extract_features(spark, ExtractParams(**from_manifest))
    increment = again.metadata["incremental"]
    assert (increment["read"], increment["featurized"], increment["still_rejected"]) == (2, 1, 1)
    assert increment_line(increment) == (
        "incremental: 1 new or changed images featurized of 2 files read, 1 kept, 0 dropped "
        "(of files gone or changed), 1 rejected before and unchanged (not read)"
    )
    assert again.metadata["rejected_by_kind"] == {"corrupt image": 2}
    rejected = pd.read_parquet(tmp_path / "m" / "rejected")
    assert sorted(Path(p).name for p in rejected.path) == ["corrupt.jpg", "cut.jpg"]


def test_rejections_an_increment_cannot_tell_unchanged_are_read_again(spark, tmp_path):
    """No rejected/, one written before it kept size and time, or one of another Pillow:
    every file not in features/ is read. A row twice counts once."""
    counted = {
        "rejected_by_kind": {"corrupt image": 1},
        "versions": {"pillow": metadata.version("pillow")},
    }
    assert settled_rejections(spark, str(tmp_path / "rejected"), counted) is None
    row = {"path": "file:/a/b.jpg", "reason": "corrupt image: cut"}
    pd.DataFrame([row]).to_parquet(tmp_path / "old.parquet")
    assert settled_rejections(spark, str(tmp_path / "old.parquet"), counted) is None
    full_row = {**row, "label": "a", "size": 10, "modified": pd.Timestamp("2026-12-01")}
    pd.DataFrame([full_row, full_row]).to_parquet(
        tmp_path / "twice.parquet",
        coerce_timestamps="us",  # what Spark reads
    )
    assert settled_rejections(spark, str(tmp_path / "twice.parquet"), counted).count() == 1
    other_pillow = {**counted, "versions": {"pillow": "9.0.0"}}
    assert settled_rejections(spark, str(tmp_path / "twice.parquet"), other_pillow) is None


def test_a_smaller_image_limit_makes_the_incremental_run_a_full_one(spark, tmp_path):
    """Images kept from a run with a larger ``max_image_pixels`` would pass a limit that now
    rejects them: the increment is refused, and every image is checked again."""
    from PIL import Image

    chosen = [p for label in ("apple", "banana") for p in photos(label, 0, 3)]
    copy_photos(tmp_path / "input", chosen)
    pixels = sorted(Image.open(p).size[0] * Image.open(p).size[1] for p in chosen)
    assert pixels[0] < pixels[-1]  # photos of several sizes
    params = dict(input=str(tmp_path / "input"), output=str(tmp_path / "out"), incremental=True)
    first = extract_features(spark, ExtractParams(**params, weights=str(WEIGHTS)))
    assert first.n_images == 6 and first.n_rejected == 0
    limit = pixels[2]  # the three smallest images pass
    again = extract_features(
        spark, ExtractParams(**params, weights=str(WEIGHTS), max_image_pixels=limit)
    )
    increment = again.metadata["incremental"]
    assert (
        increment["full_run_because"] == "the stored features were made with other max_image_pixels"
    )
    assert (again.n_images, again.n_rejected) == (3, 3)
    assert len(pd.read_parquet(tmp_path / "out" / "features")) == 3


def test_incremental_equals_a_fresh_full_run(incremental):
    features = pd.read_parquet(incremental["output"] / "features")
    assert features.path.is_unique
    fresh = features_by_path(incremental["fresh_out"])
    ours = features.set_index("path").sort_index()
    assert list(ours.index) == list(fresh.index)
    assert (ours.label == fresh.label).all()
    np.testing.assert_allclose(np.stack(ours.features), np.stack(fresh.features), atol=1e-5)
    np.testing.assert_allclose(
        incremental["second_reduction"].fit.explained_variance,
        incremental["fresh_reduction"].fit.explained_variance,
        atol=1e-6,
    )
    assert (
        incremental["second"].metadata["images_per_label"]
        == (incremental["fresh"].metadata["images_per_label"])
    )


def test_incremental_run_appends_without_rewriting_other_files(incremental):
    """Part files of the first batch that held no removed row are untouched; those that did
    are gone (their other rows moved to the new batch)."""
    output = incremental["output"]
    now = {p: p.stat().st_mtime_ns for p in (output / "features").rglob("*.parquet")}
    first = incremental["first_parts"]
    kept = [p for p in first if p in now]
    assert kept, "every part file of the first batch was rewritten"
    assert all(now[p] == first[p] for p in kept)
    rewritten = incremental["second"].metadata["incremental"]["rewritten_part_files"]
    assert len(first) - len(kept) == rewritten >= 1
    # Spark's checksums went with the files they check.
    checksums = list((output / "features").rglob(".*.crc"))
    assert checksums and all(p.with_name(p.name[1:-4]).exists() for p in checksums)


def test_batches_in_both_list_layouts_read_as_one(incremental):
    """The increment's batch carries rows read back from the first batch's rewritten files
    (Spark forgets that their floats are never null), so it keeps Parquet's standard lists;
    the first batch's files hold two-level ones. Spark (the second run's PCA, equal to a
    fresh run's above) and pandas read the two as one dataset."""
    layouts: dict[str, set[str]] = {}
    for part in (incremental["output"] / "features").rglob("*.parquet"):
        column = pq.ParquetFile(part).schema.column(4).path
        layouts.setdefault(part.parent.name, set()).add(column)
    first, second = incremental["second"].metadata["batches"]
    assert layouts == {
        f"batch={first}": {"features.array"},
        f"batch={second}": {"features.list.element"},
    }
    features = pd.read_parquet(incremental["output"] / "features")
    assert {len(vector) for vector in features["features"]} == {1280}


def test_an_incremental_run_failing_after_its_commit_leaves_no_stale_description(
    spark, tmp_path, monkeypatch
):
    """features/ has changed but its _extraction.json and _moments.npz would describe the
    rows before: they are gone, notebook 02 asks for notebook 01, the next run is full."""
    root = tmp_path / "input"
    copy_photos(root, [p for label in LABELS[:2] for p in photos(label, 0, 4)])
    output = tmp_path / "out"
    run(spark, root, output, incremental=True)
    assert (output / "features" / MOMENTS_FILE).exists()
    copy_photos(root, [p for label in LABELS[:2] for p in photos(label, 4, 6)])

    def fail(features):
        raise RuntimeError("the driver fails after the commit")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_label_counts", fail)
        with pytest.raises(RuntimeError, match="after the commit"):
            run(spark, root, output, incremental=True)
    assert not (output / "features" / "_extraction.json").exists()
    assert not (output / "features" / MOMENTS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        reduce_features(spark, ReduceParams(output=str(output), k=5))

    extraction, _ = run(spark, root, output, incremental=True)
    assert extraction.metadata["incremental"] == {
        "featurized": 12,
        "full_run_because": "no features in the output yet",
    }
    features = pd.read_parquet(output / "features")
    assert sorted(features.path) == sorted(spelled(p) for p in root.rglob("*.jpg"))


def test_an_increment_stopped_before_its_commit_keeps_rejected_as_it_was(
    spark, tmp_path, monkeypatch
):
    """rejected/ describes the same files as features/: an increment's is swapped in only
    after its commit, so one that stops before keeps both datasets as they were."""
    root = tmp_path / "input"
    copy_photos(root, [p for label in LABELS[:2] for p in photos(label, 0, 3)])
    bad = root / "apple" / "bad.jpg"
    bad.write_bytes(b"not a picture")
    output = tmp_path / "out"
    params = dict(incremental=True, max_rejected_fraction=1.0)
    run(spark, root, output, **params)
    before = pd.read_parquet(output / "rejected")
    shutil.copy(photos("apple", 5, 6)[0], bad)  # readable now

    def stopped(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "commit_batch", stopped)
        with pytest.raises(KeyboardInterrupt):
            run(spark, root, output, **params)
    pd.testing.assert_frame_equal(pd.read_parquet(output / "rejected"), before)
    assert len(pd.read_parquet(output / "features")) == 6
    extraction, _ = run(spark, root, output, **params)
    assert (extraction.n_images, extraction.n_rejected) == (7, 0)
    assert pd.read_parquet(output / "rejected").empty


def test_killed_incremental_run_then_rerun_is_exactly_once(spark, tmp_path):
    """SIGKILL the driver while the incremental run featurizes: features/ is unchanged
    (byte for byte); the next incremental run adds every new file once."""
    root = tmp_path / "input"
    copy_photos(root, [p for label in LABELS[:2] for p in photos(label, 0, 8)])
    output = tmp_path / "out"
    run(spark, root, output)
    before = {
        str(p.relative_to(output)): p.read_bytes()
        for p in sorted((output / "features").rglob("*"))
        if p.is_file() and not p.name.startswith("_")
    }
    copy_photos(root, [p for label in LABELS for p in photos(label, 20, 26)])

    work = tmp_path / "driver"
    work.mkdir()
    signal_file = work / "featurizing"
    killed = run_driver(
        write_driver(work),
        {
            "master": "local[1]",
            "conf": base_conf(),
            "check_imports": False,
            "kill": {
                "signal_file": str(signal_file),
                "min_tasks": 2,
                "min_completed": 1,
                "stage_contains": "featurize",  # progress.track names its stages
                "timeout_s": 240,
            },
            "extract": {
                "input": str(root),
                "output": str(output),
                "weights": str(WEIGHTS),
                "incremental": True,
            },
            "reduce": {"output": str(output), "k": 5},
            "result": str(work / "result.json"),
        },
        python=Path(os.environ["PYSPARK_PYTHON"]),
        cwd=work,
        timeout_s=300,
        kill_on_file=signal_file,
    )
    assert killed.killed_on_signal, killed.stderr[-3000:]
    after = {
        str(p.relative_to(output)): p.read_bytes()
        for p in sorted((output / "features").rglob("*"))
        if p.is_file() and not p.name.startswith("_")
    }
    assert after == before, "the killed run changed features/"
    assert not (output / "_SUCCESS").exists()

    extraction, _ = run(spark, root, output, incremental=True)
    assert extraction.metadata["incremental"]["featurized"] == 18
    features = pd.read_parquet(output / "features")
    assert features.path.is_unique and len(features) == 16 + 18
    on_disk = {spelled(p) for p in root.rglob("*.jpg")}
    assert set(features.path) == on_disk
    assert (output / "_SUCCESS").exists() and not (output / "_staging").exists()


@pytest.mark.cluster
def test_manifest_on_a_local_cluster(manifest_run, tmp_path):
    """The manifest path with two executor JVMs importing the shipped zip: the executors
    read every URI themselves, and the result equals the local run."""
    work = tmp_path / "driver"
    work.mkdir()
    python = clean_python(tmp_path)
    archive = ship_lib(work)
    manifest = tmp_path / "images.csv"
    uris = [spelled(p) for p in manifest_run["chosen"]] + manifest_run["missing"][:1]
    pd.DataFrame({"path": uris}).to_csv(manifest, index=False)
    output = tmp_path / "cluster"
    result = run_driver(
        write_driver(work),
        {
            "master": local_cluster_master(2, 1, 1024),
            "conf": base_conf(),
            "executors": 2,
            "pyfile": str(archive),
            "extract": {"manifest": str(manifest), "output": str(output), "weights": str(WEIGHTS)},
            "reduce": {"output": str(output), "k": 3},
            "result": str(work / "result.json"),
        },
        python=python,
        cwd=work,
        timeout_s=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    extraction = result.result["extraction"]
    assert extraction["n_files_found"] == 13 and extraction["n_rejected"] == 1
    assert result.result["executors_at_start"] == 2
    cluster = features_by_path(output)
    local = features_by_path(manifest_run["output"])
    paths = [spelled(p) for p in manifest_run["chosen"]]
    assert list(cluster.index) == sorted(paths)
    np.testing.assert_allclose(
        np.stack(cluster.loc[paths, "features"]),
        np.stack(local.loc[paths, "features"]),
        atol=1e-4,
    )
