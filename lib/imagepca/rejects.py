"""Every image file found ends up in ``features/`` or in ``rejected/`` with its reason.

Notebook 01's accounting: which files the featurization could not use and why, files the
scan never returned (Spark's file scan drops empty, vanished and unreadable files without a
word), and the stop for a run that has nothing to reduce or more rejects than it allows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import ExtractParams
from .executor_reads import (
    PYARROW_SCHEMES,
    read_options,
    unscanned_reason,
    unscanned_reasons,
    uri_scheme,
)
from .images import InputError
from .increments import ROW_KEY, Increment
from .listing import FINGERPRINT_SUMS, SCANNED_COUNT, ImageListing, fingerprint_sums
from .session import default_parallelism
from .storage import Storage, error_summary, join, literal

if TYPE_CHECKING:
    from .pipeline import Extraction


# rejected/'s columns: the file, why, and what tells an increment the file is unchanged (null
# where the listing has no size or time, or the file was never scanned).
REJECTED_COLUMNS = ("path", "reason", "label", "size", "modified")
# Rejected rows reach the driver with their time in microseconds: exact, unlike JSON's.
_OBSERVED_FIELDS = {
    "path": "string", "reason": "string", "label": "string", "size": "long", "modified_us": "long"
}  # fmt: skip


# Rejected rows the featurization job reports to the driver, at most (as its tasks were
# planned). Each costs the driver's JVM about 11 kB as the tasks' observations merge
# (docs/performance.md): 5,000 rows, some 55 MB. When more files are rejected, the others
# are found again and given their reasons on the executors, and rejected/ is written from
# there: however many files a run rejects, the driver never holds them all.
REPORTED_REJECTS_MAX = 5_000
# Files no scan returned that the driver looks up itself (a request each, one after the
# other: an object store's take tens of milliseconds); more are looked up on the executors.
DRIVER_LOOKUPS_MAX = 1_000
LOOKUP_TASKS_PER_CORE = 4
# The reason of a file rejected by the featurization that decodes when it is read again.
CHANGED_REASON = "changed: the file was replaced while the run read it; run again to featurize it"


class RejectedShareError(RuntimeError):
    """More images were rejected than the run allows (``max_rejected_fraction``)."""


def reported_per_task(n_tasks: int) -> int:
    """The rejected rows each of ``n_tasks`` featurization tasks reports (``reported``)."""
    return max(1, REPORTED_REJECTS_MAX // max(1, n_tasks))


def outcome_metrics() -> list[Column]:
    """What the featurization job observes (``DataFrame.observe``) as it writes
    ``features/``, so that nothing reads the featurized rows again: the scanned rows' count
    and fingerprint sums, the rejected rows' count, and the rejected rows its tasks report
    (path, reason, label, size and time: one short row per unusable file, up to
    :data:`REPORTED_REJECTS_MAX`)."""
    rejected = F.col("reason").isNotNull()
    row = F.struct(
        "path", "reason", "label", "size", F.unix_micros("modified").alias("modified_us")
    )
    return [
        *fingerprint_sums(),
        F.count_if(rejected).alias("n_rejected"),
        F.to_json(F.collect_list(F.when(F.col("reported"), row))).alias("rejects"),
    ]


@dataclass(frozen=True)
class Outcomes:
    """The featurization job's observations (:func:`outcome_metrics`)."""

    scanned: int  # rows the scan returned, featurized or rejected
    rejects: list[dict]  # path, reason, label, size, modified_us of each reported rejected row
    sums: dict  # fingerprint sums over the scanned rows (count, a, b)
    n_rejected: int  # rejected rows, reported or not

    @classmethod
    def observed(cls, metrics: dict) -> Outcomes:
        rejects = json.loads(metrics["rejects"])
        sums = {name: metrics[name] for name in FINGERPRINT_SUMS}
        return cls(sums[SCANNED_COUNT], rejects, sums, metrics["n_rejected"])

    @property
    def complete(self) -> bool:
        """Whether every rejected row was reported."""
        return len(self.rejects) == self.n_rejected

    @property
    def n_featurized(self) -> int:
        return self.scanned - self.n_rejected

    def featurized_per_label(self, listed: dict[str, int]) -> dict[str, int] | None:
        """Featurized images per label: the listing's counts less the rejected rows; None
        when some rejected rows were not reported, or the scan did not return every listed
        file (the listing's counts are then not the scanned rows')."""
        if not self.complete:
            return None
        per_label = Counter(listed)
        per_label.subtract(Counter(row["label"] for row in self.rejects))
        if per_label.total() != self.n_featurized or min(per_label.values(), default=0) < 0:
            return None
        return {label: n for label, n in sorted(per_label.items()) if n}


def rejected_files(
    spark: SparkSession,
    storage: Storage,
    listing: ImageListing,
    outcomes: Outcomes,
    featurized_uri: str,
    increment: Increment | None,
    read_again: Callable[[DataFrame, int], DataFrame],
) -> tuple[DataFrame, dict[str, int]]:
    """The run's rejected files with reasons, and their count by kind.

    Besides the rows the featurization job reported: the listed files no scan returned
    (:func:`_unscanned`), looked up on the executors when there are more than
    :data:`DRIVER_LOOKUPS_MAX` on file systems pyarrow reaches, else by the driver; the
    rejected rows the job did not report (:func:`_unreported`); an increment's rejected
    files it did not read again (``increment.still_rejected``). Rows found on the executors
    are cached, for their count by kind and the write, until the caller unpersists the
    DataFrame returned.
    """
    rows = list(outcomes.rejects)
    found: list[DataFrame] = []  # rows found on the executors
    unscanned = _unscanned(spark, listing, outcomes, featurized_uri, increment)
    if unscanned is not None:
        few = unscanned.limit(DRIVER_LOOKUPS_MAX + 1).collect()
        reachable = {uri_scheme(row["path"]) for row in few} <= set(PYARROW_SCHEMES)
        if len(few) > DRIVER_LOOKUPS_MAX and reachable:
            found.append(_looked_up(spark, unscanned))
        else:  # a request each, in turn, through Hadoop's file systems (every scheme)
            listed = few if len(few) <= DRIVER_LOOKUPS_MAX else unscanned.collect()
            rows += [
                {**row.asDict(), "reason": unread_reason(storage, row["path"])} for row in listed
            ]
    if not outcomes.complete:
        found.append(_unreported(spark, listing, outcomes, featurized_uri, increment, read_again))
    rejected = _rejected_frame(spark, rows)
    for frame in found:
        rejected = rejected.unionByName(frame)
    still_rejected = increment.still_rejected if increment else None
    if still_rejected is not None:
        rejected = rejected.unionByName(still_rejected)
    if not found:
        by_kind = Counter(row["reason"].split(":")[0] for row in rows)
        if still_rejected is not None:
            by_kind.update(increment.still_rejected_by_kind)
        return rejected, dict(sorted(by_kind.items()))
    rejected = rejected.persist(StorageLevel.MEMORY_AND_DISK)
    kinds = rejected.groupBy(F.substring_index("reason", ":", 1).alias("kind")).count()
    try:
        by_kind = Counter({row["kind"]: row["count"] for row in kinds.collect()})
    except BaseException:
        rejected.unpersist()
        raise
    return rejected, dict(sorted(by_kind.items()))


def _unscanned(
    spark: SparkSession,
    listing: ImageListing,
    outcomes: Outcomes,
    featurized_uri: str,
    increment: Increment | None,
) -> DataFrame | None:
    """The listed files (``path``, ``label``) no scan returned (a folder's empty, vanished
    and unreadable files: its scan reads the listed files only, so fewer rows than files
    means some were skipped), or None when it returned every one."""
    scanned = outcomes.scanned
    if increment:
        scanned = increment.n_todo + increment.n_kept + increment.n_still_rejected
    if listing.relation is None or scanned >= listing.n_files:
        return None
    if increment or not outcomes.complete:  # the files a scan may return are read again
        return listing.unscanned(listing.files)
    return listing.unscanned(_seen(spark, outcomes, featurized_uri))


def _seen(spark: SparkSession, outcomes: Outcomes, featurized_uri: str) -> DataFrame:
    """The paths of the job's featurized rows (in ``featurized_uri``) and reported rejects."""
    seen = spark.read.parquet(literal(featurized_uri)).select("path")
    if outcomes.rejects:
        seen = seen.unionByName(_rejected_frame(spark, outcomes.rejects).select("path"))
    return seen


def _looked_up(spark: SparkSession, unscanned: DataFrame) -> DataFrame:
    """Rejected rows for files no scan returned, looked up on the executors
    (:func:`imagepca.executor_reads.unscanned_reasons`): too many for the driver's requests.
    A task looks its files up together, in one pool of threads, whatever the Arrow batches
    (the featurization's hold a few rows when its files are large)."""
    options = read_options(spark)

    def look_up(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        frames = list(batches)  # none in an empty partition
        if frames:
            files = pd.concat(frames, ignore_index=True)
            yield files.assign(reason=unscanned_reasons(files["path"], options))

    tasks = default_parallelism(spark) * LOOKUP_TASKS_PER_CORE
    schema = "path string, label string, reason string"
    looked_up = unscanned.repartition(tasks).mapInPandas(look_up, schema)
    unknown = {"size": F.lit(None).cast("long"), "modified": F.lit(None).cast("timestamp")}
    return looked_up.withColumns(unknown).select(*REJECTED_COLUMNS)


def _unreported(
    spark: SparkSession,
    listing: ImageListing,
    outcomes: Outcomes,
    featurized_uri: str,
    increment: Increment | None,
    read_again: Callable[[DataFrame, int], DataFrame],
) -> DataFrame:
    """Rejected rows the featurization job did not report: the files it read that are neither
    in ``featurized_uri`` (its featurized rows) nor reported, read again by ``read_again``
    (listing rows and their count -> the rows with ``out``, the featurization's struct,
    read through pyarrow's file systems). A file the scan could not read but pyarrow can
    then gets the reason its bytes give (or :data:`CHANGED_REASON`)."""
    read = (increment.todo if increment else listing.files).select(*ROW_KEY)
    n_unreported = outcomes.n_rejected - len(outcomes.rejects)
    unreported = read.join(_seen(spark, outcomes, featurized_uri), "path", "left_anti")
    out = read_again(unreported, n_unreported)
    reason = F.coalesce("out.reason", F.lit(CHANGED_REASON)).alias("reason")
    return out.select(*ROW_KEY, reason).select(*REJECTED_COLUMNS)


def _rejected_frame(spark: SparkSession, rows: list[dict]) -> DataFrame:
    """``rows`` as a DataFrame made in the JVM: PySpark sends a non-empty pandas DataFrame
    through Arrow (the session enables it), but a list of tuples, or an empty pandas
    DataFrame, to Python workers of their own, forked for that one job."""
    if rows:
        table = pd.DataFrame(rows, columns=list(_OBSERVED_FIELDS))
        table = table.astype({"size": "Int64", "modified_us": "Int64"})  # nulls kept
        schema = ", ".join(f"{name} {kind}" for name, kind in _OBSERVED_FIELDS.items())
        observed = spark.createDataFrame(table, schema)
    else:
        observed = spark.range(0).select(
            *(F.lit(None).cast(kind).alias(name) for name, kind in _OBSERVED_FIELDS.items())
        )
    modified = F.timestamp_micros("modified_us")
    return observed.withColumn("modified", modified).select(*REJECTED_COLUMNS)


def checked(extraction: Extraction, params: ExtractParams) -> Extraction:
    """Stop a run that has nothing to reduce, or more rejects than the user allows."""
    found, rejected = extraction.metadata["n_files_found"], extraction.n_rejected
    report = join(params.output, "rejected")
    if extraction.n_images == 0:
        where = "under" if params.input is not None else "listed in"
        kinds = ", ".join(f"{n} {k}" for k, n in extraction.metadata["rejected_by_kind"].items())
        raise InputError(
            f"none of the {found} image files {where} {params.source!r} could be used ({kinds}); "
            f"see {report} for each file's reason"
        )
    share = rejected / found
    if share > params.max_rejected_fraction:
        raise RejectedShareError(
            f"{rejected} of {found} image files ({share:.1%}) were rejected, more than "
            f"max_rejected_fraction={params.max_rejected_fraction:g}; see {report} for the reasons"
        )
    return extraction


def unread_reason(storage: Storage, path: str) -> str:
    try:
        size = storage.size(path)
    except Exception as error:  # vanished or inaccessible since the listing
        name, message = error_summary(error)
        missing = isinstance(error, Py4JJavaError) and name == "FileNotFoundException"
        return f"{'missing' if missing else 'unreadable'}: {name}: {message}"
    return unscanned_reason(size)
