"""Where a run's images come from: a folder listed by Spark, or a manifest of image URIs.

Either way the driver gets an :class:`imagepca.listing.ImageListing` whose rows (``path``,
``label``, ``size``, ``modified``) are a Spark DataFrame: counts, labels, the listing's
fingerprint and the accounting of files that could not be read are Spark jobs, and no
Python collection of every path is ever built on the driver.

* A folder (``input``) is listed by Spark's ``binaryFile`` source. Spark lists on the
  executors when a level holds many folders, but its file index keeps every file's status
  in the driver's JVM: fine for millions of files, not for 10^8.
* A manifest (``manifest``) is a table of URIs that Spark reads like any data: a CSV or
  Parquet file with a ``path`` column (optional ``label``, ``size``, ``modified``), or the
  ``manifest.json`` of an S3 Inventory report. Nothing is listed at all; the executors read
  each image's bytes themselves (:func:`imagepca.executor_reads.read_files`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from .config import URI_SCHEME, ExtractParams, expand_home
from .executor_reads import BINARY_FILE_MAX_BYTES
from .images import (
    IMAGE_EXTENSIONS,
    InputError,
    extension_glob,
    label_column,
    skipped_fields,
    skipped_notes,
)
from .inventory import inventory_table
from .listing import ImageListing, count_labels
from .local_folders import is_plain_folder, skipped_images
from .session import cached_shuffle_settings, default_parallelism, spark_settings
from .storage import Storage, error_line, is_local, literal, local_path, on_local_disk

LISTING_TASKS_PER_CORE = 2  # a listing task only asks each file's status
PARALLEL_DISCOVERY_KEY = "spark.sql.sources.parallelPartitionDiscovery.threshold"


def list_inputs(spark: SparkSession, params: ExtractParams) -> ImageListing:
    """The run's image files: its manifest's URIs, or the files under its input folder."""
    started = time.perf_counter()
    if params.manifest is not None:
        listing = read_manifest(spark, params.manifest)
    else:
        listing = list_folder(spark, params.input)
    return replace(listing, seconds=round(time.perf_counter() - started, 3))


# -- a folder -------------------------------------------------------------------------------


def folder_reader(spark: SparkSession, *, local: bool):
    """The ``binaryFile`` reader of an input folder; ``local``: on this machine's disk
    (:func:`imagepca.storage.on_local_disk`)."""
    reader = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", extension_glob())
        # A file that disappears or cannot be read is skipped by the scan and then
        # reported as rejected by the listing comparison, instead of failing the job.
        .option("ignoreCorruptFiles", "true")
        .option("ignoreMissingFiles", "true")
    )
    if not local:
        # A reader's options are in the configuration of the file system it opens, which
        # Hadoop caches by scheme and bucket alone: S3A's or HDFS's would keep the raw
        # local one below, which their copies to and from local files cannot use.
        return reader
    # Hadoop's checksummed local file system cannot open a name with ":" (its checksum
    # file's name parses as a URI); images have no checksums. 10,000 files: 20 % quicker.
    # A file system of its own (not the cached one), for this read only.
    return reader.option("fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem").option(
        "fs.file.impl.disable.cache", "true"
    )


def list_folder(spark: SparkSession, input_uri: str) -> ImageListing:
    """List the image files under ``input_uri`` (recursively, by extension, any case).

    Raises
    ------
    InputError
        When the location does not exist or holds no image file.
    """
    local = on_local_disk(spark, input_uri)
    # Past 32 sub-folders Spark lists them in a job, which on the driver's own disk costs more
    # than the listing (2,000 files in 60 folders: 2.1 -> 0.8 s); object stores keep it.
    discovery = {PARALLEL_DISCOVERY_KEY: str(2**31 - 1)} if local else {}
    try:
        with spark_settings(spark, discovery):
            relation = folder_reader(spark, local=local).load(literal(input_uri))
        n_files = len(relation._jdf.inputFiles())  # counted in the JVM: no Python copy
        # A file Spark's binaryFile cannot hold fails the job that reads its bytes: it is left
        # out as the empty ones are (counted, not listed), and reported unread.
        relation = relation.where(F.col("length") <= BINARY_FILE_MAX_BYTES)
    except (AnalysisException, Py4JJavaError) as error:
        where = Storage(spark).relative_note(input_uri)
        raise InputError(
            f"input location {input_uri!r} cannot be read{where}: {error_line(error)}. Pass "
            "a folder (or s3:// prefix) that holds one sub-folder of images per class, or a "
            "manifest of image URIs (manifest=..., --manifest with imagepca run)."
        ) from None
    # What Spark's listing dropped, found on the local disk (an object store is not listed
    # twice to count them).
    hidden, broken, not_utf8 = (
        skipped_images(local_path(input_uri), IMAGE_EXTENSIONS) if local else ([], [], [])
    )
    if not n_files:
        skipped = skipped_fields(tuple(hidden), tuple(broken), (0, None), tuple(not_utf8))
        notes = skipped_notes(skipped)
        raise InputError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {input_uri!r}. "
            "Expected one sub-folder per class, e.g. INPUT/apple/1.jpg, INPUT/banana/2.jpg."
            + "".join(f" {note}." for note in notes)
        )
    # Statuses only: binaryFile reads a file's bytes only when `content` is selected. Kept
    # (paths and sizes) for the sample, the fingerprint and an increment, filled by the job
    # counting the labels. Spark would pack small files into hundreds of scan tasks (10 s for
    # 10,000 files here): the plan is made and split under settings giving a few even tasks.
    settings = scan_settings(n_files, default_parallelism(spark), LISTING_TASKS_PER_CORE)
    with spark_settings(spark, settings):
        files = folder_rows(relation).persist(StorageLevel.MEMORY_AND_DISK)
        labels = count_labels(files)
    return ImageListing(
        input_uri, "folder", files, n_files, labels.counts, labels.samples, relation=relation,
        largest_file=labels.largest, hidden=tuple(hidden), broken_links=tuple(broken),
        not_utf8=tuple(not_utf8), several_folders=labels.several_folders,
    )  # fmt: skip


def folder_rows(relation: DataFrame, *extra: Column) -> DataFrame:
    """A ``binaryFile`` relation's rows as listing columns (plus ``extra``, e.g. content)."""
    return relation.select(
        "path",
        label_column(F.col("path")).alias("label"),
        F.col("length").alias("size"),
        F.col("modificationTime").alias("modified"),
        *extra,
    )


def scan_settings(n_files: int, cores: int, tasks_per_core: int) -> dict[str, str]:
    """Spark file-scan settings that split ``n_files`` into even tasks by file count.

    Spark packs files into scan tasks by bytes plus a per-file "open cost". Featurizing
    costs about the same for every image whatever its size, so an open cost far above any
    image's size makes Spark pack by count: about ``cores * tasks_per_core`` tasks, instead
    of hundreds of tiny ones for small JPEGs or too few for large ones.
    """
    tasks = max(1, min(n_files, cores * tasks_per_core))
    open_cost = 1 << 30
    return {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(-(-n_files // tasks) * (open_cost + (1 << 20))),
        "spark.sql.files.minPartitionNum": str(tasks),
    }


# -- a manifest -----------------------------------------------------------------------------


def read_manifest(spark: SparkSession, manifest_uri: str) -> ImageListing:
    """The image URIs of a manifest: CSV (header row), Parquet, or S3 Inventory JSON.

    Rows whose URI does not end in an image extension are not read: an inventory lists
    every object of a bucket; a CSV or Parquet manifest's are counted (``not_images``). A
    URI listed twice counts once (``n_duplicates``).

    Raises
    ------
    InputError
        When the manifest cannot be read, has no ``path`` column, or lists no image.
    """
    if not URI_SCHEME.match(manifest_uri):
        # Relative entries are taken relative to the manifest's folder: from its absolute
        # location (a bare "images.csv" has no folder to cut off).
        manifest_uri = os.path.abspath(expand_home(manifest_uri))
    inventory = manifest_uri.rstrip("/").endswith(".json")
    local = local_path(manifest_uri) if is_local(manifest_uri) else ""
    if manifest_uri.lower().endswith(IMAGE_EXTENSIONS) or is_plain_folder(local):
        raise InputError(  # read as Parquet: a Spark error that says neither
            f"manifest {manifest_uri!r} is an image or a folder, not a list of images: a "
            "folder of images is an input (--input, input=...)"
        )
    try:
        if inventory:
            table = inventory_table(spark, manifest_uri)
        else:
            table = _uri_table(spark, manifest_uri)
    except (AnalysisException, Py4JJavaError) as error:
        raise InputError(
            f"manifest {manifest_uri!r} cannot be read: {error_line(error)}. "
            "Pass a CSV or Parquet file with a `path` column, or an S3 Inventory manifest.json "
            "(a name ending in .csv, .csv.gz or .txt is read as CSV, .json as an inventory's "
            "manifest, any other as Parquet)."
        ) from None
    # A label is trimmed like the path ("a.jpg, apple " in a CSV); a blank one means the
    # parent folder's name.
    label = F.nullif(F.trim(F.col("label")), F.lit(""))
    image = _is_image(F.col("path"))
    size, modified = _size_and_time()
    images = table.where(image).select(
        "path",
        # A URI without a folder ("D:photo.jpg", which no reader opens) labelled "".
        F.coalesce(label, label_column(F.col("path")), F.lit("")).alias("label"),
        size.alias("size"),
        modified.alias("modified"),
    )
    # A URI listed twice counts once, with the smallest of its rows (label first): the
    # same choice in every run, where dropDuplicates keeps whichever row comes first.
    first = F.min(F.struct("label", "size", "modified")).alias("row")
    other = F.when(~image, F.col("path"))  # null for a row without a path
    # A size or time given that does not parse would be null, and an incremental run blind
    # to that file's changes: the first of each, to refuse the manifest with.
    unparsed = [
        F.min(F.when((F.trim(given) != "") & parsed.isNull(), given))
        for given, parsed in (
            (F.col("size").cast("string"), size),
            (F.col("modified").cast("string"), modified),
        )
    ]
    n_rows, n_others, first_other, bad_size, bad_time = table.agg(
        F.count(F.when(image, 1)), F.count(F.when(~F.coalesce(image, F.lit(False)), 1)),
        F.min(other), *unparsed,
    ).first()  # fmt: skip
    for column, value, spelling in (
        ("size", bad_size, "a whole number of bytes"),
        ("modified", bad_time, "a time: ISO 8601 (2026-12-01T06:50:00Z) or seconds since 1970"),
    ):
        if value is not None:
            raise InputError(
                f"manifest {manifest_uri!r}: its `{column}` column holds {value!r}, which is "
                f"not {spelling}; write it so, or leave the column out (an incremental run "
                "then knows a file by its path alone)"
            )
    # Cached in few partitions: 200 made a 6-line manifest's listing take 8 s here.
    with spark_settings(spark, cached_shuffle_settings(spark, n_rows)):
        files = (
            images.groupBy("path")
            .agg(first)
            .select("path", "row.*")
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        # A manifest's labels may be given, whatever the folders: not checked for those.
        label_counts, label_samples, largest, _ = count_labels(files)
    n_files = sum(label_counts.values())
    if not n_files:
        files.unpersist()
        raise InputError(
            f"manifest {manifest_uri!r} lists no image file ({', '.join(IMAGE_EXTENSIONS)}); "
            "its `path` column must hold image URIs such as s3://bucket/apple/1.jpg"
        )
    n_duplicates = n_rows - n_files
    return ImageListing(
        manifest_uri, "manifest", files, n_files, label_counts, label_samples,
        largest_file=largest, n_duplicates=n_duplicates,
        not_images=(n_others, first_other) if n_others and not inventory else (0, None),
    )  # fmt: skip


def _size_and_time() -> tuple[Column, Column]:
    """A manifest's ``size`` in bytes and ``modified`` time; a number of seconds since 1970
    (``find -printf %T@``) is a time too."""
    seconds = F.col("modified").cast("double")
    modified = F.when(seconds.isNotNull(), seconds.cast("timestamp")).otherwise(
        F.col("modified").cast("timestamp")
    )
    return F.col("size").cast("long"), modified


def _is_image(path: Column) -> Column:
    alternatives = "|".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
    return path.rlike(f"(?i)\\.({alternatives})$")


def _uri_table(spark: SparkSession, uri: str) -> DataFrame:
    """A CSV or Parquet manifest as ``path``, ``label``, ``size``, ``modified``."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith((".csv", ".csv.gz", ".txt")):
        # A quote in a field doubled, as RFC 4180, Python's csv, pandas and Excel write it.
        table = spark.read.options(header="true", escape='"').csv(literal(uri))
    else:
        table = spark.read.parquet(literal(uri))
    columns = {c.strip().lower(): c for c in table.columns}  # "path, label" names label
    if not columns:
        raise InputError(f"manifest {uri!r} is empty: its first line names the columns (path)")
    if "path" not in columns:
        raise InputError(
            f"manifest {uri!r} has no `path` column (columns: {', '.join(table.columns)}). "
            "Name the column of image URIs `path` (optional: `label`, `size`, `modified`)."
        )
    base = uri.rstrip("/").rsplit("/", 1)[0]
    path = F.trim(F.col(columns["path"]))
    return table.select(
        _absolute(path, base).alias("path"),
        *(
            (F.col(columns[name]) if name in columns else F.lit(None)).alias(name)
            for name in ("label", "size", "modified")
        ),
    )


def _absolute(path: Column, base: str) -> Column:
    """URIs as Spark's ``path`` column spells them; a relative path is taken relative to
    the manifest's folder, a local absolute path becomes ``file:/...``."""
    with_scheme = path.rlike(URI_SCHEME.pattern)
    base_uri = base if "://" in base or base.startswith("file:") else f"file:{base}"
    if base_uri.startswith("file:///"):  # spelled as the rows' own file:// URIs become
        base_uri = "file:" + base_uri.removeprefix("file://")
    return (
        F.when(with_scheme, F.regexp_replace(path, r"^file://(?=/)", "file:"))
        .when(path.startswith("/"), F.concat(F.lit("file:"), path))
        .otherwise(F.concat(F.lit(base_uri.rstrip("/") + "/"), path))
    )
