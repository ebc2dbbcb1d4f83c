"""Notebook 03's train/test split, and the rows it collects to the driver.

The split is exact, seeded and per label, computed by Spark from the labels and file names
alone, so ``features/`` and ``reduced/`` split alike on any cluster and wherever the images
sit; :class:`TrainingMatrix` is one collection of split rows for the driver-side fits, which
the driver reads from a small dataset's files itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from .executor_reads import (
    PYARROW_SCHEMES,
    ReadOptions,
    pyarrow_filesystem,
    read_options,
    uri_scheme,
)
from .images import MIN_IMAGES_PER_LABEL, name_column
from .storage import normalize_uri

IS_TEST_COL = "is_test"
IN_SUBSET_COL = "in_subset"
# The most Parquet bytes the driver scans itself for one collection (the features of about
# 100,000 images), on the file systems pyarrow reaches; past it, or elsewhere, Spark's
# executors scan and join, and send the rows kept.
DRIVER_SCAN_MAX_BYTES = 512 << 20
PATH_AND_LABEL_BYTES = 128  # a row's path and label in Parquet, about
SPLIT_BY = "seeded hash of label and file name"
"""How :func:`split_by_label` ranks a label's images (``metrics.json`` says so: outputs
made before 30 November 2026 hashed the path, and held out other images)."""


def n_test_images(n: int, test_fraction: float) -> int:
    """Test images for a label of ``n`` images: rounded share, at least 1 on each side."""
    if n < MIN_IMAGES_PER_LABEL:
        return 0
    return max(1, min(n - 1, math.floor(n * test_fraction + 0.5)))


def split_by_label(
    df: DataFrame, test_fraction: float, seed: int, subset_fraction: float = 1.0
) -> DataFrame:
    """Add a boolean ``is_test`` (an exact, seeded, per-label split) and ``in_subset``.

    ``DataFrame.sampleBy`` draws each row independently, so a label's test share only
    approximates the fraction (and a small label can end up with no test image). Here each
    label's rows are ranked by a seeded hash of their label and file name (ties, files of one
    name under one label, by path) and the first :func:`n_test_images` of them are the test
    set. The assignment depends only on the seed, labels and names, not on partitioning or
    on where the data set sits: ``features/`` and ``reduced/`` split alike, and so do a
    local copy and its S3 twin.

    ``in_subset`` keeps the first ``subset_fraction`` of each label's test rows and of its
    training rows in the same ranking (at least one of each): a stratified subset for the
    sweep that never loses a label. A label with fewer than ``MIN_IMAGES_PER_LABEL`` images
    stays in the training rows; :func:`prepare` leaves such labels out (see
    :func:`small_labels`).
    """
    by_label = Window.partitionBy("label")
    key = F.xxhash64(F.lit(seed), "label", name_column(F.col("path")))
    ranked = Window.partitionBy("label").orderBy(key, "path")
    n = F.count(F.lit(1)).over(by_label)
    rank = F.row_number().over(ranked)
    rounded = F.floor(n * F.lit(float(test_fraction)) + F.lit(0.5))
    n_test = F.when(n >= MIN_IMAGES_PER_LABEL, F.greatest(F.lit(1), F.least(n - 1, rounded)))
    n_test = n_test.otherwise(F.lit(0))
    fraction = F.lit(float(subset_fraction))
    # Over the projected columns: the label's count and test count, computed once.
    keep_test = F.greatest(F.lit(1), F.ceil(F.col("_n_test") * fraction))
    keep_train = F.greatest(F.lit(1), F.ceil((F.col("_n") - F.col("_n_test")) * fraction))
    # Two projections, not a withColumn per column: each is analysed on the driver.
    ranked_rows = df.select("*", n.alias("_n"), n_test.alias("_n_test"), rank.alias("_rank"))
    is_test = F.col("_rank") <= F.col("_n_test")
    in_subset = F.when(is_test, F.col("_rank") <= keep_test).otherwise(
        F.col("_rank") - F.col("_n_test") <= keep_train
    )
    return ranked_rows.select(
        *[ranked_rows[name] for name in df.columns],
        is_test.alias(IS_TEST_COL),
        in_subset.alias(IN_SUBSET_COL),
    )


@dataclass
class TrainingMatrix:
    """Rows collected to the driver once: path, label index, split flag, float32 values."""

    paths: np.ndarray
    y: np.ndarray
    is_test: np.ndarray
    x: np.ndarray

    @classmethod
    def collect(
        cls,
        dataset: DataFrame,
        kept: DataFrame,
        column: str,
        labels: Sequence[str],
        scan_bytes: int,
    ) -> TrainingMatrix:
        """``column`` of the ``dataset`` rows (a Parquet dataset's ``path``, ``label`` and
        ``column``) that ``kept`` (rows of :func:`split_by_label`) holds, with their flags.

        When the dataset (about ``scan_bytes``: :func:`parquet_bytes`) is small enough, the
        driver reads its files itself and keeps those rows as it goes: for 5,000 of 10,000
        images' features, 0.3-0.6 s against 0.8-1.7 s for Spark's scan, join and conversion of
        the same rows. Otherwise Spark joins them (``kept`` may carry a broadcast hint).
        """
        scan = _driver_scan(dataset, scan_bytes)
        if scan is not None:
            split = kept.select("path", "label", IS_TEST_COL).toPandas()
            try:
                positions, x = _scan_rows(*scan, column, split["path"])
            except (OSError, pa.ArrowException):  # credentials or a file system only Spark has
                scan = None
            else:
                rows = split.iloc[positions].reset_index(drop=True)
        if scan is None:
            joined = dataset.join(kept, ["path", "label"])
            rows = joined.select("path", "label", IS_TEST_COL, column).toPandas()
            x = np.stack(rows[column].to_numpy()) if len(rows) else np.zeros((0, 0))
        index = {label: i for i, label in enumerate(labels)}
        return cls(
            paths=rows["path"].to_numpy(),
            y=rows["label"].map(index).to_numpy(dtype=np.int64),
            is_test=rows[IS_TEST_COL].to_numpy(dtype=bool),
            x=np.asarray(x, dtype=np.float32),
        )


def parquet_bytes(n_rows: int, floats_per_row: int) -> int:
    """About the size of a dataset of ``n_rows`` rows of a path, a label and float32 values."""
    return n_rows * (4 * floats_per_row + PATH_AND_LABEL_BYTES)


def _driver_scan(dataset: DataFrame, scan_bytes: int) -> tuple[list[str], ReadOptions] | None:
    """The files the driver reads itself (``inputFiles`` spells them percent-encoded), and
    how, or None when Spark should."""
    files = [normalize_uri(uri) for uri in dataset.inputFiles()]
    schemes = {uri_scheme(uri) for uri in files}
    if scan_bytes > DRIVER_SCAN_MAX_BYTES or not schemes <= set(PYARROW_SCHEMES):
        return None
    return files, read_options(dataset.sparkSession)


def _scan_rows(
    files: Sequence[str], options: ReadOptions, column: str, wanted: pd.Series
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``files`` whose path is in ``wanted``: its position there, and its
    ``column`` values (fixed-length float lists). Read a batch at a time: the driver holds
    one row group of a file besides the rows it keeps."""
    value_set = pa.array(wanted, pa.string())
    positions, blocks = [], []
    for uri in files:
        filesystem, path = pyarrow_filesystem(uri, options)
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=8192, columns=["path", column]):
                found = pc.index_in(batch.column(0), value_set=value_set)
                batch = batch.filter(found.is_valid())
                if batch.num_rows:
                    positions.append(found.drop_null().to_numpy())
                    values = batch.column(1).flatten().to_numpy(zero_copy_only=False)
                    blocks.append(values.reshape(batch.num_rows, -1))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(positions), np.concatenate(blocks)
