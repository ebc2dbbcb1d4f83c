"""``features/`` as batches appended by runs: what an incremental run must featurize, and
the commit that makes its rows visible exactly once.

Layout: ``OUTPUT/features/batch=<id>/part-*.parquet`` with ``path``, ``label``, ``size``,
``modified`` and ``features``, beside ``_extraction.json``. A full run writes one batch; an
incremental run adds one. The folder itself is the record of what has been featurized:
there is no log to keep in step with it, so any Parquet reader sees exactly the committed
rows.

An incremental run:

1. plans: the listing's rows that ``features/`` lacks (matched on path, label, size and
   modification time) are to be featurized, except those ``rejected/`` already holds with a
   verdict on their bytes (:data:`SETTLED_REJECTIONS`): they stay rejected, unread; stored
   rows the listing no longer has (files gone or changed) are stale, and the part files
   holding them are known;
2. writes the new rows, plus the rows of those part files that are not stale, into
   ``OUTPUT/_staging/`` (nothing in ``features/`` changes);
3. commits: deletes those part files, then moves the staged folder in as a new batch.

A run killed before step 3 leaves ``features/`` as it was. A kill inside step 3 can only
*remove* rows (a deleted part file's unchanged rows, or staged rows not moved yet), never
duplicate them. Step 3 starts by deleting ``features/_extraction.json`` and the PCA's
statistics (:func:`imagepca.pipeline.extract_features` writes them again after it), so a run
that dies after it leaves no description of other rows: the next run is a full one.

Why not Structured Streaming's file source with ``Trigger.AvailableNow``: it notices new
paths only (a rewritten file keeps its old features, a deleted one is never dropped), it
reads a folder and not a manifest, and it keeps every path it has seen in a log the driver
loads into memory, the per-file driver state this design avoids. A table format (Delta
Lake, Iceberg: both on EMR) would give the same transactions off the shelf, but needs jars
this project cannot assume everywhere it runs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .session import spark_settings
from .storage import Storage, join, literal, normalize_uri, vector_write_settings

BATCH_COLUMN = "batch"
LAYOUT = "batches-v1"  # features/_extraction.json "layout": what plan_increment can extend
ROW_KEY = ("path", "label", "size", "modified")
STORED_COLUMNS = (*ROW_KEY, "features")
# Rejections decided by a file's bytes: the same file (path, label, size and time) under the
# same extraction parameters (an increment shares FEATURE_KEYS) and the same Pillow gets the
# same one, so an increment keeps them without reading the file again. A file missing or
# unreadable may be readable next time, and a manifest row without size or time cannot be
# seen to be unchanged: those are read again.
SETTLED_REJECTIONS = ("empty file", "not an image", "corrupt image", "decompression bomb")
# Extraction parameters that change the features, or which images have one (the largest
# image accepted): an increment must share them all.
FEATURE_KEYS = ("weights_sha256", "engine", "image_size", "fast_decode", "max_image_pixels")


def new_batch_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def batch_folder(features_uri: str, batch_id: str) -> str:
    return join(features_uri, f"{BATCH_COLUMN}={batch_id}")


def why_not_incremental(stored: dict | None, identity: dict) -> str | None:
    """Why the stored features cannot be extended (a full run is needed), or None."""
    if stored is None:
        return "no features in the output yet"
    if stored.get("layout") != LAYOUT:
        return "the stored features predate incremental runs (no batches)"
    changed = [key for key in FEATURE_KEYS if stored["params"].get(key) != identity[key]]
    if changed:
        return f"the stored features were made with other {', '.join(changed)}"
    return None


# What stored features depend on: --reuse-features keeps them only when all are the same.
# The listing's fingerprint (every file's path, label, size and time) says which images they
# are, however the input was spelled (a relative path, file://, a trailing slash) or listed.
REUSE_KEYS = ("listing_fingerprint", *FEATURE_KEYS)
_REUSE_NAMES = {"listing_fingerprint": "input files", "weights_sha256": "weights"}


def why_not_reused(stored: dict | None, identity: dict) -> str | None:
    """Why ``reuse_features`` featurizes again, or None when the stored features are what
    this run would make (``identity``: its parameters, weights digest and listing)."""
    if not stored:
        return "no features in the output yet"
    changed = [key for key in REUSE_KEYS if stored["params"].get(key) != identity.get(key)]
    if changed:
        names = ", ".join(_REUSE_NAMES.get(key, key) for key in changed)
        return f"the stored features were made with other {names}"
    return None


@dataclass
class Increment:
    """What an incremental run does to ``features/``."""

    planned: DataFrame  # cached: the listing's rows features/ lacks
    todo: DataFrame  # listing rows to featurize (path, label, size, modified)
    n_todo: int
    n_stale: int  # stored rows of files gone or changed: dropped
    stale_files: list[str]  # part files holding them: rewritten without them
    survivors: DataFrame | None  # the other rows of those part files
    n_kept: int  # stored rows carried over unchanged
    # Files rejected before, unchanged, with a settled reason: rejected/'s rows for them.
    still_rejected: DataFrame | None = None
    still_rejected_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def n_still_rejected(self) -> int:
        return sum(self.still_rejected_by_kind.values())

    def release(self) -> None:
        self.planned.unpersist()

    def described(self, n_featurized: int, batch_id: str | None) -> dict:
        """``_extraction.json``'s ``incremental`` block for this increment."""
        return {
            "featurized": n_featurized,
            "read": self.n_todo,
            "kept": self.n_kept,
            "dropped": self.n_stale,
            "rewritten_part_files": len(self.stale_files),
            "still_rejected": self.n_still_rejected,
            "batch": batch_id,
        }


def _same_files(left: DataFrame, right: DataFrame) -> list:
    return [left[c].eqNullSafe(right[c]) for c in ROW_KEY]


def settled_rejections(
    spark: SparkSession, rejected_uri: str, description: dict
) -> DataFrame | None:
    """``rejected/``'s rows whose reason an increment keeps (:data:`SETTLED_REJECTIONS`),
    or None when ``description`` (``features/_extraction.json``) counted none (then nothing
    is read), when another Pillow decoded them (a newer one may read what an older could
    not), or when ``rejected/`` is missing or predates the columns that tell a file
    unchanged."""
    if not set(description.get("rejected_by_kind", {})) & set(SETTLED_REJECTIONS):
        return None
    if description.get("versions", {}).get("pillow") != metadata.version("pillow"):
        return None
    try:
        earlier = spark.read.parquet(literal(rejected_uri))
    except AnalysisException:  # none written (a run stopped before it)
        return None
    if not set(ROW_KEY) <= set(earlier.columns):
        return None
    settled = (
        F.substring_index("reason", ":", 1).isin(*SETTLED_REJECTIONS)
        & F.col("size").isNotNull()
        & F.col("modified").isNotNull()
    )
    # One row per file, whatever a copy of rejected/ made of it.
    return earlier.filter(settled).dropDuplicates(list(ROW_KEY))


def plan_increment(
    spark: SparkSession,
    features_uri: str,
    listing: DataFrame,
    rejected_uri: str,
    description: dict,
) -> Increment:
    """Compare the listing with ``features/`` (``description``: its ``_extraction.json``)
    and ``rejected/``: only counts and the (few) part-file names of stale rows reach the
    driver."""
    stored = spark.read.parquet(literal(features_uri)).select(
        *ROW_KEY, F.input_file_name().alias("file")
    )
    new = listing.join(stored, _same_files(listing, stored), "left_anti")
    settled = settled_rejections(spark, rejected_uri, description)
    if settled is None:
        planned = todo = new.persist(StorageLevel.MEMORY_AND_DISK)
        n_todo, still_rejected, by_kind = todo.count(), None, {}
    else:
        # One job tells the files to read from those rejected before, and counts both.
        earlier = (*ROW_KEY, "reason")
        verdicts = settled.select(*(F.col(c).alias(f"earlier_{c}") for c in earlier))
        same = [new[c].eqNullSafe(verdicts[f"earlier_{c}"]) for c in ROW_KEY]
        planned = new.join(verdicts, same, "left").persist(StorageLevel.MEMORY_AND_DISK)
        kind = F.substring_index("earlier_reason", ":", 1).alias("kind")
        by_kind = {row["kind"]: row["count"] for row in planned.groupBy(kind).count().collect()}
        n_todo = by_kind.pop(None, 0)  # no earlier rejection: to read
        todo = planned.filter(F.col("earlier_reason").isNull()).select(*ROW_KEY)
        still_rejected = planned.filter(F.col("earlier_reason").isNotNull()).select(
            *(F.col(f"earlier_{c}").alias(c) for c in earlier)
        )
    stale = stored.join(listing, _same_files(stored, listing), "left_anti")
    by_file = stale.groupBy("file").count().collect()
    stale_files = sorted(normalize_uri(row["file"]) for row in by_file)
    n_stale = sum(row["count"] for row in by_file)
    survivors = None
    if stale_files:
        survivors = (
            spark.read.parquet(*map(literal, stale_files))
            .select(*STORED_COLUMNS)
            .join(stale.select("path"), "path", "left_anti")
        )
    n_stored = stored.count()
    return Increment(
        planned=planned,
        todo=todo,
        n_todo=n_todo,
        n_stale=n_stale,
        stale_files=stale_files,
        survivors=survivors,
        n_kept=n_stored - n_stale,
        still_rejected=still_rejected,
        still_rejected_by_kind=by_kind,
    )


def stage_batch(new_rows: DataFrame, increment: Increment, staged_uri: str) -> None:
    """Write the batch an increment adds: its new rows and the survivors of rewritten files."""
    rows = new_rows.select(*STORED_COLUMNS)
    if increment.survivors is not None:
        rows = rows.unionByName(increment.survivors)
    with spark_settings(rows.sparkSession, vector_write_settings(rows)):
        rows.write.parquet(staged_uri)


def commit_batch(
    storage: Storage,
    features_uri: str,
    staged_uri: str,
    increment: Increment,
    batch_id: str,
    n_new: int,
    descriptions: list[str],
) -> str | None:
    """Swap the rewritten part files for the staged batch (see the module's protocol); its
    id, or None when it adds nothing and drops nothing: ``features/`` then stays as it was
    (no empty batch), and the staged folder goes.

    ``descriptions`` (the files describing ``features/``) go first: a run that fails before
    writing them again leaves none that describes another run's rows (notebook 02 then asks
    for notebook 01; the next run is a full one).
    """
    if not (n_new or increment.stale_files):
        storage.delete(staged_uri)
        return None
    for uri in descriptions:
        storage.delete(uri)
    for part_file in increment.stale_files:
        storage.delete(part_file)
    storage.rename(staged_uri, batch_folder(features_uri, batch_id))
    return batch_id


def batches(storage: Storage, features_uri: str) -> list[str]:
    """The batch ids under ``features/``, oldest first."""
    return sorted(
        name.split("=", 1)[1]
        for name in storage.list_names(features_uri)
        if name.startswith(f"{BATCH_COLUMN}=")
    )
