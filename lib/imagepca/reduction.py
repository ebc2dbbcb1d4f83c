"""StandardScaler + PCA as a Spark ML pipeline, with k fixed or chosen by explained variance.

The explained variance of every component is computed once: Spark computes the covariance
matrix of the scaled features (one distributed pass), the driver eigen-decomposes it, and k is
read off the cumulative sum. ``PCA.fit`` would do the same with Breeze's SVD, but on Java 17 its
first call in a JVM returned a wrong spectrum here (first component 3.8% of the variance instead
of 9.5%, later calls and numpy agreeing on 9.5%), so the decomposition is numpy's LAPACK. The
result is an ordinary Spark ``PCAModel`` holding every component, and a ``VectorSlicer`` keeps
the first k, so trying another k needs no refit. The fitted ``PipelineModel`` (scaler, PCA,
slicer) loads with ``PipelineModel.load`` and transforms new features after ``array_to_vector``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.common import _py2java
from pyspark.ml.feature import PCAModel, StandardScaler, VectorSlicer
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import DenseMatrix, DenseVector
from pyspark.mllib.linalg import Vectors as MLlibVectors
from pyspark.mllib.linalg.distributed import RowMatrix
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .config import ParameterError

VECTOR_COL = "features_vector"
SCALED_COL = "scaled"
ALL_COMPONENTS_COL = "pca_all"
PCA_COL = "pca_vector"


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


@dataclass
class PCAFit:
    """A fitted scaler + PCA and the variance spectrum k was chosen from."""

    model: PipelineModel
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


def fit_pca(features: DataFrame, *, k: int | None, variance: float) -> PCAFit:
    """Fit StandardScaler(withMean, withStd) + PCA on ``features`` (array<float> column).

    Parameters
    ----------
    features : DataFrame
        Rows with ``path``, ``label``, ``features``.
    k : int or None
        Components to keep; None picks the smallest k reaching ``variance``.
    variance : float
        Cumulative explained-variance threshold in (0, 1].
    """
    vectors = to_vectors(features).select(VECTOR_COL).persist()
    try:
        first = vectors.first()
        n_features = len(first[VECTOR_COL]) if first else 0
        n_images = vectors.count()
        check_k(k, n_images, n_features)
        scaler = StandardScaler(
            inputCol=VECTOR_COL, outputCol=SCALED_COL, withMean=True, withStd=True
        ).fit(vectors)
        scaled = scaler.transform(vectors).select(SCALED_COL).persist()
        try:
            pca, explained = principal_components(scaled, min(n_images, n_features))
        finally:
            scaled.unpersist()
    finally:
        vectors.unpersist()
    chosen = k or choose_k(np.cumsum(explained), variance)
    first_k = VectorSlicer(
        inputCol=ALL_COMPONENTS_COL, outputCol=PCA_COL, indices=list(range(chosen))
    )
    return PCAFit(
        model=PipelineModel(stages=[scaler, pca, first_k]),
        k=chosen,
        explained_variance=explained,
        n_images=n_images,
        n_features=n_features,
    )


def principal_components(scaled: DataFrame, k: int) -> tuple[PCAModel, list[float]]:
    """A Spark ``PCAModel`` with the first ``k`` components of ``scaled`` (vector column).

    Returns the model and the explained-variance ratios of those k components (all the
    components the data has when k = min(images, features), then summing to 1),
    computed as Spark's ``PCA`` defines it: eigenvalues of the covariance over their sum.
    """
    rows = RowMatrix(scaled.rdd.map(lambda row: MLlibVectors.fromML(row[0])))
    covariance = rows.computeCovariance().toArray()
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.abs(eigenvalues[order])  # rank-deficient data: round-off below zero
    eigenvectors = eigenvectors[:, order[:k]]
    # Fix each component's sign (largest loading positive) so runs are reproducible.
    largest = np.argmax(np.abs(eigenvectors), axis=0)
    eigenvectors *= np.sign(eigenvectors[largest, np.arange(k)])
    explained = eigenvalues / eigenvalues.sum()

    context = scaled.sparkSession.sparkContext
    n_features = covariance.shape[0]
    java_model = context._jvm.org.apache.spark.ml.feature.PCAModel(
        "PCA_imagepca",
        _py2java(context, DenseMatrix(n_features, k, eigenvectors.ravel(order="F").tolist())),
        _py2java(context, DenseVector(explained[:k].tolist())),
    )
    model = PCAModel(java_model)
    model._set(inputCol=SCALED_COL, outputCol=ALL_COMPONENTS_COL, k=k)
    model._transfer_params_to_java()
    return model, explained[:k].tolist()
