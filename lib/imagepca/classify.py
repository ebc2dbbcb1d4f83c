"""Close the transfer-learning loop: a multiclass classifier on the PCA-reduced features.

Notebook 03 calls this module after notebook 02. It answers the question the PCA leaves
open: *what does keeping k components cost in accuracy?* Three things are measured on one
stratified train/test split, so they are comparable:

- a multinomial logistic regression on ``reduced/`` (the chosen k), saved as a Spark
  ``PipelineModel`` under ``OUTPUT/classifier_model/`` that returns label strings;
- the same classifier on the full 1280-d ``features/`` (standardized);
- a sweep over k, each k the first components of the saved ``pca_components/``: no refit
  of the PCA, no second feature extraction.

The comparison and the sweep are diagnostics: they start from the saved classifier,
carried into their space, and stop once their objective flattens.

Cost stays bounded as the data grows. The classifiers are fitted on the driver
(:mod:`imagepca.logistic`: Spark's objective, scipy's L-BFGS-B, no Spark job per
iteration) when their float64 training matrix fits in ``driver_max_mb``; a larger
``reduced/`` is fitted by Spark's distributed ``LogisticRegression`` instead. The full
comparison and the sweep use one training matrix collected once: every image up to
``sweep_max_images``, above that a stratified, seeded subset of that many (documented in
the metrics), so the driver never holds 1280 x n floats for large n.

:func:`prepare` reads its inputs through :mod:`imagepca.classify_inputs` (the run's
metrics, the PCA, the split by label, the comparison subset) and returns a
:class:`Classification`, which fits, sweeps and publishes.

The scores go into ``metrics.json`` under ``"classification"``. :func:`prepare` withdraws
the output's ``_SUCCESS`` (a run stopped in notebook 03 must not look complete); its
``metrics.json`` stays, notebook 02's, for the notebook to run again from its top. At this
stage's first write (a figure, or the model's) the fitted model is saved under
``_staging/`` while the notebook goes on (:class:`imagepca.classify_model.StagedSave`);
:meth:`Classification.publish` swaps it in and writes ``metrics.json``, then ``_SUCCESS``,
again. No write is made once notebook 02 has redone the reduction :func:`prepare` read.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pyspark.ml import PipelineModel
from pyspark.ml.feature import StringIndexerModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from threadpoolctl import ThreadpoolController

from . import logistic
from .classify_inputs import read_inputs, sweep_ks
from .classify_model import MODEL_DIR, StagedSave
from .config import ClassifyParams
from .logistic import (
    LABEL_INDEX_COL,
    PREDICTION_COL,
    ClassifierResult,
    classifier_pipeline,
    label_indexer,
)
from .plots import save_figure
from .reduction import PCA_COL, StoredPCA
from .run_record import timed
from .session import default_parallelism
from .split import IS_TEST_COL, SPLIT_BY, TrainingMatrix, parquet_bytes
from .storage import (
    CLASSIFY_FIGURES,
    CLASSIFY_NOTEBOOK,
    METRICS_FILE,
    Storage,
    join,
    literal,
    reduction_of,
)

ROWS_PER_PARTITION = 2000  # ~20 MB of 1280-d features per cached partition
# Every driver fit does its matrix products in float32 (the loss and the intercepts' gradient
# are still summed in float64): 1.6x to 1.8x faster. The saved classifier of a 10,000-image run
# (7,481 x 521, 60 classes): 2.25 -> 1.27 s, the same objective to 6 digits, one test image of
# 2,519 classified otherwise (docs/performance.md has the comparison's and the sweep's).
PRODUCTS_DTYPE = np.float32
# The diagnostics (the 1280-d comparison and the k sweep) start from the saved classifier,
# carried into their space, and stop once their objective fell by less than this fraction
# over 10 iterations (or at max_iter). On the 10,000-image output (3,752 training rows):
# the 1280-d fit stopped at 34 iterations, its objective 1.2e-4 above (relative) what 100
# iterations from zero reach, its accuracy the same; the 521-component fit at 33, 1.3e-4
# above, the same accuracy. From zero, the rule would stop that 1280-d fit at 80 of 100.
DIAGNOSTIC_FLAT_TOL = 1e-4


# -- the stage --------------------------------------------------------------------------


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
    label_counts: dict[str, int]
    excluded: dict[str, int]
    indexer: StringIndexerModel
    split: DataFrame
    split_counts: dict[str, dict[str, int]]
    pca: StoredPCA
    subset: TrainingMatrix
    subset_is_everything: bool
    results: dict[str, ClassifierResult] = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    removed_figures: list[str] = field(default_factory=list)  # an earlier run's, by prepare()
    writing: bool = False
    _misclassified: pd.DataFrame | None = None
    _model_save: StagedSave = field(init=False)
    # The saved classifier's coefficients (classes x k) and intercepts: where the
    # diagnostics start (read once, not from the sweep's threads).
    _saved_weights: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self._model_save = StagedSave(self.storage, self.params.output)

    @property
    def k(self) -> int:
        """The chosen number of components (notebook 02's)."""
        return self.pca.k

    @cached_property
    def cumulative_variance(self) -> list[float]:
        return np.cumsum(self.pca.explained_variance).tolist()

    @property
    def labels(self) -> list[str]:
        return list(self.indexer.labels)

    @property
    def n_components(self) -> int:
        return len(self.cumulative_variance)

    def _begin_writes(self) -> None:
        """Withdraw ``_SUCCESS`` before this stage's first write, once the output is seen to
        hold the reduction :func:`prepare` read. ``metrics.json`` stays, notebook 02's, for
        this notebook to be run again from its top."""
        self._check_reduction_unchanged()
        if not self.writing:
            self.storage.withdraw_success(self.params.output)
            self.writing = True
        self._stage_model()

    def _check_reduction_unchanged(self) -> None:
        """Refuse to write from a reduction notebook 02 has since replaced (or is replacing):
        a classifier of another PCA would complete an output it does not fit."""
        current = self.storage.read_json_if_exists(join(self.params.output, METRICS_FILE))
        if current is None or reduction_of(current) != reduction_of(self.run_metrics):
            now = "is being redone" if current is None else f"is of {current.get('finished_at')}"
            raise RuntimeError(
                f"{self.params.output}: notebook 02 ran again since prepare() read the "
                f"reduction of {self.run_metrics.get('finished_at')} (k = {self.k}); its output "
                f"{now} (k = {(current or {}).get('k')}). Nothing was written: run this "
                "notebook again from its top (prepare), once notebook 02 has completed"
            )

    def _stage_model(self) -> None:
        """Start saving the reduced classifier (:class:`StagedSave`) once it is fitted and
        this stage writes to the output."""
        if self.writing and "reduced" in self.results and not self._model_save.started:
            self._model_save.start(self.results["reduced"].model)

    def save_figure(self, fig: Figure, name: str) -> str:
        """Write ``fig`` as ``OUTPUT/name`` (withdrawing ``_SUCCESS`` first)."""
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
        if not self.subset_is_everything:
            lines.append(
                f"full-feature comparison and k sweep: a stratified subset of "
                f"{len(self.subset.y)} images (sweep_max_images={self.params.sweep_max_images})"
            )
        return "\n".join(lines)

    def scores_of(self, k: int | None) -> np.ndarray:
        """The subset's first ``k`` PCA scores (None: its standardized features)."""
        return self.pca.scores(self.subset.x, k)

    def _diagnostic_start(self, k: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved classifier as a starting point on the first ``k`` components (None: on
        the standardized features), with the same margins, hence the same objective, when
        ``k`` is at least its own: scores are standardized features times the components.
        None before :meth:`fit_reduced`."""
        if self._saved_weights is None:
            return None
        coefficients, intercepts = self._saved_weights
        return self.pca.coefficients_on(coefficients, k), intercepts

    def _fit_driver(
        self,
        name: str,
        data: TrainingMatrix,
        x: np.ndarray,
        start: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple:
        """A driver fit on ``data``'s training rows, scored on its test rows. One with a
        ``start`` (a diagnostic) stops where its objective flattens."""
        train, test = ~data.is_test, data.is_test
        labels = self.labels  # one call into the JVM's indexer, also from the sweep's threads
        start_time = time.perf_counter()
        coefficients, intercepts, iterations = logistic.fit_multinomial(
            x[train],
            data.y[train],
            len(labels),
            reg_param=self.params.reg_param,
            max_iter=self.params.max_iter,
            dtype=PRODUCTS_DTYPE,
            start=start,
            flat_tol=None if start is None else DIAGNOSTIC_FLAT_TOL,
        )
        fit_s = round(time.perf_counter() - start_time, 3)
        predicted = logistic.predict(coefficients, intercepts, x[test])
        matrix = logistic.confusion_matrix(data.y[test], predicted, len(labels))
        scores = logistic.scores(matrix, labels)
        scores.update(
            dims=int(x.shape[1]),
            fit_s=fit_s,
            n_train=int(train.sum()),
            fitted_by="driver",
            products=np.dtype(PRODUCTS_DTYPE).name,
            iterations=iterations,
            started_from="saved classifier" if start is not None else "zero",
        )
        if name == "reduced":
            self._misclassified = logistic.misclassified(
                data.paths[test], data.y[test], predicted, labels
            )
        return coefficients, intercepts, scores

    def _fit_spark(self, data: DataFrame) -> tuple[PipelineModel, dict]:
        """The reduced classifier by Spark's distributed LogisticRegression."""
        n_images = sum(self.label_counts[label] for label in self.labels)
        partitions = max(
            1, min(default_parallelism(self.spark), -(-n_images // ROWS_PER_PARTITION))
        )
        # Every optimizer iteration is a Spark job over these rows: a few cached partitions.
        data = data.coalesce(partitions).persist()
        try:
            model, matrix, self._misclassified, fit_s = logistic.fit_distributed(
                data.filter(~F.col(IS_TEST_COL)),
                data.filter(F.col(IS_TEST_COL)),
                self.indexer,
                features_col=PCA_COL,
                max_iter=self.params.max_iter,
                reg_param=self.params.reg_param,
            )
        finally:
            data.unpersist()
        scores = logistic.scores(matrix, self.labels)
        n_train = sum(split["train"] for split in self.split_counts.values())
        regression = model.stages[1]
        scores.update(
            dims=self.k,
            fit_s=fit_s,
            n_train=n_train,
            fitted_by="spark",
            products="float64",
            iterations=regression.summary.totalIterations if regression.hasSummary else None,
            started_from="zero",
        )
        return model, scores

    def fit_reduced(self) -> ClassifierResult:
        """The classifier on ``reduced/`` (the chosen k): the model that is saved."""
        params = self.params
        self._model_save.discard()
        if self.writing:  # its model is staged once fitted: not one of another reduction
            self._check_reduction_unchanged()
        n_rows = sum(c["train"] + c["test"] for c in self.split_counts.values())
        with timed(self.timings, "reduced_s"):
            source = "reduced/ (array_to_vector(pca))"
            if not logistic.fits_on_driver(n_rows, self.k, params.driver_max_mb):
                data = x = None  # Spark fits it (driver_max_mb=0: always)
            elif self.subset_is_everything:  # every image is on the driver already
                data, x = self.subset, self.scores_of(self.k)
                source = "features/ projected with pca_model (the scores reduced/ holds)"
            else:
                size = parquet_bytes(self.run_metrics["n_images"], self.k)  # reduced/, about
                data = TrainingMatrix.collect(self._reduced(), self.split, "pca", self.labels, size)
                x = data.x
            if data is not None:
                coefficients, intercepts, scores = self._fit_driver("reduced", data, x)
                regression = logistic.spark_model(
                    self.spark,
                    coefficients,
                    intercepts,
                    features_col=PCA_COL,
                    label_col=LABEL_INDEX_COL,
                    prediction_col=PREDICTION_COL,
                    reg_param=params.reg_param,
                    max_iter=params.max_iter,
                )
                model = classifier_pipeline(self.indexer, regression)
                self._saved_weights = (coefficients, intercepts)
            else:
                reduced = self._reduced().join(self.split, ["path", "label"])
                model, scores = self._fit_spark(reduced.withColumn(PCA_COL, array_to_vector("pca")))
                regression = model.stages[1]  # indexer, regression, label strings
                self._saved_weights = (
                    regression.coefficientMatrix.toArray(),
                    regression.interceptVector.toArray(),
                )
        scores["k"] = self.k
        scores["input"] = source
        result = ClassifierResult("reduced", model, scores)
        self.results["reduced"] = result
        self._stage_model()
        return result

    def _reduced(self) -> DataFrame:
        return self.spark.read.parquet(literal(join(self.params.output, "reduced")))

    def misclassified(self) -> pd.DataFrame:
        """Test images the saved (reduced) classifier got wrong: path, label, prediction."""
        if self._misclassified is None:
            raise RuntimeError("fit_reduced() first")
        return self._misclassified

    def fit_full(self) -> ClassifierResult:
        """The same classifier on the full standardized features, for comparison; after
        :meth:`fit_reduced`, it starts from the saved classifier."""
        with timed(self.timings, "full_s"):
            *_, scores = self._fit_driver(
                "full", self.subset, self.scores_of(None), self._diagnostic_start(None)
            )
        scores["k"] = scores["dims"]
        scores["input"] = "features/ (standardized with pca_model's scaler)"
        self.results["full"] = ClassifierResult("full", None, scores)
        return self.results["full"]

    def sweep_ks(self) -> list[int]:
        """The k values of the sweep, capped by the components the PCA has."""
        n_images = self.run_metrics["n_images"]
        return sweep_ks(self.params.k_values, self.k, self.n_components, n_images)

    def k_sweep(self) -> list[dict]:
        """Accuracy and macro F1 for each k: the first k of the saved components.

        The fits whose products run on one core (:func:`imagepca.logistic.uses_blas_pool`)
        run side by side, one per core of the BLAS pool, with BLAS held to one thread (a
        fit's result does not depend on what runs beside it); the larger ones follow, one
        after the other on every core. A fit's ``fit_s`` is its own wall time. After
        :meth:`fit_reduced`, each fit starts from the saved classifier's first k coefficients
        (zeros past its own k) and stops where its objective flattens
        (:data:`DIAGNOSTIC_FLAT_TOL`).
        """
        ks = self.sweep_ks()
        with timed(self.timings, "k_sweep_s"):
            largest = self.scores_of(max(ks))

            def fit(k: int) -> dict:
                if k == self.k and self.subset_is_everything and "reduced" in self.results:
                    return self.results["reduced"].scores  # the same fit on the same rows
                x = largest[:, :k]
                return self._fit_driver(f"k={k}", self.subset, x, self._diagnostic_start(k))[-1]

            n_train = int((~self.subset.is_test).sum())
            side_by_side = [k for k in ks if not logistic.uses_blas_pool(n_train, k)]
            pools = ThreadpoolController()
            n_workers = logistic.blas_pool_size(pools)  # before the limit below
            with pools.limit(limits=1, user_api="blas"), ThreadPoolExecutor(n_workers) as workers:
                scores = dict(zip(side_by_side, workers.map(fit, side_by_side), strict=True))
            scores.update((k, fit(k)) for k in ks if k not in scores)
        self.sweep = [
            {
                "k": k,
                "cumulative_variance": float(self.cumulative_variance[k - 1]),
                "accuracy": scores[k]["accuracy"],
                "f1_macro": scores[k]["f1_macro"],
                "fit_s": scores[k]["fit_s"],
                "iterations": scores[k].get("iterations"),
            }
            for k in ks
        ]
        return self.sweep

    def sweep_table(self) -> str:
        lines = ["    k  variance  accuracy  macro F1"]
        for row in self.sweep:
            mark = "  <- chosen k" if row["k"] == self.k else ""
            lines.append(
                f"{row['k']:>5}  {row['cumulative_variance']:>8.1%}  {row['accuracy']:>8.3f}  "
                f"{row['f1_macro']:>8.3f}{mark}"
            )
        return "\n".join(lines)

    def scores_summary(self) -> str:
        """A line per fitted classifier (the comparison's only if it ran), then the stage's
        timings."""
        lines = [
            f"{name + ':':<8} accuracy {result.scores['accuracy']:.3f}, "
            f"macro F1 {result.scores['f1_macro']:.3f}"
            for name, result in self.results.items()
        ]
        return "\n".join([*lines, f"timings (s): {self.timings}"])

    def metrics(self) -> dict:
        """The ``"classification"`` block of ``metrics.json``."""
        if "reduced" not in self.results:
            raise RuntimeError("fit_reduced() first: the reduced classifier is the saved model")
        block = {
            "reduced": self.results["reduced"].scores,
            "test_fraction": self.params.test_fraction,
            "seed": self.params.seed,
            "split_by": SPLIT_BY,
            "labels": self.labels,
            "split": self.split_counts,
            "excluded_labels": self.excluded,
            "k_sweep": self.sweep,
            "comparison_images": len(self.subset.y),
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
        self._begin_writes()  # which starts the model's save, unless a figure's write did
        with timed(self.timings, "save_s"):  # the wait for that save, and the swap
            self._model_save.swap_in(self.results["reduced"].model)
        block["timings_s"] = dict(self.timings)
        timings = dict(self.run_metrics.get("timings_s", {}))
        timings["classify_s"] = round(sum(self.timings.values()), 3)
        merged = {**self.run_metrics, "classification": block, "timings_s": timings}
        # What notebook 02 and prepare() removed that is still missing (not made again: a
        # figure's cell skipped, this notebook's copy when run by hand), and that copy.
        removed = [*self.run_metrics.get("removed_from_earlier_run", []), *self.removed_figures]
        removed = self.storage.missing(self.params.output, removed)
        merged["removed_from_earlier_run"] = removed + self.storage.remove_earlier_copy(
            self.params.output, CLASSIFY_NOTEBOOK
        )
        self.storage.finish_run(self.params.output, merged)
        # Complete again: a later write (a figure, a refit, a publish) withdraws the markers.
        self.writing = False
        self.split.unpersist()
        return merged


def prepare(spark: SparkSession, params: ClassifyParams) -> Classification:
    """Read the run's outputs, split them by label and collect the comparison subset (see
    :func:`imagepca.classify_inputs.read_inputs`, which says what it raises).

    The output's ``_SUCCESS`` goes once the parameters are checked against it (an
    impossible parameter or a missing input leaves a complete output complete): from there
    until :meth:`Classification.publish` the output is notebook 03's work in progress.
    """
    start = time.perf_counter()
    storage = Storage(spark)
    inputs = read_inputs(spark, params, storage)
    # An earlier notebook 03's figures (rerun alone), which the cells that follow draw again.
    removed = storage.remove_artifacts(params.output, CLASSIFY_FIGURES)
    return Classification(
        spark=spark,
        params=params,
        storage=storage,
        run_metrics=inputs.run_metrics,
        label_counts=inputs.label_counts,
        excluded=inputs.excluded,
        indexer=label_indexer(inputs.labels),
        split=inputs.split,
        split_counts=inputs.split_counts,
        pca=inputs.pca,
        subset=inputs.subset,
        subset_is_everything=inputs.subset_is_everything,
        timings={"prepare_s": round(time.perf_counter() - start, 3)},
        removed_figures=removed,
    )
