"""The real photos through both stages with the real weights (Spark, local[2])."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.functions import array_to_vector
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca.config import ExtractParams, ParameterError, ReduceParams
from imagepca.driver_projection import driver_writer
from imagepca.images import InputError
from imagepca.inputs import list_folder
from imagepca.listing import fingerprint
from imagepca.moments import sample_key
from imagepca.pipeline import extract_features, finish_run, read_features, reduce_features
from imagepca.projection import reduce_output
from imagepca.reduction import ProjectionSample, reduce_with, save_models
from imagepca.session import spark_settings
from imagepca.storage import LEGACY_PARQUET_KEY, Storage, local_file_path, vector_write_settings
from imagepca.weights import WeightsError, resolve_weights

PHOTO_COUNT = sum(1 for p in FRUIT_PHOTOS.rglob("*") if p.is_file())


def test_listing_finds_every_photo_with_its_label(spark):
    listing = list_folder(spark, str(FRUIT_PHOTOS))
    assert len(listing) == PHOTO_COUNT == 240
    assert listing.labels() == {"apple": 75, "banana": 73, "mixed": 20, "orange": 72}


def test_listed_files_read_by_python_as_hadoop_reads_them(spark, tmp_path):
    """The listing's file: URIs are read without the JVM; names that URIs would escape
    (space, %, #, ?, non-ASCII) reach the same bytes."""
    names = ["a b.jpg", "100%.jpg", "x#1.jpg", "why?.jpg", "café.jpg"]
    for index, name in enumerate(names):
        (tmp_path / "label" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "label" / name).write_bytes(bytes([index]) * (index + 1))
    listing = list_folder(spark, str(tmp_path))
    storage = Storage(spark)
    paths = [row["path"] for row in listing.files.select("path").collect()]
    assert len(paths) == len(names) and all(local_file_path(p) for p in paths)
    for path in paths:
        jvm, fs = storage._located(path)
        with_jvm = bytes(fs.open(jvm).readAllBytes())
        assert (
            storage.read_bytes(path)
            == with_jvm
            == (tmp_path / "label" / Path(local_file_path(path)).name).read_bytes()
        )
    assert local_file_path("file:///tmp/a b") == "/tmp/a b" == local_file_path("file:/tmp/a b")
    assert local_file_path("/tmp/a") is None and local_file_path("s3://b/a") is None
    assert local_file_path("file://otherhost/a") is None


def test_names_with_a_colon_are_featurized(spark, tmp_path):
    """Hadoop's checksummed local file system cannot open ``a:b.jpg`` (the name of its
    checksum file, ``.a:b.jpg.crc``, parses as a URI with a scheme): the scan dropped such
    files, and they were rejected as unreadable."""
    names = {"apple": ["2024-01-01T10:00:00.jpg", "a:b.jpg"], "banana": ["c:1.jpg", "plain.jpg"]}
    for label, chosen in names.items():
        (tmp_path / "in" / label).mkdir(parents=True)
        for photo, name in zip(
            sorted((FRUIT_PHOTOS / label).glob("*.jpg"))[:2], chosen, strict=True
        ):
            shutil.copy(photo, tmp_path / "in" / label / name)
    params = ExtractParams(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), weights=str(WEIGHTS)
    )
    extraction = extract_features(spark, params)
    assert (extraction.n_images, extraction.n_rejected) == (4, 0)
    featurized = {
        Path(local_file_path(row.path)).name
        for row in read_features(spark, params.output).collect()
    }
    assert featurized == {name for chosen in names.values() for name in chosen}


def test_listing_brings_a_few_files_of_each_label(spark, tmp_path):
    listing = list_folder(spark, str(FRUIT_PHOTOS))
    kept = listing.sample(3)  # from the counting job
    assert {label for label, _ in kept} == {"apple", "banana", "mixed", "orange"}
    for label in ("apple", "banana", "mixed", "orange"):
        paths = [path for name, path in kept if name == label]
        assert 1 <= len(paths) == len(set(paths)) <= 3
        assert all(f"/{label}/" in path for path in paths)
    assert kept == list_folder(spark, str(FRUIT_PHOTOS)).sample(3)  # seeded, not random
    # The same files wherever the data set sits: a copy elsewhere shows the same names.
    copy = tmp_path / "elsewhere" / "photos"
    shutil.copytree(FRUIT_PHOTOS, copy)
    moved = list_folder(spark, str(copy)).sample(3)
    assert [(label, Path(path).name) for label, path in moved] == [
        (label, Path(path).name) for label, path in kept
    ]
    more = listing.sample(5, max_labels=2)  # past what the listing kept: a job
    assert [label for label, _ in more] == ["apple"] * 5 + ["banana"] * 5


def test_featurization_sums_the_listings_fingerprint(spark, photos_run):
    """The featurization job's groups add up to the fingerprint of the listing itself:
    what ``reuse_features`` compares a new listing with."""
    listing = list_folder(spark, str(FRUIT_PHOTOS))
    stored = photos_run["extraction"].metadata["params"]["listing_fingerprint"]
    assert stored == fingerprint(listing.files, listing.n_files)


def test_every_image_is_accounted_for(photos_run):
    output = Path(photos_run["output"])
    features = pd.read_parquet(output / "features")  # pandas, no Spark: arrays of floats
    rejected = pd.read_parquet(output / "rejected")
    assert len(features) + len(rejected) == PHOTO_COUNT
    assert len(features) == photos_run["extraction"].n_images
    assert set(features["label"]) == {"apple", "banana", "mixed", "orange"}
    assert features["path"].is_unique


def test_features_are_1280_finite_and_informative(photos_run):
    features = pd.read_parquet(Path(photos_run["output"]) / "features")
    matrix = np.stack(features["features"].to_numpy())
    assert matrix.shape[1] == 1280 and matrix.dtype == np.float32
    assert np.isfinite(matrix).all()
    assert (matrix >= 0).all()  # ReLU6 activations, average-pooled
    assert matrix.std(axis=0).max() > 0.1  # not constant across images
    assert len(np.unique(matrix.round(4), axis=0)) == len(matrix)  # no two photos alike


def test_explained_variance_is_a_sorted_spectrum(photos_run):
    metrics = json.loads((Path(photos_run["output"]) / "metrics.json").read_text())
    explained = np.array(metrics["explained_variance"])
    assert len(explained) == min(metrics["n_images"], 1280)
    assert (np.diff(explained) <= 1e-12).all()
    assert explained.sum() <= 1 + 1e-9
    cumulative = np.array(metrics["cumulative_variance"])
    k = metrics["k"]
    assert cumulative[k - 1] >= 0.9 > (cumulative[k - 2] if k > 1 else 0)
    assert metrics["variance_threshold"] == 0.9
    for key in (
        "n_images",
        "n_rejected",
        "n_classes",
        "timings_s",
        "images_per_s",
        "params",
        "versions",
    ):
        assert key in metrics
    assert metrics["versions"]["pyspark"].startswith("3.5")


def column_paths(dataset: Path) -> set[tuple[str, ...]]:
    """The Parquet column paths of every part file under ``dataset`` (one per layout)."""
    return {
        tuple(tuple(column.path.split(".")) for column in pq.ParquetFile(part).schema)
        for part in dataset.rglob("*.parquet")
    }


def test_vectors_are_written_as_two_level_lists(spark, photos_run):
    """features/ and the models' vectors are Parquet's two-level lists of required floats
    (``repeated float array``: the fast layout for Spark to write, see
    imagepca.storage.vector_write_settings), which Spark and pandas read as arrays. This
    local output's reduced/ was written by the driver, with pyarrow's standard
    three-level lists of required floats (Spark's own write of it: the next test)."""
    output = Path(photos_run["output"])
    assert column_paths(output / "features") == {
        (("path",), ("label",), ("size",), ("modified",), ("features", "array"))
    }
    assert column_paths(output / "reduced") == {(("path",), ("label",), ("pca", "list", "element"))}
    pca_data = next((output / "pca_components" / "data").glob("*.parquet"))
    values = [c.path for c in pq.ParquetFile(pca_data).schema if c.path.startswith("pc.values")]
    assert values == ["pc.values.array"]
    # pca_model's stages, saved on threads of their own through the models' session.
    stage_data = next((output / "pca_model" / "stages").glob("*PCA*/data/*.parquet"))
    values = [c.path for c in pq.ParquetFile(stage_data).schema if c.path.startswith("pc.values")]
    assert values == ["pc.values.array"]
    stored = spark.read.parquet(str(output / "features")).schema["features"].dataType
    assert stored.simpleString() == "array<float>"
    frame = pd.read_parquet(output / "reduced")
    assert {len(v) for v in frame["pca"]} == {photos_run["reduction"].fit.k}


def test_reduced_written_by_the_driver_is_what_sparks_executors_write(spark, photos_run, tmp_path):
    """An output on this machine's disk has reduced/ projected and written by the driver
    (imagepca.driver_projection). It holds what Spark's executors write: the same
    rows and scores, read back with the same schema, the same projection sample, floats
    without a dictionary, and Hadoop's _SUCCESS marker."""
    output, fit = photos_run["output"], photos_run["reduction"].fit
    features, storage = read_features(spark, output), Storage(spark)
    written, samples = {}, {}
    for way in ("driver", "spark"):
        sample = ProjectionSample(spark, 10, fit.n_images)
        if way == "driver":
            write = driver_writer(storage, features, output, fit.projector(sample))
            assert write is not None
        else:
            reduced = fit.transform(features, sample)
            write = partial(spark_write, spark, reduced)
        write(str(tmp_path / way))
        samples[way] = sample.points()
        written[way] = spark.read.parquet(str(tmp_path / way))
        assert (tmp_path / way / "_SUCCESS").exists()
    assert written["driver"].schema == written["spark"].schema
    assert (
        written["driver"].schema.simpleString()
        == "struct<path:string,label:string,pca:array<float>>"
    )
    driver, executors = (written[way].toPandas().sort_values("path") for way in written)
    assert len(driver) == fit.n_images
    assert driver["path"].tolist() == executors["path"].tolist()
    assert driver["label"].tolist() == executors["label"].tolist()
    np.testing.assert_array_equal(np.stack(driver["pca"]), np.stack(executors["pca"]))
    pd.testing.assert_frame_equal(samples["driver"], samples["spark"])
    assert column_paths(tmp_path / "spark") == {(("path",), ("label",), ("pca", "array"))}
    encodings = chunk_encodings(tmp_path / "driver")
    assert not encodings["pca.list.element"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert encodings["label"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}


def spark_write(spark, frame, uri: str) -> None:
    with spark_settings(spark, vector_write_settings(frame)):
        frame.write.parquet(uri)


def test_reduced_in_a_codec_pyarrow_writes_otherwise_is_left_to_spark(spark, photos_run):
    """The driver writes reduced/ only in a codec pyarrow writes as Spark does (an output
    off this machine's disk is Spark's too: tests/test_s3_end_to_end.py)."""
    output, fit = photos_run["output"], photos_run["reduction"].fit
    features, storage = read_features(spark, output), Storage(spark)
    assert storage.local_folder(f"file://{output}") == output
    assert driver_writer(storage, features, output, fit.projector()) is not None
    with spark_settings(spark, {"spark.sql.parquet.compression.codec": "lz4"}):
        assert driver_writer(storage, features, output, fit.projector()) is None


def chunk_encodings(dataset: Path) -> dict[str, set[str]]:
    """Every encoding each column of ``dataset``'s part files uses, by column path."""
    encodings: dict[str, set[str]] = {}
    for part in dataset.rglob("*.parquet"):
        metadata = pq.ParquetFile(part).metadata
        for group in range(metadata.num_row_groups):
            for index in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(index)
                encodings.setdefault(chunk.path_in_schema, set()).update(chunk.encodings)
    return encodings


@pytest.mark.parametrize("nullable", [False, True], ids=["two-level", "three-level"])
def test_float_vectors_are_written_without_a_dictionary(spark, tmp_path, nullable):
    """Parquet tries a dictionary first and gives float vectors, which hardly repeat, up
    past 262,144 distinct values (imagepca.storage.vector_write_settings). Vectors that do
    repeat show the settings reach the writer, in either list layout; labels keep theirs."""
    schema = StructType(
        [
            StructField("label", StringType()),
            StructField("features", ArrayType(FloatType(), containsNull=nullable)),
        ]
    )
    frame = spark.createDataFrame([("a", [0.0, 1.0] * 8)] * 200, schema)
    path = "features.list.element" if nullable else "features.array"
    dictionary = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    settings = vector_write_settings(frame)
    with spark_settings(spark, {LEGACY_PARQUET_KEY: settings[LEGACY_PARQUET_KEY]}):
        frame.write.parquet(str(tmp_path / "default"))  # the same layout, Parquet's encoding
    with spark_settings(spark, settings):
        frame.write.parquet(str(tmp_path / "plain"))
    assert chunk_encodings(tmp_path / "default")[path] & dictionary
    encodings = chunk_encodings(tmp_path / "plain")
    assert encodings[path] and not encodings[path] & dictionary
    assert encodings["label"] & dictionary


def test_finish_run_waits_for_the_models_and_reports_a_failed_save(
    spark, photos_run, tmp_path, monkeypatch
):
    """The models are saved beside reduced/'s write and past it; finish_run completes the
    output only once they are written, and a save that failed fails the run there."""
    output = tmp_path / "out"
    shutil.copytree(photos_run["output"], output)
    reduction = reduce_features(spark, ReduceParams(output=str(output), k=4))
    finish_run(spark, str(output), reduction.metrics)
    assert reduction.metrics["timings_s"]["models_wait_s"] >= 0
    assert PipelineModel.load(str(output / "pca_model")).stages[1].getK() == 4
    assert json.loads((output / "metrics.json").read_text())["k"] == 4
    assert (output / "_SUCCESS").exists() and not (output / "_staging").exists()

    def fails(uri: str) -> None:
        raise OSError(f"no space left writing {uri}")

    fit = reduction.fit
    monkeypatch.setattr(fit.model, "save", fails)
    save_models(spark, Storage(spark), str(output), fit, {})
    with pytest.raises(OSError, match="no space left"):
        finish_run(spark, str(output), reduction.metrics)
    assert not (output / "_staging").exists()


def test_reloaded_model_reproduces_reduced(spark, photos_run):
    output = photos_run["output"]
    model = PipelineModel.load(f"{output}/pca_model")
    features = spark.read.parquet(f"{output}/features")
    again = reduce_with(model, features).toPandas().set_index("path").sort_index()
    stored = pd.read_parquet(Path(output) / "reduced").set_index("path").sort_index()
    k = photos_run["reduction"].fit.k
    assert len(stored) == len(features.collect())
    assert all(len(v) == k for v in stored["pca"])
    np.testing.assert_allclose(
        np.stack(again["pca"].to_numpy()), np.stack(stored["pca"].to_numpy()), atol=1e-4
    )


def test_new_images_are_projected_only_with_features_made_alike(spark, photos_run, tmp_path):
    """A later run featurizing some of the same photos gets, through the fitted run's
    pca_model/, the scores that run's reduced/ holds for them; features of another image
    size are refused, naming it, and the engine (features within 1e-4) is not held against
    them."""
    new_images = tmp_path / "new"
    for label in ("apple", "banana"):
        (new_images / label).mkdir(parents=True)
        for name in sorted(os.listdir(FRUIT_PHOTOS / label))[:2]:
            shutil.copy(FRUIT_PHOTOS / label / name, new_images / label / name)
    fitted = photos_run["output"]

    def featurized(name: str, **options) -> str:
        output = str(tmp_path / name)
        params = ExtractParams(input=str(new_images), output=output, weights=str(WEIGHTS))
        extract_features(spark, replace(params, **options))
        return output

    stored = pd.read_parquet(Path(fitted) / "reduced").set_index("path")
    for engine in ("tflite", "keras"):  # the fitted run's engine, and the other one
        features = featurized(engine, engine=engine)
        projected = reduce_output(spark, model_output=fitted, features_output=features)
        scores = projected.toPandas().set_index("path").sort_index()
        assert list(scores["label"]) == ["apple", "apple", "banana", "banana"]
        same = stored.loc[[p.replace(str(new_images), str(FRUIT_PHOTOS)) for p in scores.index]]
        np.testing.assert_allclose(
            np.stack(scores["pca"].to_numpy()), np.stack(same["pca"].to_numpy()), atol=2e-3
        )

    other = featurized("other", image_size=160, engine="keras")
    with pytest.raises(InputError, match=r"image_size 160 \(fitted: 224\)") as refused:
        reduce_output(spark, model_output=fitted, features_output=other)
    assert "engine" not in str(refused.value)
    with pytest.raises(InputError, match="no fitted PCA under .*notebook 02"):
        reduce_output(spark, model_output=other, features_output=other)
    # A run started in the fitted output since: its features may no longer be the PCA's.
    restarted = tmp_path / "restarted"
    shutil.copytree(fitted, restarted)
    (restarted / "metrics.json").unlink()
    with pytest.raises(InputError, match="has a pca_model/ but no metrics.json: a run started"):
        reduce_output(spark, model_output=str(restarted), features_output=other)


def test_projection_points_are_reduced_values_of_a_sample_partitioning_does_not_change(
    spark, photos_run
):
    """The projection plot's points are kept by the job that writes reduced/: the first two
    scores reduced/ holds, for every image when there are at most `projection_points`, else
    for that many chosen by a hash of their path, the same ones however the rows are
    partitioned (a task that ran twice adds nothing)."""
    output, fit = photos_run["output"], photos_run["reduction"].fit
    stored = pd.read_parquet(Path(output) / "reduced")
    stored = stored.assign(key=stored["path"].map(sample_key)).sort_values("key")
    first_two = [tuple(map(float, scores[:2])) for scores in stored["pca"]]
    everything = photos_run["reduction"].projection
    assert len(everything) == len(stored) == fit.n_images
    assert list(zip(everything["pc1"], everything["pc2"], strict=True)) == first_two

    for partitions in (1, 3):
        sample = ProjectionSample(spark, 10, fit.n_images)
        reduced = fit.transform(read_features(spark, output).repartition(partitions), sample)
        reduced.write.format("noop").mode("overwrite").save()
        sample.accumulator.add(sample.accumulator.value[:3])  # as a task run again adds
        points = sample.points()
        assert list(points["label"]) == list(stored["label"][:10])
        assert list(zip(points["pc1"], points["pc2"], strict=True)) == first_two[:10]


def test_reduced_features_separate_single_fruits(spark, photos_run):
    reduced = spark.read.parquet(f"{photos_run['output']}/reduced").where("label != 'mixed'")
    data = reduced.select(
        array_to_vector("pca").alias("x"),
        (reduced.label == "banana").cast("double").alias("banana"),
        (reduced.label == "orange").cast("double").alias("orange"),
        "label",
    )
    from pyspark.ml.feature import StringIndexer

    indexed = StringIndexer(inputCol="label", outputCol="y").fit(data).transform(data)
    train, test = indexed.randomSplit([0.7, 0.3], seed=7)
    model = LogisticRegression(featuresCol="x", labelCol="y", maxIter=200).fit(train)
    predictions = model.transform(test).select("y", "prediction").toPandas()
    accuracy = (predictions["y"] == predictions["prediction"]).mean()
    assert len(predictions) > 30
    assert accuracy > 0.8, f"accuracy {accuracy:.3f} (chance is 1/3)"


def test_missing_weights_fail_before_any_spark_job(spark, tmp_path):
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup(None))
    params = ExtractParams(
        input=str(FRUIT_PHOTOS), output=str(tmp_path / "out"), weights=str(tmp_path / "nope.h5")
    )
    with pytest.raises(WeightsError, match="does not exist. Pass weights=imagenet"):
        extract_features(spark, params)
    assert set(tracker.getJobIdsForGroup(None)) == before
    assert not (tmp_path / "out").exists()


def _edited_weights(path: Path, edit) -> Path:
    """A copy of the shared weights at ``path``, changed by ``edit(h5py.File)``."""
    shutil.copy(WEIGHTS, path)
    with h5py.File(path, "r+") as weights:
        edit(weights)
    return path


def test_weights_that_are_not_whole_mobilenet_v2_weights_are_refused(tmp_path):
    """A folder, an interrupted copy, another file, another model's weights, MobileNetV2's
    with its top or of another width: each named for what it is, before anything is built
    from it (Keras would refuse each only once the output's markers had gone)."""
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(WEIGHTS.read_bytes()[: 4 << 20])
    text = tmp_path / "text.h5"
    text.write_text("404 Not Found")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as weights:
        weights.attrs["layer_names"] = ["dense"]
        weights.create_dataset("dense/kernel", data=np.ones((3, 2)))

    def add_top(weights) -> None:
        weights.attrs["layer_names"] = [*weights.attrs["layer_names"], "Logits"]

    def narrow(weights) -> None:  # alpha 0.5: 16 filters in the first convolution
        del weights["Conv1/Conv1/kernel"]
        weights.create_dataset("Conv1/Conv1/kernel", data=np.zeros((3, 3, 3, 16), "float32"))

    cases = {
        tmp_path: "is a folder, not a file",
        truncated: "is not a readable HDF5 file .*truncated file",
        text: "is not a readable HDF5 file .*file signature not found",
        other: r"holds no MobileNetV2 weights \(no layer Conv1\)",
        _edited_weights(tmp_path / "top.h5", add_top): "with its classification top",
        _edited_weights(tmp_path / "narrow.h5", narrow): (
            r"layer Conv1's kernel is \(3, 3, 3, 16\), not \(3, 3, 3, 32\) \(another width"
        ),
    }
    for path, problem in cases.items():
        with pytest.raises(WeightsError, match=problem):
            resolve_weights(str(path))
    assert resolve_weights(str(WEIGHTS)) == WEIGHTS


def test_weights_files_keras_loads_pass_the_check(tmp_path):
    """As Keras 2 wrote them (the file Keras downloads: layer names as bytes), and a whole
    model's file (the layers under ``model_weights``)."""

    def as_bytes(weights) -> None:
        names = [str(name).encode() for name in weights.attrs["layer_names"]]
        weights.attrs["layer_names"] = np.array(names, dtype="S")

    keras2 = _edited_weights(tmp_path / "keras2.h5", as_bytes)
    assert resolve_weights(str(keras2)) == keras2
    whole = tmp_path / "model.h5"
    with h5py.File(WEIGHTS, "r") as source, h5py.File(whole, "w") as model:
        group = model.create_group("model_weights")
        for name in source:
            source.copy(source[name], group)
        group.attrs.update(source.attrs)
        model.attrs["model_config"] = "{}"
    assert resolve_weights(str(whole)) == whole


def test_imagenet_weights_come_from_the_keras_cache(test_environment):
    path = resolve_weights("imagenet")
    assert path.parent == Path(test_environment["KERAS_HOME"]) / "models"
    assert path.samefile(WEIGHTS)


def test_a_broken_file_in_the_keras_cache_is_named_with_its_remedy(tmp_path, monkeypatch):
    """Keras never checks a cached file (no hash for these weights) and so never downloads
    it again: the message says to delete it."""
    cached = tmp_path / "models" / WEIGHTS.name
    cached.parent.mkdir()
    cached.write_bytes(WEIGHTS.read_bytes()[: 1 << 20])
    # The cache's answer (Keras reads KERAS_HOME once, when first imported).
    monkeypatch.setattr("keras.utils.get_file", lambda *args, **kwargs: str(cached))
    with pytest.raises(WeightsError, match=f"truncated file.*Delete {cached}: Keras then down"):
        resolve_weights("imagenet")


def test_weights_given_as_a_uri_are_fetched_through_hadoop(spark):
    local = resolve_weights(WEIGHTS.as_uri(), spark)
    assert local.stat().st_size == WEIGHTS.stat().st_size


def test_bad_input_locations_are_named(spark, tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        list_folder(spark, str(tmp_path / "missing"))
    # A Java error, not Spark's AnalysisException (so is a missing S3 bucket's): its line.
    message = 'cannot be read: UnsupportedFileSystemException: No FileSystem for scheme "nosuch"'
    with pytest.raises(InputError, match=message):
        list_folder(spark, "nosuch://bucket/photos")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no image files .* under .*empty.*INPUT/banana/2.jpg.$"):
        list_folder(spark, str(tmp_path / "empty"))
    # Images that only Spark's rule on hidden names kept out are counted in the message.
    photos = sorted(FRUIT_PHOTOS.rglob("*.jpg"))[:3]
    (tmp_path / "hidden" / "_apple").mkdir(parents=True)
    (tmp_path / "hidden" / "pear").mkdir()
    shutil.copy(photos[0], tmp_path / "hidden" / "_apple" / "1.jpg")
    shutil.copy(photos[1], tmp_path / "hidden" / "pear" / "_MG_0001.JPG")
    # Hidden on purpose, or not skipped by Spark: not counted.
    shutil.copy(photos[2], tmp_path / "hidden" / "pear" / "._2.jpg")  # macOS AppleDouble
    (tmp_path / "hidden" / "__MACOSX" / "pear").mkdir(parents=True)
    shutil.copy(photos[2], tmp_path / "hidden" / "__MACOSX" / "pear" / "_MG_0001.JPG")
    shutil.copy(photos[2], tmp_path / "hidden" / "pear" / "_MG_0002.JPG")
    with pytest.raises(InputError, match="3 image files skipped: their names, or a parent"):
        list_folder(spark, str(tmp_path / "hidden"))
    # Beside images it lists, those it skips are named by the listing and the run's summary.
    shutil.copy(photos[0], tmp_path / "hidden" / "pear" / "IMG_0002.JPG")
    listing = list_folder(spark, str(tmp_path / "hidden"))
    assert (listing.n_files, listing.n_hidden) == (1, 3)
    first, warning = listing.describe().splitlines()
    assert first == f"1 image files under {tmp_path / 'hidden'}"
    assert warning.startswith("warning: 3 image files skipped") and "--manifest" in warning
    assert f"(the first: {tmp_path / 'hidden' / '_apple' / '1.jpg'})" in warning
    assert listing.skipped()["hidden_skipped"] == [
        str(tmp_path / "hidden" / name)
        for name in ("_apple/1.jpg", "pear/_MG_0001.JPG", "pear/_MG_0002.JPG")
    ]
    listing.release()
    # A partition's folder (k=v) is listed by Spark, even with a leading _.
    (tmp_path / "hidden" / "_year=2024").mkdir()
    shutil.copy(photos[2], tmp_path / "hidden" / "_year=2024" / "4.jpg")
    listing = list_folder(spark, str(tmp_path / "hidden"))
    assert (listing.n_files, listing.n_hidden) == (2, 3)
    listing.release()
    # Spark lists a linked folder's files: its skipped images count too.
    (tmp_path / "elsewhere" / "plum").mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "elsewhere" / "plum" / "IMG_1.jpg")
    shutil.copy(photos[1], tmp_path / "elsewhere" / "plum" / "_MG_1.jpg")
    (tmp_path / "hidden" / "plum").symlink_to(tmp_path / "elsewhere" / "plum")
    listing = list_folder(spark, str(tmp_path / "hidden"))
    assert (listing.n_files, listing.n_hidden) == (3, 4)
    assert listing.broken_links == ()
    listing.release()
    # Hadoop's listing leaves out a link to nothing: named, with what to do.
    gone = tmp_path / "hidden" / "pear" / "IMG_9.jpg"
    gone.symlink_to(tmp_path / "moved" / "IMG_9.jpg")
    listing = list_folder(spark, str(tmp_path / "hidden"))
    assert (listing.n_files, listing.n_hidden, listing.broken_links) == (3, 4, (str(gone),))
    assert listing.describe().splitlines()[-1] == (
        f"warning: 1 image files skipped: links to nothing (the first: {gone}), which Spark's "
        "listing leaves out; restore their targets or remove the links"
    )
    assert listing.skipped()["broken_links_skipped"] == [str(gone)]
    listing.release()
    # Names that are not UTF-8 (a Latin-1 archive's): Spark's listing cannot see them.
    latin = os.fsencode(tmp_path / "hidden") + b"/r\xe9sum\xe9"
    os.mkdir(latin)
    shutil.copy(photos[0], latin + b"/1.jpg")
    shutil.copy(photos[1], os.fsencode(tmp_path / "hidden" / "pear") + b"/caf\xe9.jpg")
    listing = list_folder(spark, str(tmp_path / "hidden"))
    assert (listing.n_files, listing.n_hidden) == (3, 4)
    shown = [
        f"{tmp_path / 'hidden'}/pear/caf\\xe9.jpg",
        f"{tmp_path / 'hidden'}/r\\xe9sum\\xe9/1.jpg",
    ]
    assert listing.skipped()["not_utf8_skipped"] == shown
    assert listing.describe().splitlines()[-1] == (
        f"warning: 2 image files skipped: their names (or a parent folder's) are not UTF-8 "
        f"(the first: {shown[0]}), which Spark's listing cannot read; rename them to UTF-8, "
        "e.g. convmv -f latin1 -t utf8 -r --notest FOLDER"
    )
    json.dumps(listing.skipped())  # metrics.json takes them
    listing.release()


def test_paths_with_glob_characters_are_read_as_written(spark, tmp_path):
    """Spark's readers expand glob patterns: ``in[1]`` would list ``in1`` and ``out[1]``
    read ``out1``'s features. Beside such siblings, a run on the bracketed folders reads and
    classifies its own images only."""
    from imagepca.classify import prepare
    from imagepca.config import ClassifyParams

    photos = {label: sorted((FRUIT_PHOTOS / label).glob("*.jpg")) for label in ("apple", "banana")}
    for folder, chosen in (("in1", slice(0, 3)), ("in[1]", slice(3, 7))):
        for label, files in photos.items():
            (tmp_path / folder / label).mkdir(parents=True)
            for photo in files[chosen]:
                shutil.copy(photo, tmp_path / folder / label / photo.name)
    expected = {p.name for p in (tmp_path / "in[1]").rglob("*.jpg")}
    for name in ("1", "[1]"):
        output = str(tmp_path / f"out{name}")
        extract_features(
            spark,
            ExtractParams(input=str(tmp_path / f"in{name}"), output=output, weights=str(WEIGHTS)),
        )
        reduction = reduce_features(spark, ReduceParams(output=output, k=2))
        finish_run(spark, output, reduction.metrics)
    listing = list_folder(spark, str(tmp_path / "in[1]"))
    assert listing.n_files == len(expected) == 8
    listing.release()
    output = str(tmp_path / "out[1]")
    names = {Path(local_file_path(row.path)).name for row in read_features(spark, output).collect()}
    assert names == expected
    clf = prepare(spark, ClassifyParams(output=output))
    assert clf.pca.k == 2 and sum(n for n in clf.label_counts.values()) == 8
    reduced = clf.fit_reduced()  # reads OUTPUT/reduced, joined with the split
    assert reduced.scores["n_train"] + reduced.scores["n_test"] == 8
    clf.split.unpersist()


def test_the_run_summary_warns_of_skipped_images(photos_run):
    from imagepca.console import summary

    metrics = photos_run["reduction"].metrics
    # Carried from notebook 01's listing.
    assert metrics["n_hidden_skipped"] == metrics["n_broken_links_skipped"] == 0
    assert "skipped" not in summary(metrics, "out")
    first = summary({**metrics, "n_hidden_skipped": 2}, "out").splitlines()[0]
    assert first.startswith("warning: 2 image files skipped: their names, or a parent folder's")
    named = {"n_hidden_skipped": 2, "hidden_skipped": ["in/_a/1.jpg", "in/_a/2.jpg"]}
    first = summary({**metrics, **named}, "out").splitlines()[0]
    assert "start with '_' (the first: in/_a/1.jpg), which Spark's listing ignores" in first
    # metrics.json names the first 20 links to nothing and counts them all.
    broken = {"n_broken_links_skipped": 25, "broken_links_skipped": ["in/a/1.jpg"] * 20}
    first = summary({**metrics, **broken}, "out").splitlines()[0]
    assert first.startswith("warning: 25 image files skipped: links to nothing (the first: in/a")


def test_k_larger_than_the_data_is_refused(spark, photos_run):
    """Notebook 02 is where a k too large for an object store's input or a manifest (no
    listing count before featurization) is found: the message says the features stay."""
    with pytest.raises(ParameterError, match="k=1000 is larger than the data allows") as error:
        reduce_features(spark, ReduceParams(output=photos_run["output"], k=1000))
    assert "features/ is kept" in str(error.value) and "--reuse-features" in str(error.value)
    assert len(str(error.value).splitlines()) == 1  # the CLI shows the error's last line


def test_pca_spectrum_matches_numpy_and_repeats(spark, photos_run):
    """Guards the decomposition: Breeze's SVD once gave a wrong spectrum on a cold JVM."""
    from imagepca.reduction import fit_pca

    output = photos_run["output"]
    matrix = np.stack(pd.read_parquet(Path(output) / "features")["features"].to_numpy())
    matrix = matrix.astype(np.float64)
    std = matrix.std(axis=0, ddof=1)
    scaled = (matrix - matrix.mean(axis=0)) / np.where(std > 0, std, 1)
    singular = np.linalg.svd(scaled, compute_uv=False)
    expected = singular**2 / (singular**2).sum()
    first = np.array(photos_run["reduction"].fit.explained_variance)
    np.testing.assert_allclose(first[:50], expected[:50], atol=1e-6)
    # The run's fit used the statistics its featurization accumulated; a pass over
    # features/ gives the same spectrum.
    assert photos_run["reduction"].metrics["pca_statistics"] == "featurization"
    again = fit_pca(spark.read.parquet(f"{output}/features"), k=None, variance=0.9)
    np.testing.assert_allclose(again.explained_variance, first, atol=1e-9)
    assert again.k == photos_run["reduction"].fit.k


def test_statistics_counting_other_images_are_not_kept(spark, tmp_path, monkeypatch):
    """Featurization keeps its statistics only when they count each featurized image once
    (a partition counts once however often its task runs, see test_reduction; here they
    hold a partition the job does not have); otherwise notebook 02 makes its own pass."""
    from imagepca import pipeline
    from imagepca.moments import Moments, PartitionMoments

    for label in ("apple", "banana"):
        (tmp_path / "input" / label).mkdir(parents=True)
        for photo in sorted((FRUIT_PHOTOS / label).glob("*.jpg"))[:4]:
            (tmp_path / "input" / label / photo.name).write_bytes(photo.read_bytes())
    accumulator = pipeline.moments_accumulator

    def counted_twice(session):
        statistics = accumulator(session)
        extra = Moments(2, np.ones(1280), np.zeros((1280, 1280)))  # 2 images more
        statistics.add(PartitionMoments.of(10_000, extra))
        return statistics

    monkeypatch.setattr(pipeline, "moments_accumulator", counted_twice)
    output = tmp_path / "out"
    params = ExtractParams(input=str(tmp_path / "input"), output=str(output), weights=str(WEIGHTS))
    extraction = extract_features(spark, params)
    assert extraction.n_images == 8
    assert extraction.metadata["moments_file"] is None
    assert not (output / "features" / pipeline.MOMENTS_FILE).exists()
    reduction = reduce_features(spark, ReduceParams(output=str(output), k=3))
    assert reduction.metrics["pca_statistics"] == "pass over features/"
    # A fixed k used no threshold: none is recorded.
    assert (
        reduction.metrics["k_mode"] == "fixed" and reduction.metrics["variance_threshold"] is None
    )
