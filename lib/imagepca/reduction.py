"""StandardScaler + PCA as a Spark ML pipeline, fitted in one distributed pass.

Both stages need the same statistics of the features: their mean, their standard deviation
and their covariance. One pass computes all three: each Python worker turns its Arrow
batches of ``features`` into float64 matrices and accumulates the batch mean and the
centred Gram matrix ``(X - mean)^T (X - mean)`` with one matrix product (level-3 BLAS);
the partial results are merged with Chan's pairwise formula (exact, and stable for features
whose mean is large next to their spread) in a tree reduce, and the driver eigen-decomposes
the correlation matrix once. No row crosses from the JVM to Python except inside Arrow
batches, and nothing of size n reaches the driver.

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.ml import PipelineModel
from pyspark.ml.common import _py2java
from pyspark.ml.feature import PCAModel, StandardScalerModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import DenseMatrix, DenseVector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import ParameterError

VECTOR_COL = "features_vector"
SCALED_COL = "scaled"
PCA_COL = "pca_vector"
# Rows per Arrow batch while accumulating: 2048 x 1280 float64 = 21 MB per Python worker.
MOMENT_BATCH_ROWS = 2048
MOMENTS_SCHEMA = "n long, mean binary, m2 binary"


def choose_k(cumulative: Sequence[float], variance: float) -> int:
    """Smallest k whose cumulative explained variance reaches ``variance``."""
    cumulative = np.asarray(cumulative, dtype=float)
    # Sums of float ratios can fall a hair short of 1.0: compare with a tolerance.
    reached = np.nonzero(cumulative >= variance - 1e-9)[0]
    return int(reached[0]) + 1 if reached.size else len(cumulative)


def check_k(k: int | None, n_images: int, n_features: int) -> None:
    """Reject a k the data cannot give, before any fitting."""
    if n_images < 2:
        raise ParameterError(
            f"PCA needs at least 2 featurized images, found {n_images}; check the input "
            "folder and the rejected/ report"
        )
    if k is not None and k > min(n_images, n_features):
        raise ParameterError(
            f"k={k} is larger than the data allows: at most min(images, features) = "
            f"min({n_images}, {n_features}) = {min(n_images, n_features)} components"
        )


def to_vectors(features: DataFrame, column: str = "features") -> DataFrame:
    """Arrays of floats (the Parquet contract) to ML vectors (what Spark ML fits on)."""
    return features.withColumn(VECTOR_COL, array_to_vector(F.col(column))).drop(column)


# -- one pass: count, mean and centred Gram matrix ----------------------------------------


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares ``M2 = sum (x - mean)(x - mean)^T``."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> Moments:
        rows = np.asarray(rows, dtype=np.float64)
        mean = rows.mean(axis=0)
        centred = rows - mean
        return cls(len(rows), mean, centred.T @ centred)

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise update: exact, no large-mean cancellation."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2
        m2 += np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, self.mean + delta * (other.n / n), m2)

    @property
    def covariance(self) -> np.ndarray:
        """Sample covariance (divisor n - 1), as Spark's ``StandardScaler`` and ``PCA``."""
        return self.m2 / (self.n - 1)

    def to_bytes(self) -> dict:
        return {"n": self.n, "mean": self.mean.tobytes(), "m2": self.m2.tobytes()}

    @classmethod
    def from_bytes(cls, n: int, mean: bytes, m2: bytes) -> Moments:
        mean_array = np.frombuffer(mean, dtype=np.float64)
        side = len(mean_array)
        return cls(n, mean_array, np.frombuffer(m2, dtype=np.float64).reshape(side, side).copy())


def _batch_rows(column: pa.Array) -> np.ndarray:
    """A list<float> Arrow column of equal-length rows as an (n, d) float64 matrix."""
    values = column.flatten().to_numpy(zero_copy_only=False)
    if len(column) and values.size % len(column):
        raise ValueError("feature vectors of different lengths in one dataset")
    return values.reshape(len(column), -1)


def _partition_moments(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    total = Moments(0, np.zeros(0), np.zeros((0, 0)))
    for batch in batches:
        column = batch.column(0)
        if len(column):
            total = total.merge(Moments.of(_batch_rows(column)))
    if total.n:
        yield pa.RecordBatch.from_pylist([total.to_bytes()])


def feature_moments(features: DataFrame, column: str = "features") -> Moments:
    """:class:`Moments` of an ``array<float>`` column, accumulated on the executors."""
    spark = features.sparkSession
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key, None)
    spark.conf.set(key, str(MOMENT_BATCH_ROWS))
    try:
        partials = features.select(column).mapInArrow(_partition_moments, MOMENTS_SCHEMA).rdd
        # Each partial is d x d float64 (13 MB at d = 1280): past a few partitions they
        # are merged on the executors, so the driver never holds more than a few.
        depth = 2 if partials.getNumPartitions() > 4 else 1
        moments = partials.map(lambda row: Moments.from_bytes(row.n, row.mean, row.m2))
        try:
            return moments.treeReduce(Moments.merge, depth=depth)
        except ValueError:  # no rows at all
            return Moments(0, np.zeros(0), np.zeros((0, 0)))
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)


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

    @property
    def cumulative_variance(self) -> list[float]:
        return np.cumsum(self.explained_variance).tolist()

    @property
    def variance_reached(self) -> float:
        return float(self.cumulative_variance[self.k - 1])

    def transform(self, features: DataFrame) -> DataFrame:
        """``path``, ``label``, ``pca`` (k floats) for a features DataFrame."""
        return reduce_with(self.model, features)


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
    covariance = moments.covariance
    std = np.sqrt(np.clip(np.diag(covariance), 0, None))
    # Spark's scaler maps a constant feature to 0: its row and column of the scaled
    # covariance are zero too.
    inverse = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
    correlation = covariance * inverse[:, None] * inverse[None, :]
    components, explained = principal_axes(correlation, min(moments.n, n_features))
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
    )


def principal_axes(correlation: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` eigenvectors of a covariance matrix and their explained variance.

    The explained-variance ratios are Spark's ``PCA``'s: eigenvalues over their sum, so
    with k = min(images, features) they sum to 1. Each component's sign is fixed (largest
    loading positive) so that runs are reproducible.
    """
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
        _py2java(context, DenseMatrix(n_features, k, components.ravel(order="F").tolist())),
        _py2java(context, DenseVector(np.asarray(explained[:k]).tolist())),
    )
    model = PCAModel(java_model)
    model._set(inputCol=SCALED_COL, outputCol=PCA_COL, k=k)
    model._transfer_params_to_java()
    return model


def first_components(spark: SparkSession, components: PCAModel, k: int) -> PCAModel:
    """The first ``k`` of a ``PCAModel``'s components (e.g. of ``pca_components/``)."""
    matrix = components.pc.toArray()
    return pca_model(spark, matrix[:, :k], components.explainedVariance.toArray())
