"""StandardScaler + PCA as a Spark ML pipeline, fitted from one pass's statistics.

Both stages need the same statistics of the features: their mean, their standard deviation
and their covariance (:mod:`imagepca.moments`). Featurization usually sums them as it goes
(``features/_moments.npz``); otherwise one pass computes all three: each Python worker
accumulates the centred Gram matrix of its Arrow batches with one float64 matrix product per
batch, the per-partition results are merged on the executors (a tree of ``mapInArrow``
merges). The driver eigen-decomposes the correlation matrix once. No row crosses from the
JVM to Python except inside Arrow batches, and nothing of size n reaches the driver.

Spark's own ``StandardScaler.fit`` + ``PCA.fit`` would take two passes, send every row
through a ``RowMatrix`` of Python objects, and decompose with Breeze's SVD, which on Java 17
returned a wrong spectrum on a cold JVM here (first component 3.8% of the variance instead
of 9.5%). The result is still made of ordinary Spark ML stages, a ``StandardScalerModel``
and a ``PCAModel``, built from these statistics: ``PipelineModel.load`` reads it back and
transforms new features after ``array_to_vector``.

``pca_model`` projects onto the k chosen components only. Every component is kept in
:attr:`PCAFit.components`, saved as ``pca_components/`` (a ``PCAModel``), so another k
(notebook 03's sweep) needs no refit and no second extraction.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.ml import PipelineModel
from pyspark.ml.common import _py2java
from pyspark.ml.feature import PCAModel, StandardScalerModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import DenseMatrix, DenseVector, MatrixUDT, VectorUDT
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_type
from pyspark.sql.types import StringType, StructField, StructType
from threadpoolctl import threadpool_limits

from .config import ParameterError, max_components
from .images import InputError
from .moments import (
    MOMENTS_SCHEMA,
    SAMPLE_SCHEMA,
    ListsParam,
    Moments,
    merge_partials,
    merged_rows,
    partition_moments,
    projector,
)
from .session import ARROW_BATCH_KEY, in_background, java_doubles, spark_settings
from .storage import FLOAT_VECTOR, Storage, join, literal

VECTOR_COL = "features_vector"
SCALED_COL = "scaled"
PCA_COL = "pca_vector"
# Rows per Arrow batch when a worker turns them into float64 (accumulating, projecting):
# 2048 x 1280 x 8 bytes = 21 MB per Python worker.
FLOAT64_BATCH_ROWS = 2048
# PCAFit.projector's function: Arrow batches of features to batches of their scores.
Projection = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]
REDUCED_SCHEMA = StructType(
    [
        StructField("path", StringType()),
        StructField("label", StringType()),
        StructField("pca", FLOAT_VECTOR),
    ]
)
# The models' saves still running, by output (see save_models).
_model_saves: dict[str, Future] = {}
# Decompositions started before the fit (see decompose_ahead), by their statistics' digest.
_decompositions: dict[str, Future] = {}


def choose_k(cumulative: Sequence[float], variance: float) -> int:
    """Smallest k whose cumulative explained variance reaches ``variance``."""
    cumulative = np.asarray(cumulative, dtype=float)
    # Sums of float ratios can fall a hair short of 1.0: compare with a tolerance.
    reached = np.nonzero(cumulative >= variance - 1e-9)[0]
    return int(reached[0]) + 1 if reached.size else len(cumulative)


def check_k(k: int | None, n_images: int, n_features: int, *, then: str = "") -> None:
    """Reject a k the data cannot give, before any fitting (``then``: what to do next)."""
    if n_images < 2:
        raise ParameterError(
            f"PCA needs at least 2 featurized images, found {n_images}; check the input "
            "folder and the rejected/ report"
        )
    most = max_components(n_images, n_features)
    if k is not None and k > most:
        raise ParameterError(
            f"k={k} is larger than the data allows: at most min(images - 1, features) = "
            f"min({n_images - 1}, {n_features}) = {most} components carry variance"
            + (f"; {then}" if then else "")
        )


def to_vectors(features: DataFrame, column: str = "features") -> DataFrame:
    """Arrays of floats (the Parquet contract) to ML vectors (what Spark ML fits on)."""
    return features.withColumn(VECTOR_COL, array_to_vector(F.col(column))).drop(column)


# -- one pass: count, mean and centred Gram matrix ---------------------------------------


def feature_moments(features: DataFrame, column: str = "features") -> Moments:
    """:class:`Moments` of an ``array<float>`` column, accumulated on the executors.

    One partial per partition (``d x d`` float64, 13 MB at d = 1280); past a few
    partitions they are merged on the executors, runs of about a square root of them at a
    time, so the driver never holds more than a few. Every merge goes in the partitions'
    order: the same input, partitioned alike, gives the same bits.
    """
    spark = features.sparkSession
    with spark_settings(spark, {ARROW_BATCH_KEY: str(FLOAT64_BATCH_ROWS)}):
        partials = features.select(column).mapInArrow(partition_moments, MOMENTS_SCHEMA)
        count, span = features.rdd.getNumPartitions(), 1  # span: partitions a row covers
        while count > 4:
            fanout = math.isqrt(count - 1) + 1
            span, count = span * fanout, -(-count // fanout)
            groups = F.floor(F.col("part") / span)  # runs of consecutive partitions
            partials = partials.repartition(count, groups).mapInArrow(
                merge_partials(span), MOMENTS_SCHEMA
            )
        return merged_rows(partials.collect())


# -- the fit ------------------------------------------------------------------------------


@dataclass
class PCAFit:
    """A fitted scaler + PCA, every component, and the spectrum k was chosen from."""

    model: PipelineModel
    components: PCAModel
    k: int
    explained_variance: list[float]
    n_images: int
    n_features: int
    # The model's numbers as numpy arrays (reading them back from the JVM costs a py4j
    # conversion of the d x k matrix): the scaler's mean and std, the k chosen components.
    mean: np.ndarray
    std: np.ndarray
    chosen_components: np.ndarray

    @property
    def cumulative_variance(self) -> list[float]:
        return np.cumsum(self.explained_variance).tolist()

    @property
    def variance_reached(self) -> float:
        return float(self.cumulative_variance[self.k - 1])

    def projector(self, sample: ProjectionSample | None = None) -> Projection:
        """The function projecting ``path``, ``label``, ``features`` Arrow batches to ``path``,
        ``label``, ``pca`` (k floats), with one matrix product per batch: what
        :func:`reduce_with` gives with :attr:`model`. It also fills ``sample``."""
        # Derived here, on the driver: the workers' module stays free of pyspark imports.
        scores_type = to_arrow_type(REDUCED_SCHEMA["pca"].dataType)
        return projector(
            self.mean, self.std, self.chosen_components, scores_type,
            sample and (sample.accumulator, sample.fraction),
        )  # fmt: skip

    def transform(self, features: DataFrame, sample: ProjectionSample | None = None) -> DataFrame:
        """``path``, ``label``, ``pca`` for a features DataFrame (:meth:`projector` in the
        Python workers). A job over it also fills ``sample``."""
        project = self.projector(sample)
        return features.select("path", "label", "features").mapInArrow(project, REDUCED_SCHEMA)


class ProjectionSample:
    """The projection plot's points, kept by the Python workers as they project: the
    ``size`` images of smallest :func:`imagepca.moments.sample_key` (all, when there are
    fewer), whatever the partitioning, without a second pass over ``reduced/``.

    The workers keep a share of the rows a little above ``size / n_images``, as Arrow
    batches: the driver holds about 1.1 ``size`` rows, however many images there are.
    """

    def __init__(self, spark: SparkSession, size: int, n_images: int):
        self.size = size
        self.fraction = min(1.0, (1.1 * size + 16) / max(n_images, 1))
        self.accumulator = spark.sparkContext.accumulator([], ListsParam())

    def points(self) -> pd.DataFrame:
        """``label``, ``pc1``, ``pc2`` (null when k = 1) of the sampled images, a row each
        (a task that ran twice added its rows twice)."""
        kept = pa.Table.from_batches(self.accumulator.value, schema=SAMPLE_SCHEMA).to_pandas()
        kept = kept.drop_duplicates("path").sort_values(["key", "path"]).head(self.size)
        return kept[["label", "pc1", "pc2"]].reset_index(drop=True)


def reduce_with(model: PipelineModel, features: DataFrame) -> DataFrame:
    """Apply a fitted (or reloaded) pipeline to features stored as float arrays."""
    projected = model.transform(to_vectors(features))
    return projected.select("path", "label", vector_to_array(PCA_COL, "float32").alias("pca"))


def fit_pca(
    features: DataFrame, *, k: int | None, variance: float, moments: Moments | None = None
) -> PCAFit:
    """Fit StandardScaler(withMean, withStd) + PCA on ``features`` (array<float> column).

    Parameters
    ----------
    features : DataFrame
        Rows with a ``features`` column of equal-length float arrays.
    k : int or None
        Components to keep; None picks the smallest k reaching ``variance``.
    variance : float
        Cumulative explained-variance threshold in (0, 1].
    moments : Moments, optional
        Statistics already computed for ``features`` (skips the pass).
    """
    moments = moments or feature_moments(features)
    n_features = len(moments.mean)
    check_k(k, moments.n, n_features)
    if not np.any(np.diag(moments.m2) > 0):  # no variance: every ratio would be 0 / 0
        raise InputError(
            f"the {moments.n} featurized images all have the same features, so there is no "
            "variance for a PCA to explain: are they copies of one image? Add images that differ"
        )
    started = _decompositions.pop(_digest(moments), None)
    std, components, explained = started.result() if started else decompose(moments)
    chosen = k or choose_k(np.cumsum(explained), variance)
    spark = features.sparkSession
    scaler = standard_scaler_model(spark, moments.mean, std)
    return PCAFit(
        model=PipelineModel(stages=[scaler, pca_model(spark, components[:, :chosen], explained)]),
        components=pca_model(spark, components, explained),
        k=chosen,
        explained_variance=explained.tolist(),
        n_images=moments.n,
        n_features=n_features,
        mean=moments.mean,
        std=std,
        chosen_components=components[:, :chosen],
    )


def decompose(moments: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scaler's standard deviations, then every principal axis of the standardized
    features and its explained-variance ratio (:func:`principal_axes`)."""
    covariance = moments.covariance
    std = np.sqrt(np.clip(np.diag(covariance), 0, None))
    # Spark's scaler maps a constant feature to 0: its row and column of the scaled
    # covariance are zero too.
    inverse = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
    correlation = covariance * inverse[:, None] * inverse[None, :]
    return std, *principal_axes(correlation, min(moments.n, len(moments.mean)))


def decompose_ahead(moments: Moments) -> None:
    """Start :func:`decompose` on ``moments`` on a thread of its own; return at once.

    The decomposition depends on the statistics alone, not on k. Notebook 01 starts it as
    soon as featurization has summed them: its writes (the driver waiting on Spark) and the
    kernel's move to notebook 02 go on beside it, and :func:`fit_pca` in the same process
    takes the result (a 1280 x 1280 ``eigh``, 0.4-0.6 s of a core, every run). A fit in
    another process, or on other statistics, decomposes its own.
    """
    _decompositions.clear()  # the last one only: 26 MB at d = 1280
    if moments.n >= 2:  # the fit refuses fewer rows (check_k)
        _decompositions[_digest(moments)] = in_background(decompose, moments)


def _digest(moments: Moments) -> str:
    """The same for the statistics featurization summed and for their ``.npz`` copy."""
    digest = hashlib.sha256(str(moments.n).encode())
    digest.update(np.ascontiguousarray(moments.mean, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(moments.m2, dtype=np.float64).tobytes())
    return digest.hexdigest()


# -- reading a fitted model back as arrays ------------------------------------------------

SCALER_CLASS = "org.apache.spark.ml.feature.StandardScalerModel"
PCA_CLASS = "org.apache.spark.ml.feature.PCAModel"
# What Spark ML's writers store in a model's data/ folder (one row, one Parquet file).
_SCALER_DATA = StructType([StructField("std", VectorUDT()), StructField("mean", VectorUDT())])
# The PCA's row read as the structs those types are stored as (MatrixUDT.sqlType()): its
# 1280 x 1280 matrix then reaches Python through Arrow, not py4j's pickler (warm JVM,
# 10,000-image run's output: 0.44 s against 0.83-1.1 s).
_PCA_DATA = StructType(
    [
        StructField("pc", MatrixUDT.sqlType()),
        StructField("explainedVariance", VectorUDT.sqlType()),
    ]
)


@dataclass(frozen=True)
class StoredPCA:
    """Notebook 02's scaler and PCA as numpy arrays: what notebook 03 needs of them."""

    mean: np.ndarray
    std: np.ndarray
    k: int
    components: np.ndarray  # every component, d x min(images, features)
    explained_variance: np.ndarray  # of every component

    def scores(self, features: np.ndarray, k: int | None) -> np.ndarray:
        """Standardized ``features`` (k None), or their first ``k`` PCA scores, in float64:
        what the saved scaler then ``PCAModel`` compute."""
        inverse = np.divide(1.0, self.std, out=np.zeros_like(self.std), where=self.std > 0)
        scaled = (np.asarray(features, dtype=np.float64) - self.mean) * inverse
        return scaled if k is None else scaled @ self.components[:, :k]

    def coefficients_on(self, coefficients: np.ndarray, k: int | None) -> np.ndarray:
        """Linear coefficients on the first ``k`` (:attr:`k`) scores, carried to the first
        ``k`` scores (None: the standardized features) with the same values of their
        products wherever ``k`` reaches :attr:`k`: zeros past :attr:`k`, dropped past ``k``."""
        if k is None:
            return coefficients @ self.components[:, : self.k].T
        carried = np.zeros((coefficients.shape[0], k))
        carried[:, : min(k, self.k)] = coefficients[:, : min(k, self.k)]
        return carried


def read_pca(spark: SparkSession, output: str) -> StoredPCA:
    """``OUTPUT/pca_model`` (scaler, k) and ``OUTPUT/pca_components`` (every component).

    The values are those ``PipelineModel.load`` and ``PCAModel.load`` give, read from the
    same files in two small Spark jobs: Spark ML's loaders run about ten jobs for these two
    models (a text job per metadata file, a schema job and a read job per data folder) and
    hand the component matrix to Python through py4j, several seconds of a small run. The
    metadata files are JSON (Spark writes each as ``metadata/part-00000``); the data are
    read with the schema Spark ML wrote, so no schema inference job either.

    Raises
    ------
    ValueError
        When ``pca_model`` is not this project's ``StandardScaler -> PCA`` pipeline.
    """
    storage = Storage(spark)
    model_uri = join(output, "pca_model")
    stage_uids = storage.read_json(join(model_uri, "metadata", "part-00000"))["paramMap"][
        "stageUids"
    ]
    # A PipelineModel stores its i-th stage under stages/{i}_{uid}.
    stage_uris = [join(model_uri, "stages", f"{i}_{uid}") for i, uid in enumerate(stage_uids)]
    stages = [storage.read_json(join(uri, "metadata", "part-00000")) for uri in stage_uris]
    if [stage["class"] for stage in stages] != [SCALER_CLASS, PCA_CLASS]:
        raise ValueError(
            f"{model_uri} is not a pca_model of this project (StandardScaler -> PCA): "
            "re-run notebook 02"
        )
    scaler = spark.read.schema(_SCALER_DATA).parquet(literal(join(stage_uris[0], "data"))).head()
    pca = (
        spark.read.schema(_PCA_DATA)
        .parquet(literal(join(output, "pca_components", "data")))
        .select("pc.*", F.col("explainedVariance.values").alias("explained_variance"))
        .toPandas()
        .iloc[0]
    )
    if pca["type"] != 1:  # Spark's PCA always stores a DenseMatrix
        raise ValueError(
            f"{join(output, 'pca_components')} holds no dense matrix: re-run notebook 02"
        )
    matrix = DenseMatrix(pca["numRows"], pca["numCols"], pca["values"], pca["isTransposed"])
    return StoredPCA(
        mean=scaler["mean"].toArray(),
        std=scaler["std"].toArray(),
        k=int(stages[1]["paramMap"]["k"]),
        components=matrix.toArray(),
        explained_variance=np.asarray(pca["explained_variance"], dtype=np.float64),
    )


def principal_axes(correlation: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` eigenvectors of a covariance matrix and their explained variance.

    The explained-variance ratios are Spark's ``PCA``'s: eigenvalues over their sum, so
    with k = min(images, features) they sum to 1. Each component's sign is fixed (largest
    loading positive) so that runs are reproducible.

    One BLAS thread: the driver shares its cores with Spark (and, on a laptop, with
    everything else), and OpenBLAS's spinning threads then take 5 to 8 s for this 1280 x
    1280 ``eigh`` instead of 0.5 s on one thread (measured on this 2-core machine under
    load; idle, the two take 0.2-0.4 s).
    """
    with threadpool_limits(1):
        eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.abs(eigenvalues[order])  # rank-deficient data: round-off below zero
    eigenvectors = eigenvectors[:, order[:k]]
    largest = np.argmax(np.abs(eigenvectors), axis=0)
    eigenvectors *= np.sign(eigenvectors[largest, np.arange(k)])
    return eigenvectors, (eigenvalues / eigenvalues.sum())[:k]


def standard_scaler_model(
    spark: SparkSession, mean: np.ndarray, std: np.ndarray
) -> StandardScalerModel:
    """A Spark ``StandardScalerModel(withMean, withStd)`` holding ``mean`` and ``std``."""
    context = spark.sparkContext
    java_model = context._jvm.org.apache.spark.ml.feature.StandardScalerModel(
        "StandardScaler_imagepca",
        _py2java(context, DenseVector(std.tolist())),
        _py2java(context, DenseVector(mean.tolist())),
    )
    model = StandardScalerModel(java_model)
    model._set(inputCol=VECTOR_COL, outputCol=SCALED_COL, withMean=True, withStd=True)
    model._transfer_params_to_java()
    return model


def pca_model(spark: SparkSession, components: np.ndarray, explained: np.ndarray) -> PCAModel:
    """A Spark ``PCAModel`` projecting ``scaled`` onto the columns of ``components``."""
    context = spark.sparkContext
    n_features, k = components.shape
    java_model = context._jvm.org.apache.spark.ml.feature.PCAModel(
        "PCA_imagepca",
        # Column-major, as Spark stores a DenseMatrix; through a file, not py4j's text.
        context._jvm.org.apache.spark.ml.linalg.DenseMatrix(
            n_features, k, java_doubles(spark, np.ravel(components, order="F"))
        ),
        _py2java(context, DenseVector(np.asarray(explained[:k], dtype=np.float64))),
    )
    model = PCAModel(java_model)
    model._set(inputCol=SCALED_COL, outputCol=PCA_COL, k=k)
    model._transfer_params_to_java()
    return model


# -- the models' saves ---------------------------------------------------------------------


def save_models(
    spark: SparkSession, storage: Storage, output: str, fit: PCAFit, layout: dict[str, str]
) -> None:
    """Start publishing ``pca_model/`` and ``pca_components/``; return at once.

    Spark ML's saves are a dozen small jobs, one after the other. Beside ``reduced/``'s
    write, whose tasks hold every core, each of them waited for a core, and the last ones
    ran after that write (0.9 s at 10,000 images). On threads of their own they run past
    it, while notebook 02 draws its plots; :func:`wait_for_models` (in
    :func:`imagepca.pipeline.finish_run`) waits for them before the run completes. They
    write through a session of their own holding ``layout``
    (:func:`imagepca.storage.vector_write_settings`), whatever the notebook's has by then.
    """
    wait_for_models(output, check=False)  # an earlier call's, into the same output
    session = spark.newSession()
    for key, value in layout.items():
        session.conf.set(key, value)
    jvm_sessions = spark.sparkContext._jvm.org.apache.spark.sql.SparkSession

    def in_session(save: Callable[[str], None]) -> Callable[[str], None]:
        def write(uri: str) -> None:
            # Spark ML's writers (a pipeline's stages' too) use the thread's active session.
            jvm_sessions.setActiveSession(session._jsparkSession)
            try:
                save(uri)
            finally:
                jvm_sessions.clearActiveSession()

        return write

    _model_saves[output] = in_background(
        storage.publish_all,
        output,
        {
            "pca_model": in_session(fit.model.save),
            "pca_components": in_session(fit.components.save),
        },
    )


def wait_for_models(output: str, *, check: bool = True) -> float | None:
    """Wait for :func:`save_models`'s saves into ``output``, if any are running; the seconds
    waited. A failed save raises its error here (with ``check``)."""
    pending = _model_saves.pop(output, None)
    if pending is None:
        return None
    start = time.perf_counter()
    try:
        pending.result()
    except Exception:
        if check:
            raise
    return round(time.perf_counter() - start, 3)
