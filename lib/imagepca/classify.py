"""Close the transfer-learning loop: a multiclass classifier on the PCA-reduced features.

Notebook 03 calls this module after notebook 02. It answers the question the PCA leaves
open: *what does keeping k components cost in accuracy?* Three things are measured on one
stratified train/test split, so they are comparable:

- a multinomial ``LogisticRegression`` on ``reduced/`` (the chosen k), saved as a
  ``PipelineModel`` under ``OUTPUT/classifier_model/`` that returns label strings;
- the same classifier on the full 1280-d ``features/`` (standardized in the pipeline);
- a sweep over k: the saved ``pca_model``'s PCA stage already produces every component
  (column ``pca_all``), so each k is a ``VectorSlicer`` over it, with no refit of the PCA
  and no second feature extraction.

The scores go into ``metrics.json`` under ``"classification"``, written through the storage
protocol. While the classifiers are fitted the output is left as notebook 02 (or an earlier
notebook 03) completed it: ``metrics.json`` still describes the ``classifier_model/`` on disk.
Only when the new model is published are the completion markers withdrawn, the model
swapped in, and ``metrics.json`` then ``_SUCCESS`` written again, so an interrupted
publication never leaves a complete-looking output whose metrics describe another model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import (
    IndexToString,
    PCAModel,
    StandardScaler,
    StringIndexer,
    StringIndexerModel,
    VectorSlicer,
)
from pyspark.ml.functions import array_to_vector
from pyspark.mllib.evaluation import MulticlassMetrics
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from .config import ClassifyParams, ParameterError
from .pipeline import read_features, timed
from .plots import save_figure
from .reduction import ALL_COMPONENTS_COL, PCA_COL, VECTOR_COL, to_vectors
from .session import default_parallelism
from .storage import METRICS_FILE, Storage, join

MODEL_DIR = "classifier_model"
LABEL_INDEX_COL = "label_index"
PREDICTION_COL = "prediction"
PREDICTED_LABEL_COL = "predicted_label"
SCALED_FEATURES_COL = "features_scaled"
IS_TEST_COL = "is_test"
DEFAULT_K_VALUES = (2, 5, 10, 20, 50, 100)
MIN_IMAGES_PER_LABEL = 2  # one to train on, one to test on
ROWS_PER_PARTITION = 2000  # ~20 MB of 1280-d features per cached partition


# -- split ------------------------------------------------------------------------------


def n_test_images(n: int, test_fraction: float) -> int:
    """Test images for a label of ``n`` images: rounded share, at least 1 on each side."""
    if n < MIN_IMAGES_PER_LABEL:
        return 0
    return max(1, min(n - 1, math.floor(n * test_fraction + 0.5)))


def split_by_label(df: DataFrame, test_fraction: float, seed: int) -> DataFrame:
    """Add a boolean ``is_test``: an exact, seeded, per-label split of ``df``.

    ``DataFrame.sampleBy`` draws each row independently, so a label's test share only
    approximates the fraction (and a small label can end up with no test image). Here each
    label's rows are ranked by a seeded hash of their path and the first
    :func:`n_test_images` of them are the test set. The assignment depends only on the seed
    and the paths, not on partitioning, so ``features/`` and ``reduced/`` split alike.

    A label with fewer than ``MIN_IMAGES_PER_LABEL`` images cannot be both trained on and
    tested: its image stays in the training rows here, and :func:`prepare` leaves such
    labels out altogether (see :func:`small_labels`), listing them in the metrics.
    """
    by_label = Window.partitionBy("label")
    ranked = Window.partitionBy("label").orderBy(F.xxhash64(F.lit(seed), "path"), "path")
    n = F.count(F.lit(1)).over(by_label)
    rounded = F.floor(n * F.lit(float(test_fraction)) + F.lit(0.5))
    n_test = F.when(n >= MIN_IMAGES_PER_LABEL, F.greatest(F.lit(1), F.least(n - 1, rounded)))
    n_test = n_test.otherwise(F.lit(0))
    return df.withColumn(IS_TEST_COL, F.row_number().over(ranked) <= n_test)


def small_labels(label_counts: dict[str, int]) -> dict[str, int]:
    """Labels with too few images to appear in both the training and the test set."""
    return {label: n for label, n in label_counts.items() if n < MIN_IMAGES_PER_LABEL}


# -- classifier -------------------------------------------------------------------------


def fit_label_indexer(train: DataFrame) -> StringIndexerModel:
    """Label strings to indices 0..n-1 in alphabetical order (stable across runs)."""
    return StringIndexer(
        inputCol="label",
        outputCol=LABEL_INDEX_COL,
        stringOrderType="alphabetAsc",
        handleInvalid="error",
    ).fit(train)


def build_classifier(
    indexer: StringIndexerModel,
    features_col: str,
    *,
    max_iter: int,
    reg_param: float,
    pre_stages: Sequence = (),
) -> Pipeline:
    """Label indexer -> ``pre_stages`` -> multinomial LogisticRegression -> label strings.

    The indexer is fitted beforehand on the training labels so that ``IndexToString`` can
    carry the label names: the prediction column's metadata only holds the class count.
    """
    regression = LogisticRegression(
        featuresCol=features_col,
        labelCol=LABEL_INDEX_COL,
        predictionCol=PREDICTION_COL,
        family="multinomial",
        maxIter=max_iter,
        regParam=reg_param,
        # Inputs are already on purpose-made scales: standardized features, or PCA scores
        # whose variance says how much each component matters. Re-standardizing the scores
        # would give the low-variance (noise) components the same weight under the penalty.
        standardization=False,
    )
    to_label = IndexToString(
        inputCol=PREDICTION_COL, outputCol=PREDICTED_LABEL_COL, labels=list(indexer.labels)
    )
    return Pipeline(stages=[indexer, *pre_stages, regression, to_label])


def evaluate(model: PipelineModel, test: DataFrame, labels: Sequence[str]) -> dict:
    """Test-set accuracy, macro F1, per-class precision/recall/F1/support, confusion matrix.

    Confusion-matrix rows are true labels and columns predicted labels, both in ``labels``
    order (the indexer's). Every label has test images (the split guarantees it), so
    Spark's matrix is ``len(labels)`` square.
    """
    predicted = (
        model.transform(test)
        .select(
            F.col(PREDICTION_COL).cast("double").alias("prediction"),
            F.col(LABEL_INDEX_COL).cast("double").alias("label"),
        )
        .persist()
    )
    try:
        accuracy = MulticlassClassificationEvaluator(
            labelCol="label", predictionCol="prediction", metricName="accuracy"
        ).evaluate(predicted)
        with warnings.catch_warnings():
            # pyspark's MulticlassMetrics calls the deprecated SQLContext itself.
            warnings.simplefilter("ignore", FutureWarning)
            metrics = MulticlassMetrics(predicted.rdd)
        matrix = metrics.confusionMatrix().toArray()
        if matrix.shape != (len(labels), len(labels)):
            raise RuntimeError(
                f"confusion matrix is {matrix.shape[0]}x{matrix.shape[1]} for {len(labels)} "
                "labels: some label has no test image; check the split"
            )
        per_class = {}
        for index, label in enumerate(labels):
            per_class[label] = {
                "precision": float(metrics.precision(float(index))),
                "recall": float(metrics.recall(float(index))),
                "f1": float(metrics.fMeasure(float(index), 1.0)),
                "support": int(matrix[index].sum()),
            }
    finally:
        predicted.unpersist()
    return {
        "accuracy": float(accuracy),
        "f1_macro": float(np.mean([scores["f1"] for scores in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": {
            "labels": list(labels),
            "matrix": matrix.astype(int).tolist(),
        },
        "n_test": int(matrix.sum()),
    }


def predict(model: PipelineModel, reduced: DataFrame) -> DataFrame:
    """``path``, ``label``, ``predicted_label`` for rows of ``reduced/`` (``pca`` arrays).

    The classifier's input column is ``pca_vector``, the output column of ``pca_model``:
    ``PipelineModel(stages=[*pca_model.stages, *classifier.stages])`` therefore classifies
    ``array_to_vector(features)`` directly.
    """
    vectors = reduced.withColumn(PCA_COL, array_to_vector("pca"))
    return model.transform(vectors).select("path", "label", PREDICTED_LABEL_COL)


def sweep_ks(k_values: Sequence[int] | None, k: int, n_components: int) -> list[int]:
    """The k values of the sweep: the requested ones, or the defaults plus the chosen k.

    Defaults beyond the components the PCA has are dropped; requested ones are an error.
    """
    if k_values is None:
        return sorted(value for value in {*DEFAULT_K_VALUES, k} if value <= n_components)
    too_large = [value for value in k_values if value > n_components]
    if too_large:
        raise ParameterError(
            f"k_values {too_large} exceed the {n_components} components the PCA has "
            f"(min(images, features)); use values from 1 to {n_components}"
        )
    return sorted(set(k_values))


# -- the stage --------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    """One fitted classifier and its test-set scores."""

    name: str
    model: PipelineModel
    scores: dict

    def summary(self) -> str:
        s = self.scores
        return (
            f"{self.name}: {s['dims']} inputs, accuracy {s['accuracy']:.3f}, "
            f"macro F1 {s['f1_macro']:.3f} on {s['n_test']} test images "
            f"(fit {s['fit_s']:.1f} s)"
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


@dataclass
class Classification:
    """The inputs of notebook 03, split once, and the classifiers fitted on them.

    Built by :func:`prepare`; call :meth:`fit_reduced`, :meth:`fit_full`, :meth:`k_sweep`,
    then :meth:`publish`, which saves the model and completes the run.
    """

    spark: SparkSession
    params: ClassifyParams
    storage: Storage
    run_metrics: dict
    pca_model: PipelineModel
    k: int
    cumulative_variance: list[float]
    label_counts: dict[str, int]
    excluded: dict[str, int]
    reduced: DataFrame
    projected: DataFrame
    indexer: StringIndexerModel
    split_counts: dict[str, dict[str, int]]
    results: dict[str, ClassifierResult] = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    writing: bool = False

    @property
    def labels(self) -> list[str]:
        return list(self.indexer.labels)

    @property
    def n_components(self) -> int:
        return len(self.cumulative_variance)

    def train(self, df: DataFrame) -> DataFrame:
        return df.filter(~F.col(IS_TEST_COL))

    def test(self, df: DataFrame) -> DataFrame:
        return df.filter(F.col(IS_TEST_COL))

    def misclassified(self, name: str = "reduced") -> DataFrame:
        """Test images the ``name`` classifier got wrong: ``path``, ``label``, prediction."""
        data = self.reduced if name == "reduced" else self.projected
        return (
            self.results[name]
            .model.transform(self.test(data))
            .filter(F.col("label") != F.col(PREDICTED_LABEL_COL))
            .select("path", "label", PREDICTED_LABEL_COL)
            .orderBy("label", "path")
        )

    def _begin_writes(self) -> None:
        """Withdraw the completion markers before this stage's first write."""
        if not self.writing:
            self.storage.begin_run(self.params.output)
            self.writing = True

    def save_figure(self, fig: Figure, name: str) -> str:
        """Write ``fig`` as ``OUTPUT/name`` with :func:`imagepca.plots.save_figure`.

        Like every write of this stage, it first withdraws the completion markers, which
        :meth:`publish` writes again last.
        """
        self._begin_writes()
        return save_figure(fig, self.storage, self.params.output, name)

    def split_table(self) -> str:
        """One line per label: images for training and for testing."""
        width = max(len(label) for label in self.split_counts)
        lines = [f"{'label':<{width}}  train  test"]
        for label, counts in self.split_counts.items():
            lines.append(f"{label:<{width}}  {counts['train']:>5}  {counts['test']:>4}")
        for label, n in self.excluded.items():
            lines.append(f"{label:<{width}}  excluded: {n} image(s), at least 2 are needed")
        return "\n".join(lines)

    def _fit(self, name: str, data: DataFrame, features_col: str, pre_stages=(), dims=None):
        pipeline = build_classifier(
            self.indexer,
            features_col,
            max_iter=self.params.max_iter,
            reg_param=self.params.reg_param,
            pre_stages=pre_stages,
        )
        start = time.perf_counter()
        model = pipeline.fit(self.train(data))
        fit_s = round(time.perf_counter() - start, 3)
        scores = evaluate(model, self.test(data), self.labels)
        scores.update(
            dims=dims, fit_s=fit_s, n_train=sum(c["train"] for c in self.split_counts.values())
        )
        return ClassifierResult(name, model, scores)

    def fit_reduced(self) -> ClassifierResult:
        """The classifier on ``reduced/`` (the chosen k): the model that is saved."""
        with timed(self.timings, "reduced_s"):
            result = self._fit("reduced", self.reduced, PCA_COL, dims=self.k)
        result.scores["k"] = self.k
        result.scores["input"] = "reduced/ (array_to_vector(pca))"
        self.results["reduced"] = result
        return result

    def fit_full(self) -> ClassifierResult:
        """The same classifier on the full standardized features, for comparison."""
        scaler = StandardScaler(
            inputCol=VECTOR_COL, outputCol=SCALED_FEATURES_COL, withMean=True, withStd=True
        )
        dims = len(self.projected.select(VECTOR_COL).first()[VECTOR_COL])
        with timed(self.timings, "full_s"):
            result = self._fit("full", self.projected, SCALED_FEATURES_COL, [scaler], dims=dims)
        result.scores["k"] = dims
        result.scores["input"] = "features/ (StandardScaler in the pipeline)"
        self.results["full"] = result
        return result

    def sweep_ks(self) -> list[int]:
        """The k values of the sweep, capped by the components the PCA has."""
        return sweep_ks(self.params.k_values, self.k, self.n_components)

    def k_sweep(self) -> list[dict]:
        """Accuracy and macro F1 for each k: a slice of the saved model's ``pca_all``."""
        self.sweep = []
        with timed(self.timings, "k_sweep_s"):
            self._sweep()
        return self.sweep

    def _sweep(self) -> None:
        for k in self.sweep_ks():
            slicer = VectorSlicer(
                inputCol=ALL_COMPONENTS_COL, outputCol=PCA_COL, indices=list(range(k))
            )
            result = self._fit(f"k={k}", self.projected, PCA_COL, [slicer], dims=k)
            self.sweep.append(
                {
                    "k": k,
                    "cumulative_variance": float(self.cumulative_variance[k - 1]),
                    "accuracy": result.scores["accuracy"],
                    "f1_macro": result.scores["f1_macro"],
                    "fit_s": result.scores["fit_s"],
                }
            )

    def sweep_table(self) -> str:
        lines = ["    k  variance  accuracy  macro F1"]
        for row in self.sweep:
            mark = "  <- chosen k" if row["k"] == self.k else ""
            lines.append(
                f"{row['k']:>5}  {row['cumulative_variance']:>8.1%}  {row['accuracy']:>8.3f}  "
                f"{row['f1_macro']:>8.3f}{mark}"
            )
        return "\n".join(lines)

    def metrics(self) -> dict:
        """The ``"classification"`` block of ``metrics.json``."""
        if "reduced" not in self.results:
            raise RuntimeError("fit_reduced() first: the reduced classifier is the saved model")
        block = {
            "reduced": self.results["reduced"].scores,
            "test_fraction": self.params.test_fraction,
            "seed": self.params.seed,
            "labels": self.labels,
            "split": self.split_counts,
            "excluded_labels": self.excluded,
            "k_sweep": self.sweep,
            "params": self.params.as_dict(),
            "model": MODEL_DIR,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if "full" in self.results:
            block["full"] = self.results["full"].scores
        return block

    def publish(self) -> dict:
        """Save the reduced classifier as ``classifier_model/``, then write the metrics.

        Returns the merged ``metrics.json`` document. The completion markers are withdrawn
        before the model is replaced; ``metrics.json`` and ``_SUCCESS`` are written last.
        """
        block = self.metrics()
        model = self.results["reduced"].model
        self._begin_writes()
        with timed(self.timings, "save_s"):
            self.storage.publish(self.params.output, MODEL_DIR, lambda uri: model.save(uri))
        block["timings_s"] = dict(self.timings)
        timings = dict(self.run_metrics.get("timings_s", {}))
        timings["classify_s"] = round(sum(self.timings.values()), 3)
        merged = {**self.run_metrics, "classification": block, "timings_s": timings}
        self.storage.finish_run(self.params.output, merged)
        self.unpersist()
        return merged

    def unpersist(self) -> None:
        self.reduced.unpersist()
        self.projected.unpersist()


def _pca_prefix(pca_model: PipelineModel, model_uri: str) -> tuple[PipelineModel, PCAModel, int]:
    """The model's stages up to the PCA with every component, that PCA, and the chosen k."""
    stages = pca_model.stages
    pcas = [s for s in stages if isinstance(s, PCAModel) and s.getOutputCol() == ALL_COMPONENTS_COL]
    if len(stages) < 2 or not isinstance(stages[-1], VectorSlicer) or len(pcas) != 1:
        raise ValueError(
            f"{model_uri} is not a pca_model of this project (scaler -> PCA to "
            f"{ALL_COMPONENTS_COL!r} -> VectorSlicer): re-run notebook 02"
        )
    return PipelineModel(stages=stages[:-1]), pcas[0], len(stages[-1].getIndices())


def prepare(spark: SparkSession, params: ClassifyParams) -> Classification:
    """Read the run's outputs and split them by label; nothing is written yet.

    Raises
    ------
    FileNotFoundError
        When notebook 02 has not completed on ``params.output``.
    ValueError
        When fewer than two labels have enough images to train and test a classifier.
    """
    storage = Storage(spark)
    start = time.perf_counter()
    metrics_uri = join(params.output, METRICS_FILE)
    needed = [join(params.output, name) for name in ("features", "pca_model", "reduced")]
    missing = [uri for uri in [metrics_uri, *needed] if not storage.exists(uri)]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}: notebook 02 has not completed on this output "
            "(or an earlier classification was interrupted); run notebooks 01 and 02 "
            "(`imagepca run`, or `--reuse-features` to keep the features) first"
        )
    run_metrics = storage.read_json(metrics_uri)
    run_metrics.pop("classification", None)
    model_uri = needed[1]
    pca_model = PipelineModel.load(model_uri)
    prefix, pca_stage, k = _pca_prefix(pca_model, model_uri)
    cumulative = (
        run_metrics.get("cumulative_variance")
        or np.cumsum(pca_stage.explainedVariance.toArray()).tolist()
    )
    if run_metrics.get("k", k) != k:
        raise ValueError(
            f"metrics.json says k = {run_metrics['k']} but {model_uri} keeps {k} components: "
            "the output mixes two runs; re-run notebook 02"
        )

    sweep_ks(params.k_values, k, len(cumulative))  # reject impossible k before any work
    label_counts = {
        row["label"]: int(row["count"])
        for row in spark.read.parquet(needed[2]).groupBy("label").count().orderBy("label").collect()
    }
    excluded = small_labels(label_counts)
    kept = [label for label in label_counts if label not in excluded]
    kept_images = sum(label_counts[label] for label in kept)
    if len(kept) < 2:
        raise ValueError(
            f"a classifier needs at least 2 labels with >= {MIN_IMAGES_PER_LABEL} images each; "
            f"found {len(kept)} ({label_counts}): add images or labels to the input"
        )

    # Every optimizer iteration is a Spark job over these rows: a few partitions, not the
    # shuffle's 200 (AQE does not coalesce the partitions of a cached plan).
    partitions = max(1, min(default_parallelism(spark), -(-kept_images // ROWS_PER_PARTITION)))

    def usable(df: DataFrame) -> DataFrame:
        if excluded:
            df = df.filter(~F.col("label").isin(list(excluded)))
        return split_by_label(df, params.test_fraction, params.seed).coalesce(partitions)

    reduced = usable(
        spark.read.parquet(needed[2]).select("path", "label", array_to_vector("pca").alias(PCA_COL))
    ).persist()
    projected = usable(
        prefix.transform(to_vectors(read_features(spark, params.output))).select(
            "path", "label", VECTOR_COL, ALL_COMPONENTS_COL
        )
    ).persist()
    split_counts = {
        row["label"]: {"train": int(row["train"]), "test": int(row["test"])}
        for row in reduced.groupBy("label")
        .agg(
            F.sum((~F.col(IS_TEST_COL)).cast("int")).alias("train"),
            F.sum(F.col(IS_TEST_COL).cast("int")).alias("test"),
        )
        .orderBy("label")
        .collect()
    }
    indexer = fit_label_indexer(reduced.filter(~F.col(IS_TEST_COL)))
    return Classification(
        spark=spark,
        params=params,
        storage=storage,
        run_metrics=run_metrics,
        pca_model=pca_model,
        k=k,
        cumulative_variance=[float(v) for v in cumulative],
        label_counts=label_counts,
        excluded=excluded,
        reduced=reduced,
        projected=projected,
        indexer=indexer,
        split_counts=split_counts,
        timings={"prepare_s": round(time.perf_counter() - start, 3)},
    )


# -- figures ----------------------------------------------------------------------------


def plot_confusion_matrix(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str = ""
) -> Figure:
    """Test-set confusion matrix: rows true labels, columns predictions, counts written in.

    Colours are row-normalized (recall per class), so small classes read as clearly as
    large ones.
    """
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(labels)
    side = min(16.0, 3.0 + 0.55 * n)
    fig = plt.figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if shares[i, j] > 0.6 else "black",
                    )
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=9 if n <= 20 else 6)
    ax.set_yticks(ticks, labels, fontsize=9 if n <= 20 else 6)
    ax.set(
        xlabel="predicted label", ylabel="true label", title=title or "Confusion matrix (test set)"
    )
    fig.tight_layout()
    return fig


def _readable_ticks(ks: Sequence[int], k: int) -> list[int]:
    """The sweep's k values as log-scale ticks, without labels printed over each other."""
    ticks: list[int] = []
    for value in sorted(set(ks)):
        if ticks and value / ticks[-1] < 1.25:
            if value == k:
                ticks[-1] = value  # the chosen k wins over a neighbour
            continue
        ticks.append(value)
    return ticks


def plot_k_sweep(
    sweep: Sequence[dict],
    cumulative_variance: Sequence[float],
    k: int,
    full_accuracy: float | None = None,
) -> Figure:
    """Test accuracy and macro F1 against k, over the cumulative explained variance.

    Shows what the variance threshold costs: where the accuracy curve flattens, more
    components buy variance but no accuracy.
    """
    cumulative = np.asarray(cumulative_variance, dtype=float)
    ks = [row["k"] for row in sweep]
    fig = plt.figure(figsize=(9, 4.8))
    ax = fig.add_subplot()
    components = np.arange(1, len(cumulative) + 1)
    ax.plot(components, cumulative, color="#dd8452", label="cumulative explained variance")
    ax.plot(ks, [row["accuracy"] for row in sweep], "o-", color="#4c72b0", label="test accuracy")
    ax.plot(ks, [row["f1_macro"] for row in sweep], "s--", color="#55a868", label="test macro F1")
    if full_accuracy is not None:
        ax.axhline(
            full_accuracy,
            color="#8172b2",
            linestyle=":",
            label=f"accuracy on all features ({full_accuracy:.3f})",
        )
    ax.axvline(k, color="#c44e52", linestyle=":", label=f"chosen k = {k} ({cumulative[k - 1]:.1%})")
    ax.set_xscale("log")
    ticks = _readable_ticks(ks, k)
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    ax.set(
        xlabel="k (principal components kept, log scale)",
        ylabel="fraction",
        ylim=(0, 1.02),
        xlim=(max(0.8, min(ks) * 0.8), len(cumulative) * 1.1),
        title="Accuracy against k, next to the explained variance",
    )
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
