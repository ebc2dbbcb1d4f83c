"""MobileNetV2 features (ImageNet weights, classification head removed) on the executors.

The driver resolves the weights (:mod:`imagepca.weights`, failing before any Spark job when
they cannot be had), builds the model once and broadcasts it: Keras weights for the
``keras`` engine, or the same model converted to a TFLite flatbuffer for the ``tflite``
engine (cached on disk, keyed by the weights' hash and the input size). Each Python worker
builds its runner once and keeps it across tasks; a Scalar-Iterator pandas UDF decodes and
featurizes the rows.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark import TaskContext
from pyspark.accumulators import Accumulator, AccumulatorParam
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, StringType, StructField, StructType

from .config import FEATURE_DIM, ExtractParams, cache_dir
from .executor_reads import ReadOptions, read_files
from .images import ImageDecodeError, decode_image
from .moments import MomentsBuilder, PartitionMoments
from .session import default_parallelism, in_background, task_cpus
from .storage import FLOAT_VECTOR, Storage, is_local
from .weights import file_sha256

# Elements that cannot be null: stored as compact Parquet lists (storage.vector_write_settings).
# ``reported``: a rejected row among those its task reports to the driver (rejects.py).
FEATURES_SCHEMA = StructType(
    [
        StructField("features", FLOAT_VECTOR),
        StructField("reason", StringType()),
        StructField("reported", BooleanType()),
    ]
)


def build_keras_model(image_size: int, weights_file: Path | None):
    """MobileNetV2 without its top, global average pooling, preprocessing inside.

    Input: RGB pixels in [0, 255] (float32). ``preprocess_input`` is part of the graph, so
    every engine (and the converted TFLite model) applies exactly MobileNetV2's own
    preprocessing.
    """
    import keras

    base = keras.applications.MobileNetV2(
        include_top=False,
        weights=None,
        pooling="avg",
        input_shape=(image_size, image_size, 3),
    )
    if weights_file is not None:
        base.load_weights(str(weights_file))
    pixels = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    scaled = keras.applications.mobilenet_v2.preprocess_input(pixels)
    return keras.Model(pixels, base(scaled), name=f"mobilenetv2_features_{image_size}")


def tflite_file_name(weights_sha256: str, image_size: int) -> str:
    """A converted model's cache key: weights, input size and the converter's version."""
    from importlib.metadata import version

    # From package metadata: a cache hit never imports TensorFlow (seconds).
    return f"mobilenetv2-{weights_sha256[:16]}-{image_size}-tf{version('tensorflow')}.tflite"


def staged_models_uri(weights: str) -> str | None:
    """Where ``imagepca emr stage`` puts converted models: beside remote weights."""
    if is_local(weights):
        return None
    return weights.rsplit("/", 1)[0] + "/tflite"


def tflite_model(weights_file: Path, image_size: int) -> bytes:
    """The float32 TFLite flatbuffer of the model (see :func:`tflite_model_path`)."""
    return tflite_model_path(weights_file, image_size).read_bytes()


def tflite_model_path(
    weights_file: Path,
    image_size: int,
    *,
    staged: str | None = None,
    storage: Storage | None = None,
) -> Path:
    """The Keras model converted to a float32 TFLite flatbuffer, cached on disk.

    Conversion takes several seconds; the cache key (weights hash, size, TensorFlow
    version) makes it a once-per-machine cost. With ``staged`` (a folder URI read through
    ``storage``), a model converted and uploaded by ``imagepca emr stage`` is fetched
    instead, so a fresh cluster does not convert at all.
    """
    name = tflite_file_name(file_sha256(weights_file), image_size)
    cached = cache_dir() / "tflite" / name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    if staged and storage is not None and storage.exists(f"{staged}/{name}"):
        partial = cached.parent / f".{name}.{os.getpid()}.part"
        storage.copy_to_local(f"{staged}/{name}", str(partial))
        os.replace(partial, cached)
        return cached
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(
        build_keras_model(image_size, weights_file)
    )
    # Keras prints the exported signature (hundreds of TensorSpec lines) into the cell.
    with contextlib.redirect_stdout(io.StringIO()):
        flatbuffer = converter.convert()
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as handle:
        handle.write(flatbuffer)
    os.replace(handle.name, cached)
    return cached


@dataclass(frozen=True)
class ModelPayload:
    """What the driver broadcasts: enough for a worker to rebuild the model offline."""

    engine: str
    image_size: int
    weights_sha256: str
    keras_weights: list | None = None
    tflite: bytes | None = None


def load_model_payload(
    params: ExtractParams, weights_file: Path, storage: Storage | None = None
) -> ModelPayload:
    """Build (or load from cache) the model on the driver, once per run."""
    sha = file_sha256(weights_file)
    if params.engine == "tflite":
        flatbuffer = tflite_model_path(
            weights_file,
            params.image_size,
            staged=staged_models_uri(params.weights),
            storage=storage,
        ).read_bytes()
        return ModelPayload("tflite", params.image_size, sha, tflite=flatbuffer)
    model = build_keras_model(params.image_size, weights_file)
    return ModelPayload("keras", params.image_size, sha, keras_weights=model.get_weights())


# -- executor side -----------------------------------------------------------------------

_RUNNERS: dict[tuple, object] = {}
_RUNNERS_LOCK = threading.Lock()


class KerasRunner:
    """Keras reference engine; oneDNN is switched on before TensorFlow is imported."""

    def __init__(self, payload: ModelPayload, threads: int):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already running in this worker: its pools stay
            pass
        self.model = build_keras_model(payload.image_size, None)
        self.model.set_weights(payload.keras_weights)
        side = payload.image_size
        # One graph for every batch size: predict_on_batch would trace again for each new
        # (tail) batch shape, seconds each.
        self.predict = tf.function(
            lambda pixels: self.model(pixels, training=False),
            input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32)],
        )

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(pixels).numpy()


class TFLiteRunner:
    """TFLite/LiteRT interpreter (XNNPACK), batch 1: the fastest per core on CPUs."""

    def __init__(self, payload: ModelPayload, threads: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # LiteRT not installed: TensorFlow's own copy
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import warnings

            import tensorflow as tf

            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            Interpreter = tf.lite.Interpreter
        self.interpreter = Interpreter(model_content=payload.tflite, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = np.empty((len(pixels), FEATURE_DIM), dtype=np.float32)
        for i in range(len(pixels)):
            self.interpreter.set_tensor(self.input_index, pixels[i : i + 1])
            self.interpreter.invoke()
            out[i] = self.interpreter.get_tensor(self.output_index)[0]
        return out


ENGINE_RUNNERS = {"keras": KerasRunner, "tflite": TFLiteRunner}


def _worker_ids(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    # A worker imports this module (and what featurization runs on) to unpickle it.
    for _ in batches:
        yield pd.DataFrame({"pid": [os.getpid()]})


def warm_python_workers(spark: SparkSession) -> Future:
    """Start a Python worker per core, this module imported, from a thread of its own.

    A session's first pandas UDF job forks its Python workers and imports pandas, pyarrow
    and this package: 1.2 s on a warm JVM here, paid by featurization's first tasks while
    notebook 01 drew its sample figure on idle cores. Spark reuses the workers, so
    featurization finds them started; one that cannot start fails it, with its error.
    The future gives the workers' pids (none on failure)."""
    cores = default_parallelism(spark)
    frame = spark.range(cores, numPartitions=cores).mapInPandas(_worker_ids, "pid long")

    def run() -> set[int]:
        spark.sparkContext.setJobDescription("start the Python workers")
        try:
            return {row["pid"] for row in frame.collect()}
        except Exception as error:  # the featurization that follows reports it
            logging.getLogger(__name__).debug("Python workers not started: %r", error)
            return set()

    return in_background(run)


def get_runner(payload: ModelPayload, threads: int):
    """One runner per Python worker and model, reused by every task the worker runs."""
    key = (payload.engine, payload.image_size, payload.weights_sha256, threads)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            _RUNNERS.clear()
            _RUNNERS[key] = ENGINE_RUNNERS[payload.engine](payload, threads)
        return _RUNNERS[key]


def featurize_batch(
    contents: pd.Series,
    runner,
    *,
    image_size: int,
    batch_size: int,
    fast_decode: bool,
    max_pixels: int,
) -> pd.DataFrame:
    """Decode and featurize one Arrow batch; undecodable images get a reason instead."""
    features: list[np.ndarray | None] = [None] * len(contents)
    reasons: list[str | None] = [None] * len(contents)
    decoded: list[tuple[int, np.ndarray]] = []
    for position, data in enumerate(contents):
        try:
            decoded.append(
                (
                    position,
                    decode_image(data, image_size, fast_decode=fast_decode, max_pixels=max_pixels),
                )
            )
        except ImageDecodeError as error:
            reasons[position] = str(error)
    for start in range(0, len(decoded), batch_size):
        chunk = decoded[start : start + batch_size]
        pixels = np.stack([array for _, array in chunk]).astype(np.float32)
        for (position, _), vector in zip(chunk, runner(pixels), strict=True):
            features[position] = vector
    return pd.DataFrame({"features": features, "reason": reasons})


class MomentsParam(AccumulatorParam):
    """Merges the tasks' :class:`PartitionMoments` on the driver, in their partitions' order."""

    def zero(self, value: PartitionMoments) -> PartitionMoments:
        return PartitionMoments()

    def addInPlace(self, first: PartitionMoments, second: PartitionMoments) -> PartitionMoments:
        return first.add(second)


def moments_accumulator(spark: SparkSession) -> Accumulator:
    """An accumulator for :func:`features_udf`'s ``moments``; ``.value.total()`` is the sum."""
    return spark.sparkContext.accumulator(PartitionMoments(), MomentsParam())


def features_udf(
    spark: SparkSession,
    params: ExtractParams,
    payload: ModelPayload,
    read: ReadOptions | None = None,
    moments: Accumulator | None = None,
    reported_rejects: int | None = None,
):
    """A Scalar-Iterator pandas UDF: ``content`` -> struct(features, reason, reported).

    With ``read``, the UDF's input is ``path`` instead, and the worker reads each file's
    bytes itself (a manifest's URIs, or the new files of an incremental run): a file that
    cannot be read gets the reason why.

    With ``moments``, each task also adds the count, mean and centred Gram matrix of its
    vectors (what the PCA fit needs) to that accumulator while they are in its memory: the
    fit needs no pass over ``features/``. A partition counts once; the caller checks the count.

    ``reported`` marks a task's first ``reported_rejects`` rejected rows (every one when
    None): the same rows however often the task runs.
    """
    broadcast = spark.sparkContext.broadcast(payload)
    threads = task_cpus(spark)
    options = dict(
        image_size=params.image_size,
        batch_size=params.batch_size,
        fast_decode=params.fast_decode,
        max_pixels=params.max_image_pixels,
    )

    @F.pandas_udf(FEATURES_SCHEMA)
    def mobilenet_v2_features(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        runner = get_runner(broadcast.value, threads)
        statistics = MomentsBuilder()
        n_rejected = 0
        for column in batches:
            if read is None:
                out = featurize_batch(column, runner, **options)
            else:
                contents, failures = read_files(column, read)
                out = featurize_batch(pd.Series(contents, dtype=object), runner, **options)
                out["reason"] = [
                    failure or reason
                    for failure, reason in zip(failures, out["reason"], strict=True)
                ]
            rejected = out["reason"].notna()
            out["reported"] = rejected & (
                True if reported_rejects is None
                else rejected.cumsum() + n_rejected <= reported_rejects
            )  # fmt: skip
            n_rejected += int(rejected.sum())
            if moments is not None:
                statistics.add(out["features"][~rejected].tolist())
            yield out
        if moments is not None and statistics.n:
            moments.add(PartitionMoments.of(TaskContext.get().partitionId(), statistics.moments()))

    return mobilenet_v2_features
