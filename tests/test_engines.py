"""Every featurization engine gives the Keras reference's features on real photos.

The engines are run the way the pipeline runs them: the driver builds the payload
(``load_model_payload``, so the TFLite flatbuffer comes from the per-session
``IMAGEPCA_CACHE``), and the Scalar-Iterator pandas UDF runs it in Spark's Python workers.
The reference is the plain Keras model from :func:`imagepca.features.build_keras_model`
called in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca.config import ENGINES, FEATURE_DIM, ExtractParams
from imagepca.features import (
    ModelPayload,
    TFLiteRunner,
    build_keras_model,
    features_udf,
    load_model_payload,
    staged_models_uri,
    tflite_model,
    tflite_model_path,
)
from imagepca.images import IMAGE_EXTENSIONS, decode_image
from imagepca.storage import Storage
from imagepca.weights import file_sha256

PER_CLASS = 6  # 4 classes (apple, banana, orange, mixed) x 6 = 24 photos


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes]]:
    """24 real photos, evenly spread over each class's sorted files (small and large ones)."""
    chosen = []
    for folder in sorted(p for p in FRUIT_PHOTOS.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for index in np.linspace(0, len(files) - 1, PER_CLASS).round().astype(int):
            chosen.append((f"{folder.name}/{files[index].name}", files[index].read_bytes()))
    assert len(chosen) == 4 * PER_CLASS
    return chosen


@pytest.fixture(scope="module")
def pixels(photos) -> np.ndarray:
    return np.stack([decode_image(data, 224) for _, data in photos]).astype(np.float32)


@pytest.fixture(scope="module")
def reference(pixels) -> np.ndarray:
    model = build_keras_model(224, WEIGHTS)
    return np.asarray(model.predict_on_batch(pixels), dtype=np.float32)


@pytest.fixture(scope="module")
def tflite_runner() -> TFLiteRunner:
    payload = ModelPayload("tflite", 224, file_sha256(WEIGHTS), tflite=tflite_model(WEIGHTS, 224))
    return TFLiteRunner(payload, threads=1)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_keras_reference(spark, photos, reference, engine, tmp_path):
    params = ExtractParams(
        input=str(FRUIT_PHOTOS), output=str(tmp_path / "out"), weights=str(WEIGHTS), engine=engine
    )
    udf = features_udf(spark, params, load_model_payload(params, WEIGHTS))
    frame = spark.createDataFrame(photos, "path string, content binary")
    rows = frame.select("path", udf("content").alias("out")).select("path", "out.*").collect()
    by_path = {row["path"]: row for row in rows}
    assert all(by_path[path]["reason"] is None for path, _ in photos)
    features = np.array([by_path[path]["features"] for path, _ in photos], dtype=np.float32)

    assert features.shape == (len(photos), FEATURE_DIM)
    assert np.abs(features - reference).max() <= 1e-3
    assert cosine(features, reference).min() >= 0.9999
    # Not a vacuous match: the photos' features differ from one another.
    assert cosine(features[:1], features[PER_CLASS : PER_CLASS + 1])[0] < 0.95


def test_fast_decode_changes_features_only_slightly(photos, pixels, tflite_runner):
    fast = np.stack([decode_image(data, 224, fast_decode=True) for _, data in photos])
    assert fast.shape == pixels.shape and fast.dtype == np.uint8
    # Image.draft really engages on the large JPEGs: some inputs differ.
    changed = np.abs(fast.astype(np.float32) - pixels).max(axis=(1, 2, 3)) > 0
    assert changed.sum() >= len(photos) // 4

    similarity = cosine(tflite_runner(fast.astype(np.float32)), tflite_runner(pixels))
    # Measured on these 24 photos: mean ~0.99+ (see docs/performance.md); the issue asks
    # for >= 0.99 on average and every single photo must stay recognisably the same.
    assert similarity.mean() >= 0.99
    assert similarity.min() >= 0.95


def test_image_size_160_gives_finite_1280_features(photos):
    payload = ModelPayload("tflite", 160, file_sha256(WEIGHTS), tflite=tflite_model(WEIGHTS, 160))
    small = np.stack([decode_image(data, 160) for _, data in photos[::4]]).astype(np.float32)
    assert small.shape[1:] == (160, 160, 3)
    features = TFLiteRunner(payload, threads=1)(small)
    assert features.shape == (len(small), FEATURE_DIM)
    assert np.isfinite(features).all() and (features > 0).any()


def test_staged_tflite_model_is_fetched_not_converted(spark, tmp_path, monkeypatch):
    """A fresh cluster node takes the model ``imagepca emr stage`` converted and uploaded
    beside the weights, through Hadoop's FileSystem, instead of converting it again."""
    import tensorflow as tf

    converted = tflite_model_path(WEIGHTS, 224)  # this session's cache
    staged = tmp_path / "artifacts" / "models" / "tflite"
    staged.mkdir(parents=True)
    shutil.copyfile(converted, staged / converted.name)
    monkeypatch.setenv("IMAGEPCA_CACHE", str(tmp_path / "fresh-node-cache"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the staged model should have been used")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_keras_model", no_conversion)
    fetched = tflite_model_path(WEIGHTS, 224, staged=f"file://{staged}", storage=Storage(spark))
    assert fetched.parent == tmp_path / "fresh-node-cache" / "tflite"
    assert fetched.read_bytes() == converted.read_bytes()
    # Nothing staged for this size: conversion is the fallback.
    with pytest.raises(AssertionError, match="staged model"):
        tflite_model_path(WEIGHTS, 160, staged=f"file://{staged}", storage=Storage(spark))
    assert not list((tmp_path / "fresh-node-cache" / "tflite").glob("*160*"))


def test_staged_models_live_beside_remote_weights():
    uri = "s3://bucket/artifacts/0.1.0/models/weights.h5"
    assert staged_models_uri(uri) == "s3://bucket/artifacts/0.1.0/models/tflite"
    assert staged_models_uri("/local/weights.h5") is None
    assert staged_models_uri("imagenet") is None


# A fresh Spark session in its own process: every Python worker it ever has is its own.
FRESH_SESSION_RUN = """
import json, sys
import psutil
from imagepca.config import ExtractParams
from imagepca.features import warm_python_workers
from imagepca.pipeline import extract_features
from imagepca.session import get_spark

def python_workers():  # the daemon and its forks, all below this process
    found = []
    for process in psutil.Process().children(recursive=True):
        try:  # the JVM's short-lived helpers may have ended (or be zombies) by now
            if "pyspark.daemon" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            continue
    return sorted(found)

spark = get_spark("local[2]", conf={"spark.ui.enabled": "false"})
before = python_workers()
started = sorted(warm_python_workers(spark).result(timeout=120))
warm = python_workers()
extraction = extract_features(spark, ExtractParams(input=sys.argv[1], output=sys.argv[2],
                                                   weights=sys.argv[3]))
print(json.dumps({"before": before, "started": started, "warm": warm,
                  "after": python_workers(), "n_images": extraction.n_images}))
"""


def test_featurization_runs_in_the_python_workers_started_beforehand(tmp_path):
    """Notebook 01 starts the Python workers while it shows the sample images: featurization
    then forks none, and runs in workers that have this package imported already."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_SESSION_RUN, str(FRUIT_PHOTOS), str(tmp_path / "out"),
         str(WEIGHTS)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    workers = json.loads(result.stdout.strip().splitlines()[-1])
    assert workers["before"] == []
    assert workers["started"] and set(workers["started"]) <= set(workers["warm"])
    assert workers["after"] == workers["warm"], "featurization forked Python workers of its own"
    n_photos = sum(1 for p in FRUIT_PHOTOS.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert workers["n_images"] == n_photos
