"""``reduced/`` projected and written by the driver itself, for an output on this machine's
disk.

Spark's way to ``reduced/`` turns every stored float of ``features/`` into a row value, the
rows into Arrow batches for the Python workers' projection, their batches back into rows and
the rows into Parquet: per-value loops in the JVM, 12.8 million floats in and 5.2 million out
at 10,000 images (k = 521). An output on the driver's own file system means a local run, whose
executors share the driver's cores and disk: there the driver reads each ``features/`` file
with pyarrow, projects its batches with the workers' own function
(:func:`imagepca.moments.projector`) and writes one Parquet file per file read, on as many
threads as Spark has cores, each holding one batch at a time. On 2 cores (Intel Xeon, one
warm process): 10,000 images 1.9-2.0 s with Spark's executors, 0.4-0.5 s this way; 100,000
images 8.9-10.6 s (both JIT compilers; 13-19 s C1 only) against 3.5-4.4 s. The rows, their
values and the schema Spark reads back are Spark's write's (tested); only the lists' Parquet
layout differs, pyarrow's standard three levels. Outputs elsewhere (S3, HDFS) are written by
Spark's executors.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from threadpoolctl import threadpool_limits

from .reduction import FLOAT64_BATCH_ROWS, Projection
from .session import default_parallelism
from .storage import Storage, local_file_path, normalize_uri

# What Spark reads back as reduced/'s schema: strings, and float arrays without nulls
# (imagepca.storage.FLOAT_VECTOR).
REDUCED_ARROW_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("pca", pa.list_(pa.field("element", pa.float32(), nullable=False))),
    ]
)
# Spark's Parquet codecs that pyarrow writes alike, by Spark's name.
PYARROW_CODECS = {
    "zstd": "zstd",
    "snappy": "snappy",
    "gzip": "gzip",
    "none": "none",
    "uncompressed": "none",
}
CODEC_KEY = "spark.sql.parquet.compression.codec"


def driver_writer(
    storage: Storage,
    features: DataFrame,
    output: str,
    project: Projection,
) -> Callable[[str], None] | None:
    """A ``write(staging_uri)`` for :meth:`imagepca.storage.Storage.publish` that projects
    ``features`` (a ``path``, ``label``, ``features`` Parquet dataset) with ``project`` into
    Parquet files on the driver, or None when Spark's executors should write them: the
    output is not on this machine's file system, or the session's codec is one pyarrow
    does not write as Spark does."""
    codec = PYARROW_CODECS.get(features.sparkSession.conf.get(CODEC_KEY, "snappy").lower())
    if codec is None or storage.local_folder(output) is None:
        return None
    files = [local_file_path(normalize_uri(uri)) for uri in features.inputFiles()]
    if not files or None in files:
        return None
    threads = min(default_parallelism(features.sparkSession), len(files))

    def write(staging: str) -> None:
        folder = storage.local_folder(staging)
        os.makedirs(folder)
        job = uuid.uuid4()
        targets = [
            os.path.join(folder, f"part-{number:05d}-{job}-c000.{codec}.parquet")
            for number in range(len(files))
        ]
        # A file per core, each on one BLAS thread: pyarrow and numpy release the GIL.
        with (
            ThreadPoolExecutor(threads) as pool,
            threadpool_limits(1, user_api="blas"),
        ):
            list(pool.map(partial(_project_file, project=project, codec=codec), files, targets))
        open(os.path.join(folder, "_SUCCESS"), "wb").close()  # as Hadoop's committer leaves

    return write


def _project_file(
    source: str,
    target: str,
    project: Projection,
    codec: str,
) -> None:
    """Project one ``features/`` file into one ``reduced/`` file, a batch at a time.

    Float arrays are written plain, without the dictionary Parquet would try first, as
    Spark's writes of them are (:func:`imagepca.storage.vector_write_settings`)."""
    with (
        pq.ParquetFile(source) as features,
        pq.ParquetWriter(
            target, REDUCED_ARROW_SCHEMA, compression=codec, use_dictionary=["path", "label"]
        ) as writer,
    ):
        # Batches as the workers get them: the projection holds one as float64.
        batches = features.iter_batches(FLOAT64_BATCH_ROWS, columns=["path", "label", "features"])
        for batch in project(batches):
            writer.write_batch(batch.cast(REDUCED_ARROW_SCHEMA))
