"""Spark's multinomial logistic regression, fitted on the driver when the data fits there.

Spark ML's ``LogisticRegression`` runs one Spark job per optimizer iteration: 100 jobs per
fit, each with its scheduling cost, for a training set of a few thousand rows that numpy
holds in megabytes. scipy's L-BFGS-B minimizes the same objective in one process:

    mean log-loss + reg_param / 2 * ||W||^2      (intercepts not penalized)

which is Spark's with ``family="multinomial"``, ``elasticNetParam=0`` and
``standardization=False``; in scikit-learn's terms ``C = 1 / (n * reg_param)``. The fitted
coefficients become an ordinary Spark ``LogisticRegressionModel`` (multinomial, centred
intercepts, as Spark stores them), so the saved ``classifier_model/`` is the same kind of
``PipelineModel`` as before and transforms DataFrames on any cluster.

Scores come from the confusion matrix alone, so a driver fit (numpy predictions) and a
Spark fit (a ``groupBy`` over the predictions) are scored by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.common import _py2java
from pyspark.ml.feature import IndexToString, StringIndexerModel
from pyspark.ml.linalg import DenseMatrix, DenseVector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from threadpoolctl import ThreadpoolController

FLOAT64_BYTES = 8
# Training matrices from this many values (n x d) up have their two matrix products per
# evaluation run on the BLAS pool (every core by default): fits of 3,750 x 1,280 and
# 7,500 x 521 (60 classes) 1.4x and 1.7x faster on 2 cores, coefficients equal to 1e-6
# (another summation order). Smaller ones stay on one thread, where waking a pool costs
# more than it gives.
PARALLEL_PRODUCT_VALUES = 1_000_000
LABEL_INDEX_COL = "label_index"
PREDICTION_COL = "prediction"
PREDICTED_LABEL_COL = "predicted_label"


def fits_on_driver(n_rows: int, n_dims: int, max_mb: int) -> bool:
    """Whether an ``n_rows x n_dims`` float64 training matrix stays within ``max_mb``."""
    return n_rows * n_dims * FLOAT64_BYTES <= max_mb * 2**20


def blas_pool_size(pools: ThreadpoolController | None = None) -> int:
    """The BLAS pool's size: every core, or what ``OPENBLAS_NUM_THREADS`` and the like say."""
    pools = pools or ThreadpoolController()
    return max((pool["num_threads"] for pool in pools.select(user_api="blas").info()), default=1)


def uses_blas_pool(n_rows: int, n_dims: int) -> bool:
    """Whether :func:`fit_multinomial` runs this training matrix's products on every core.

    Fits that don't can run side by side, one per core (:mod:`imagepca.classify`'s sweep).
    """
    return n_rows * n_dims >= PARALLEL_PRODUCT_VALUES


# A diagnostic fit stops when its objective fell by less than its flat_tol over this many
# iterations: single L-BFGS steps alternate small and large decreases.
FLAT_WINDOW = 10


class MultinomialFit(NamedTuple):
    coefficients: np.ndarray  # n_classes x d, float64
    intercepts: np.ndarray  # centred, as Spark stores them
    iterations: int


def fit_multinomial(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    reg_param: float,
    max_iter: int,
    tol: float = 1e-6,
    dtype: type = np.float64,
    start: tuple[np.ndarray, np.ndarray] | None = None,
    flat_tol: float | None = None,
) -> MultinomialFit:
    """Coefficients (``n_classes x d``) and intercepts minimizing Spark's objective.

    ``y`` holds class indices ``0 .. n_classes - 1``, each present at least once. The
    minimizer is scipy's L-BFGS-B from zero, with scikit-learn's settings for its
    ``lbfgs`` solver (``gtol=tol``, ``ftol=64 eps``, 50 line-search steps, ``max_iter``
    iterations): the optimum scikit-learn's ``LogisticRegression(C=1 / (n * reg_param))``
    reaches, without importing scikit-learn (1 to 2 s of notebook 03 here). With two
    classes the penalized multinomial optimum is the symmetric ``[-w/2, w/2]``, as Spark's.

    ``dtype=np.float32`` does the matrix products (the coefficients' gradient among them)
    and the softmax in single precision; the loss and the intercepts' gradient are still
    summed in float64: 1.6x to 1.8x faster on the fits of notebook 03, which uses it for
    every fit. Its iterates differ from float64's in the digits float32 does not keep (the
    features are float32 to begin with); the minimum reached and the predictions are the
    same to what a test set can tell (see :data:`imagepca.classify.PRODUCTS_DTYPE`).

    ``start`` (coefficients, intercepts) replaces the zero starting point, and ``flat_tol``
    stops the fit once its objective has fallen by less than that fraction over the last
    :data:`FLAT_WINDOW` iterations: notebook 03's diagnostics start from the saved
    classifier, already near their optimum, and stop where the objective has flattened
    instead of spending every iteration of ``max_iter`` (see
    :data:`imagepca.classify.DIAGNOSTIC_FLAT_TOL`). Neither changes the objective.
    """
    from scipy.optimize import minimize

    x = np.ascontiguousarray(x, dtype=dtype)
    y = np.asarray(y, dtype=np.int64)
    if len(np.unique(y)) != n_classes:
        raise ValueError(f"every one of the {n_classes} classes needs a training row")
    n, d = x.shape
    rows = np.arange(n)
    pools = ThreadpoolController()
    product_threads = blas_pool_size(pools) if uses_blas_pool(n, d) else 1
    # Every evaluation works in the same n x classes array instead of fresh ones, which
    # cost page faults (the 1280-d comparison on 3,752 rows, 60 classes, three alternating
    # pairs: 3.6 -> 3.25 s per fit, median; a 5-component fit 0.31 -> 0.29 s).
    buffer = np.empty((n, n_classes), dtype=dtype)
    coefficient_gradient = np.empty((n_classes, d), dtype=dtype)

    def loss_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights = w.reshape(n_classes, d + 1)
        coefficients, intercepts = weights[:, :d], weights[:, d]
        margins = probabilities = buffer  # the margins, then the softmax in their place
        with pools.limit(limits=product_threads, user_api="blas"):
            np.matmul(x, coefficients.T.astype(dtype, copy=False), out=margins)
        margins += intercepts.astype(dtype, copy=False)  # with float64 ones: 4x slower
        margins -= margins.max(axis=1, keepdims=True)
        true_margins = margins[rows, y]
        np.exp(margins, out=probabilities)
        sums = probabilities.sum(axis=1)
        loss = float(np.mean(np.log(sums) - true_margins, dtype=np.float64))
        loss += 0.5 * reg_param * float(np.sum(coefficients * coefficients))
        probabilities /= sums[:, None]
        residual = probabilities
        residual[rows, y] -= 1.0
        residual /= n
        with pools.limit(limits=product_threads, user_api="blas"):
            np.matmul(residual.T, x, out=coefficient_gradient)
        gradient = np.empty_like(weights)
        gradient[:, :d] = coefficient_gradient + reg_param * coefficients
        gradient[:, d] = residual.sum(axis=0, dtype=np.float64)
        return loss, gradient.ravel()

    start_weights = np.zeros((n_classes, d + 1))
    if start is not None:
        start_weights[:, :d], start_weights[:, d] = start
    objectives: list[float] = []

    def stop_when_flat(intermediate_result) -> None:
        objectives.append(intermediate_result.fun)
        if len(objectives) > FLAT_WINDOW:
            before = objectives[-1 - FLAT_WINDOW]
            if before - objectives[-1] <= flat_tol * abs(before):
                raise StopIteration  # scipy returns the current iterate

    # The optimizer's own steps on one thread: its level-1 BLAS on short vectors is slower
    # with a pool (a 3,750 x 20, 60-class fit: 3.3 s with the default pools everywhere,
    # 0.4 s with one thread; 7,500 x 521: 6.3 s against 3.6 s).
    with pools.limit(limits=1, user_api="blas"):
        # Spark stops at maxIter without a warning too; max_iter is the user's budget.
        result = minimize(
            loss_gradient,
            start_weights.ravel(),
            method="L-BFGS-B",
            jac=True,
            callback=stop_when_flat if flat_tol is not None else None,
            options={
                "maxiter": max_iter,
                "maxls": 50,
                "gtol": tol,
                "ftol": 64 * np.finfo(float).eps,
            },
        )
    weights = result.x.reshape(n_classes, d + 1)
    intercepts = weights[:, d]
    return MultinomialFit(weights[:, :d].copy(), intercepts - intercepts.mean(), int(result.nit))


def predict(coefficients: np.ndarray, intercepts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class indices, as Spark's model predicts them (argmax of the margins)."""
    return np.argmax(np.asarray(x, dtype=np.float64) @ coefficients.T + intercepts, axis=1)


def spark_params(
    *, features_col: str, label_col: str, prediction_col: str, reg_param: float, max_iter: int
) -> dict:
    """Spark ``LogisticRegression`` parameters whose objective :func:`fit_multinomial` solves.

    ``standardization=False``: the inputs are already on purpose-made scales (standardized
    features, or PCA scores whose variance says how much each component matters);
    re-standardizing the scores would give the low-variance (noise) components the same
    weight under the penalty.
    """
    return {
        "featuresCol": features_col,
        "labelCol": label_col,
        "predictionCol": prediction_col,
        "family": "multinomial",
        "regParam": reg_param,
        "maxIter": max_iter,
        "standardization": False,
    }


def spark_model(
    spark: SparkSession, coefficients: np.ndarray, intercepts: np.ndarray, **params
) -> LogisticRegressionModel:
    """A Spark ``LogisticRegressionModel`` (multinomial) holding the given coefficients;
    ``params`` are :func:`spark_params`'s keywords."""
    context = spark.sparkContext
    n_classes, n_dims = coefficients.shape
    matrix = DenseMatrix(n_classes, n_dims, np.ravel(coefficients, order="F"))
    java_model = context._jvm.org.apache.spark.ml.classification.LogisticRegressionModel(
        "LogisticRegression_imagepca",
        _py2java(context, matrix),
        _py2java(context, DenseVector(np.asarray(intercepts, dtype=float))),
        n_classes,
        True,
    )
    model = LogisticRegressionModel(java_model)
    model._set(**spark_params(**params))
    model._transfer_params_to_java()
    return model


def label_indexer(labels: Sequence[str]) -> StringIndexerModel:
    """Label strings to indices 0..n-1 in alphabetical order (stable across runs)."""
    return StringIndexerModel.from_labels(
        sorted(labels), inputCol="label", outputCol=LABEL_INDEX_COL, handleInvalid="error"
    )


def classifier_pipeline(indexer: StringIndexerModel, regression) -> PipelineModel:
    """Label indexer -> logistic regression -> label strings: what ``predict`` applies.

    Its indexer keeps labels it has not seen (and nulls) instead of failing: the model
    predicts new images, whose folders need not be its classes.
    """
    to_label = IndexToString(
        inputCol=PREDICTION_COL, outputCol=PREDICTED_LABEL_COL, labels=list(indexer.labels)
    )
    lenient = indexer.copy().setHandleInvalid("keep")
    return PipelineModel(stages=[lenient, regression, to_label])


def spark_regression(features_col: str, *, max_iter: int, reg_param: float):
    """Spark's distributed multinomial ``LogisticRegression`` (for training sets too large
    for the driver); the same objective :func:`fit_multinomial` solves."""
    return LogisticRegression(
        **spark_params(
            features_col=features_col,
            label_col=LABEL_INDEX_COL,
            prediction_col=PREDICTION_COL,
            reg_param=reg_param,
            max_iter=max_iter,
        )
    )


def fit_distributed(
    train: DataFrame,
    test: DataFrame,
    indexer: StringIndexerModel,
    *,
    features_col: str,
    max_iter: int,
    reg_param: float,
) -> tuple[PipelineModel, np.ndarray, pd.DataFrame, float]:
    """Fit :func:`spark_regression` on ``train`` (for training sets too large for the
    driver) and test it on ``test``: the model (:func:`classifier_pipeline`), the test
    confusion matrix, up to 1000 misclassified test images and the fit's seconds."""
    start = time.perf_counter()
    fitted = Pipeline(
        stages=[indexer, spark_regression(features_col, max_iter=max_iter, reg_param=reg_param)]
    ).fit(train)
    fit_s = round(time.perf_counter() - start, 3)
    model = classifier_pipeline(indexer, fitted.stages[1])
    predicted = model.transform(test).persist()
    try:
        counts = predicted.groupBy(LABEL_INDEX_COL, PREDICTION_COL).count().collect()
        misclassified = (
            predicted.filter(F.col("label") != F.col(PREDICTED_LABEL_COL))
            .select("path", "label", PREDICTED_LABEL_COL)
            .orderBy("label", "path")
            .limit(1000)
            .toPandas()
        )
    finally:
        predicted.unpersist()
    n_classes = len(indexer.labels)
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for row in counts:
        matrix[int(row[LABEL_INDEX_COL]), int(row[PREDICTION_COL])] += row["count"]
    return model, matrix, misclassified, fit_s


def misclassified(
    paths: np.ndarray, truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str]
) -> pd.DataFrame:
    """The test images predicted wrong (``path``, ``label``, ``predicted_label``), sorted."""
    wrong = predicted != truth
    return pd.DataFrame(
        {
            "path": paths[wrong],
            "label": np.asarray(labels)[truth[wrong]],
            PREDICTED_LABEL_COL: np.asarray(labels)[predicted[wrong]],
        }
    ).sort_values(["label", "path"], ignore_index=True)


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, int), np.asarray(predicted, int)), 1)
    return matrix


def scores(matrix: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support from a confusion matrix.

    Precision of a class never predicted is 0, as in Spark's ``MulticlassMetrics``.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    correct = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(correct), where=both > 0)
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": float(correct.sum() / max(matrix.sum(), 1)),
        "f1_macro": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
        "n_test": int(matrix.sum()),
    }


@dataclass
class ClassifierResult:
    """One fitted classifier and its test-set scores."""

    name: str
    model: PipelineModel | None
    scores: dict

    def summary(self) -> str:
        s = self.scores
        return (
            f"{self.name}: {s['dims']} inputs, accuracy {s['accuracy']:.3f}, "
            f"macro F1 {s['f1_macro']:.3f} on {s['n_test']} test images "
            f"(fit {s['fit_s']:.2f} s, {s['fitted_by']})"
        )

    def per_class_table(self) -> str:
        """One line per label: precision, recall, F1 and test images."""
        per_class = self.scores["per_class"]
        width = max(5, *(len(label) for label in per_class))
        lines = [f"{'label':<{width}}  precision  recall     F1  support"]
        for label, s in per_class.items():
            lines.append(
                f"{label:<{width}}  {s['precision']:>9.3f}  {s['recall']:>6.3f}  {s['f1']:>5.3f}"
                f"  {s['support']:>7}"
            )
        return "\n".join(lines)
