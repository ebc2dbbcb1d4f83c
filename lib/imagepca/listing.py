"""What a run's listing is, wherever its files come from: :class:`ImageListing`.

A folder's listing and a manifest's (:mod:`imagepca.inputs`) both end in the same Spark
DataFrame of ``path``, ``label``, ``size``, ``modified``, counted per label in one job
(:func:`count_labels`) and summed into an order-independent fingerprint (:func:`fingerprint`)
that tells an unchanged input from a changed one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from .images import label_column, name_column, skipped_fields, skipped_notes

SAMPLES_PER_LABEL = 3  # paths per label the listing keeps for a first look
SAMPLE_MAX_BYTES = 64 << 20  # the first look reads each sample whole, on the driver


@dataclass(frozen=True)
class ImageListing:
    """The image files of a run, as a Spark DataFrame of ``path``, ``label``, ``size``,
    ``modified`` (the last two null when a manifest does not give them).

    ``n_files`` counts every image file found, including those no scan can return (a
    folder's empty files); ``relation`` is a folder's ``binaryFile`` DataFrame, which reads
    exactly the listed files' bytes without listing again. ``label_counts`` and
    ``label_samples`` (a few paths of each label, for a first look) come from the job that
    filled the cache of ``files``.
    """

    source: str
    kind: str  # "folder" or "manifest"
    files: DataFrame = field(compare=False, repr=False)
    n_files: int
    label_counts: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    label_samples: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)
    relation: DataFrame | None = field(default=None, compare=False, repr=False)
    largest_file: int | None = None  # bytes (None: no size known)
    n_duplicates: int = 0
    hidden: tuple[str, ...] = ()  # local image files Spark's listing skips for a leading _
    not_images: tuple[int, str | None] = (0, None)  # a manifest's other rows: count, first
    broken_links: tuple[str, ...] = ()  # local links to nothing, named like images
    not_utf8: tuple[str, ...] = ()  # local image files whose names are not UTF-8
    # A folder's labels whose files sit in several folders (two of them): a label is its
    # files' folder's name, so apple/green/ and pear/green/ make one label "green".
    several_folders: dict[str, list[str]] = field(default_factory=dict, compare=False)
    # The listing's own time (it runs in notebook 01's listing cell, before the extraction).
    seconds: float = field(default=0.0, compare=False)
    # An earlier run's figures of notebook 01 that the start of this run removed.
    removed_figures: tuple[str, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return self.n_files

    def describe(self) -> str:
        """How many image files were found where, and any the listing had to skip."""
        where = "under" if self.kind == "folder" else "listed in"
        lines = [f"{self.n_files} image files {where} {self.source}"]
        unscanned = self.n_files - sum(self.label_counts.values())
        if self.kind == "folder" and unscanned > 0:  # Spark's scan skips empty files
            lines.append(f"{unscanned} of them empty or unreadable: not counted per label")
        lines += [f"warning: {note}" for note in skipped_notes(self.skipped())]
        return "\n".join(lines)

    def skipped(self) -> dict:
        """What metrics.json says of the image files Spark's listing dropped, and of the
        labels made of several folders."""
        return skipped_fields(
            self.hidden, self.broken_links, self.not_images, self.not_utf8, self.several_folders
        )

    @property
    def n_hidden(self) -> int:
        return len(self.hidden)

    def labels(self) -> dict[str, int]:
        """Files per label, as the listing's scan returned them."""
        return dict(self.label_counts)

    def sample(self, per_label: int, max_labels: int = 12) -> list[tuple[str, str]]:
        """``(label, path)`` of a few files of each of the first labels, for a first look.

        Up to :data:`SAMPLES_PER_LABEL` per label come with the listing; more take a job.
        """
        if per_label <= SAMPLES_PER_LABEL:
            chosen = {label: paths[:per_label] for label, paths in self.label_samples.items()}
        else:
            first = Window.partitionBy("label").orderBy("path")
            rows = (
                self.files.select("label", "path")
                .withColumn("rank", F.row_number().over(first))
                .where(F.col("rank") <= per_label)
                .collect()
            )
            chosen = {}
            for row in rows:
                chosen.setdefault(row["label"], []).append(row["path"])
        labels = sorted(chosen)[:max_labels]
        return [(label, path) for label in labels for path in sorted(chosen[label])]

    def unscanned(self, scanned: DataFrame) -> DataFrame:
        """Listed files (``path``, ``label``) with no row in ``scanned``: a folder's empty,
        vanished or unreadable files, which Spark's file scan drops without a word. Only the
        JVM holds the list."""
        if self.relation is None:
            return scanned.sparkSession.createDataFrame([], "path string, label string")
        spark = self.relation.sparkSession
        jvm = spark.sparkContext._jvm
        # WrappedArray.make takes the String[] as an Object: py4j cannot pass it as varargs.
        uris = jvm.scala.collection.mutable.WrappedArray.make(self.relation._jdf.inputFiles())
        found = DataFrame(
            spark._jsparkSession.createDataset(
                uris, jvm.org.apache.spark.sql.Encoders.STRING()
            ).toDF(),
            spark,
        )
        listed = found.select(_path_spelling(F.col("value")).alias("path"))
        unscanned = listed.join(scanned.select("path"), "path", "left_anti")
        return unscanned.select("path", label_column(F.col("path")).alias("label"))

    def release(self) -> None:
        self.files.unpersist()


class LabelCounts(NamedTuple):
    counts: dict[str, int]  # files per label, sorted by label
    samples: dict[str, list[str]]  # a few paths of each label
    largest: int | None  # the largest file's size (None: no size known)
    several_folders: dict[str, list[str]]  # labels of files in several folders: two of them


def count_labels(files: DataFrame) -> LabelCounts:
    """Rows per label, up to :data:`SAMPLES_PER_LABEL` of each label's paths, the largest
    file's size, and the labels whose files sit in several folders: one aggregation, one row
    per label to the driver.

    The samples are the files with the smallest seeded hashes of their label and name (one
    seed per sample; the path breaks ties), so the first look at the input costs no job of
    its own and shows the same files wherever the data set sits; a small label can repeat
    a file, which counts once. Files of more than :data:`SAMPLE_MAX_BYTES` are not shown:
    the driver reads each sample whole.
    """
    name = name_column(F.col("path"))
    shown = F.coalesce(F.col("size"), F.lit(0)) <= SAMPLE_MAX_BYTES
    picks = [
        F.min_by(
            "path", F.when(shown, F.struct(F.xxhash64(F.lit(seed), "label", name), "path"))
        ).alias(f"sample{seed}")
        for seed in range(SAMPLES_PER_LABEL)
    ]
    folder = F.regexp_extract("path", r"^(.*)/[^/]*$", 1)
    rows = (
        files.groupBy("label")
        .agg(
            F.count(F.lit(1)).alias("count"),
            F.max("size").alias("largest"),
            F.min(folder).alias("first_folder"),
            F.max(folder).alias("last_folder"),
            *picks,
        )
        .collect()
    )
    counts, samples, several = {}, {}, {}
    for row in sorted(rows, key=lambda row: row["label"]):
        counts[row["label"]] = row["count"]
        picked = {row[f"sample{seed}"] for seed in range(SAMPLES_PER_LABEL)} - {None}
        samples[row["label"]] = sorted(picked)
        if row["first_folder"] != row["last_folder"]:
            several[row["label"]] = [row["first_folder"], row["last_folder"]]
    largest = max((row["largest"] for row in rows if row["largest"]), default=None)
    return LabelCounts(counts, samples, largest, several)


def fingerprint(rows: DataFrame, n_files: int) -> str:
    """An order-independent hash of ``(path, label, size, modified)`` over ``rows``, summed on
    the executors: two listings get the same value when they hold the same files unchanged."""
    row = rows.agg(*fingerprint_sums()).first()
    return fingerprint_digest(n_files, [row])


SCANNED_COUNT = "count"
FINGERPRINT_SUMS = (SCANNED_COUNT, "a", "b")
"""The names of :func:`fingerprint_sums`'s aggregates, which :func:`fingerprint_digest` reads."""


def fingerprint_sums() -> list[Column]:
    """The aggregates :func:`fingerprint` sums, for a job that has other counting to do:
    sums over groups of rows add up to the sums over all of them."""
    key = F.concat_ws(
        "\u0000",
        "path",
        "label",
        F.coalesce(F.col("size").cast("string"), F.lit("")),
        F.coalesce(F.col("modified").cast("string"), F.lit("")),
    )
    _, xxhash_sum, hash_sum = FINGERPRINT_SUMS
    return [
        F.count(F.lit(1)).alias(SCANNED_COUNT),
        F.sum(F.xxhash64(key).cast("decimal(38,0)")).alias(xxhash_sum),
        F.sum(F.hash(key).cast("decimal(38,0)")).alias(hash_sum),
    ]


def fingerprint_digest(n_files: int, groups: list) -> str:
    """The fingerprint from :func:`fingerprint_sums` over one or more groups of rows."""
    _, *hash_sums = FINGERPRINT_SUMS
    n = sum(group[SCANNED_COUNT] for group in groups)
    a, b = (sum((group[name] or 0 for group in groups), Decimal(0)) for name in hash_sums)
    return hashlib.sha256(f"{n_files}:{n}:{a}:{b}".encode()).hexdigest()


def _path_spelling(uri: Column) -> Column:
    """``inputFiles()`` spelling (``file:///a%20b``) -> the ``path`` column's (``file:/a b``).

    ``+`` is protected first: URI paths keep it literally, form decoding would not.
    """
    unencoded = F.regexp_replace(uri, r"^file:///", "file:/")
    return F.url_decode(F.replace(unencoded, F.lit("+"), F.lit("%2B")))
