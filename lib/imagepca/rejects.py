"""Every image file found ends up in ``features/`` or in ``rejected/`` with its reason.

Notebook 01's accounting: which files the featurization could not use and why, files the
scan never returned (Spark's file scan drops empty, vanished and unreadable files without a
word), and the stop for a run that has nothing to reduce or more rejects than it allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import ExtractParams
from .images import InputError
from .increments import Increment
from .inputs import ImageListing
from .storage import Storage, error_summary, join

if TYPE_CHECKING:
    from .pipeline import Extraction


class RejectedShareError(RuntimeError):
    """More images were rejected than the run allows (``max_rejected_fraction``)."""


def rejected_files(
    spark: SparkSession,
    storage: Storage,
    listing: ImageListing,
    scored: DataFrame,
    outcomes: list,
    increment: Increment | None,
) -> tuple[DataFrame, dict[str, int], int]:
    """The run's rejected files with reasons, their count by kind, and the featurized count.

    A folder's scan reads the listed files only, so fewer rows than files means some were
    skipped (empty, vanished, unreadable): only then are they looked for, with Spark.
    """
    n_new, by_kind = 0, {}
    for row in outcomes:
        if row["kind"] is None:
            n_new += row["count"]
        else:
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["count"]
    rejected = scored.filter(F.col("reason").isNotNull()).select("path", "reason")
    scanned = (
        (increment.n_todo + increment.n_kept)
        if increment
        else sum(row["count"] for row in outcomes)
    )
    if listing.relation is not None and scanned < listing.n_files:
        seen = listing.files if increment else scored
        unread = [
            (row["path"], unread_reason(storage, row["path"]))
            for row in listing.unscanned(seen).collect()  # the few files no scan returned
        ]
        for _, reason in unread:
            kind = reason.split(":")[0]
            by_kind[kind] = by_kind.get(kind, 0) + 1
        if unread:
            rejected = rejected.unionByName(
                spark.createDataFrame(unread, "path string, reason string")
            )
    return rejected, dict(sorted(by_kind.items())), n_new


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
    if size == 0:
        return "empty file: 0 bytes"
    return "unreadable: the scan could not read it (I/O error)"
