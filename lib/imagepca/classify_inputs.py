"""Notebook 03's inputs, read once: the run's metrics, its PCA, the split by label and the
comparison subset.

:func:`read_inputs` is the first step of :func:`imagepca.classify.prepare`; the fits,
the sweep and the publishing of the classifier live in :mod:`imagepca.classify`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import FEATURE_DIM, ClassifyParams, ParameterError, max_components
from .images import classifiable, small_labels
from .pipeline import read_features
from .reduction import StoredPCA, read_pca
from .session import cached_shuffle_settings, run_concurrently, spark_settings
from .split import IN_SUBSET_COL, TrainingMatrix, n_test_images, parquet_bytes, split_by_label
from .storage import METRICS_FILE, Storage, join

DEFAULT_K_VALUES = (2, 5, 10, 20, 50, 100)


def sweep_ks(k_values: Sequence[int] | None, k: int, n_components: int, n_images: int) -> list[int]:
    """The k values of the sweep: the requested ones, or the defaults plus the chosen k.

    Beyond the components with variance (``n_images - 1`` centred images span at most as
    many) defaults are dropped and requested ones are an error.
    """
    most = min(n_components, max_components(n_images))
    if k_values is None:
        return sorted(value for value in {*DEFAULT_K_VALUES, k} if value <= most)
    too_large = [value for value in k_values if value > most]
    if too_large:
        raise ParameterError(
            f"k_values {too_large} exceed the {most} components with variance "
            f"(min(images - 1, features)); use values from 1 to {most}"
        )
    return sorted(set(k_values))


@dataclass(frozen=True)
class ClassifyInputs:
    """What :func:`read_inputs` read: the split is cached until the classifier is published."""

    run_metrics: dict
    pca: StoredPCA
    label_counts: dict[str, int]
    excluded: dict[str, int]
    split: DataFrame
    split_counts: dict[str, dict[str, int]]
    subset: TrainingMatrix
    subset_is_everything: bool

    @property
    def labels(self) -> list[str]:
        """The labels classified (every label but the excluded ones), sorted."""
        return list(self.split_counts)


def read_inputs(spark: SparkSession, params: ClassifyParams, storage: Storage) -> ClassifyInputs:
    """Read the run's outputs, split them by label and collect the comparison subset; the
    output's ``_SUCCESS`` is withdrawn once the parameters are checked against it.

    Raises
    ------
    FileNotFoundError
        When notebook 02 has not completed on ``params.output``.
    ValueError
        When fewer than two labels have enough images to train and test a classifier, or
        when ``metrics.json`` and the PCA come from two runs.
    """
    metrics_uri = join(params.output, METRICS_FILE)
    needed = [
        join(params.output, name) for name in ("features", "pca_model", "pca_components", "reduced")
    ]
    missing = [uri for uri in [metrics_uri, *needed] if not storage.exists(uri)]
    if missing:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}{storage.relative_note(params.output)}: notebook 02 has "
            "not completed on this output; "
            "run notebooks 01 and 02 "
            "(`imagepca run`, or `--reuse-features` to keep the features) first"
        )
    run_metrics = storage.read_json(metrics_uri)
    run_metrics.pop("classification", None)
    # Impossible k values are rejected before any work, from notebook 02's metrics.
    n_components = len(run_metrics["explained_variance"])
    sweep_ks(params.k_values, run_metrics["k"], n_components, run_metrics["n_images"])
    label_counts = dict(sorted(run_metrics["images_per_label"].items()))
    reason = classifiable(label_counts)
    if reason:
        raise ValueError(
            f"{reason}. The output is complete without a classifier (`imagepca run` does not "
            "start this notebook then; metrics.json says why under classification.skipped)"
        )
    excluded = small_labels(label_counts)
    kept = [label for label in label_counts if label not in excluded]
    n_kept = sum(label_counts[label] for label in kept)
    # Work in progress from here: an interrupted notebook 03 must not leave it complete.
    storage.withdraw_success(params.output)

    features = read_features(spark, params.output)
    # The split is cached with few partitions of small rows (path, label, flags): with the
    # session's 200, one task walked 200 nearly empty partitions (5 s on 240 images).
    with spark_settings(spark, cached_shuffle_settings(spark, n_kept)):
        split = split_by_label(
            features.select("path", "label").filter(F.col("label").isin(kept)),
            params.test_fraction,
            params.seed,
            min(1.0, params.sweep_max_images / n_kept),
        ).persist()
        try:
            # At most sweep_max_images rows (Spark broadcasts their paths when it joins: the
            # 1280-d rows are never shuffled). The PCA's small jobs run beside: 0.3 s.
            pca, subset = run_concurrently(
                partial(read_pca, spark, params.output),
                partial(
                    TrainingMatrix.collect,
                    features,
                    F.broadcast(split.filter(IN_SUBSET_COL)),
                    "features",
                    kept,
                    scan_bytes=parquet_bytes(run_metrics["n_images"], FEATURE_DIM),
                ),
            )
            stored = (pca.k, len(pca.explained_variance))
            noted = (run_metrics["k"], len(run_metrics["explained_variance"]))
            if stored != noted:
                raise ValueError(
                    f"metrics.json says k = {noted[0]} of {noted[1]} components but "
                    f"{needed[1]} and {needed[2]} keep k = {stored[0]} of {stored[1]}: the "
                    "output mixes two runs; re-run notebook 02"
                )
        except BaseException:
            split.unpersist()
            raise
    # The split is exact: each label's counts follow from its number of images.
    split_counts = {}
    for label in kept:
        n_test = n_test_images(label_counts[label], params.test_fraction)
        split_counts[label] = {"train": label_counts[label] - n_test, "test": n_test}
    return ClassifyInputs(
        run_metrics=run_metrics,
        pca=pca,
        label_counts=label_counts,
        excluded=excluded,
        split=split,
        split_counts=split_counts,
        subset=subset,
        subset_is_everything=len(subset.y) == n_kept,
    )
