"""Reading and writing the output location through Hadoop's FileSystem API.

One code path for every URI Spark understands (local paths, ``file://``, ``hdfs://``,
``s3://`` through EMRFS on EMR, ``s3a://``): the driver uses the same FileSystem classes
the executors write with. Datasets are written to a staging folder and published by
rename at the end, and the run's completion markers are removed first and written last,
so an interrupted run never leaves an output that looks complete or mixes two runs.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from functools import partial
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, FloatType

from .config import GLOB_CHARACTERS, URI_SCHEME
from .progress import jobs_cancelled_on_interrupt
from .session import run_concurrently

SUCCESS_MARKER = "_SUCCESS"
METRICS_FILE = "metrics.json"


def reduction_of(metrics: dict) -> tuple:
    """Which run of notebook 02 a ``metrics.json`` describes (notebook 03 keeps its fields)."""
    return metrics.get("finished_at"), metrics.get("k"), metrics.get("n_images")


EXTRACTION_FILE = "_extraction.json"  # inside features/: Parquet readers skip "_" files
# Inside features/ while a full run's notebook 01 replaces it: gone with the old features/
# when the new one is swapped in; notebook 02 refuses features/ with it (an interrupted run).
REPLACING_FILE = "_replacing.json"
STAGING_DIR = "_staging"
# A run's notebooks; `imagepca run` has papermill save each, as it executes, under
# OUTPUT/EXECUTED_DIR (imagepca.runner).
EXTRACT_NOTEBOOK = "01_extract_features.ipynb"
REDUCE_NOTEBOOK = "02_reduce_pca.ipynb"
CLASSIFY_NOTEBOOK = "03_classify.ipynb"
EXECUTED_DIR = "notebooks"
# Where `imagepca run` keeps a notebook 01 that failed before touching a complete output
# (imagepca.runner); notebook 02 removes it, as it removes notebook 03's artifacts.
FAILED_EXTRACT_NOTEBOOK = f"logs/{EXTRACT_NOTEBOOK}"
LOG_FILE = "logs/run.log"  # `imagepca run`'s log (a local file first when the output is remote)
STOPPED_LOG_FILE = "logs/stopped-run.log"  # such a run's log, removed as its notebook is
# The figures each notebook draws. A notebook removes an earlier run's copies of its own as
# it starts, and draws them again: one run by hand whose figure cell is skipped leaves none
# of another run's.
EXTRACT_FIGURES = ("samples.png",)
REDUCE_FIGURES = ("explained_variance.png", "projection.png")
CLASSIFY_FIGURES = ("confusion_matrix.png", "k_sweep.png")
# What notebook 03 adds to an output. Notebook 02 removes these when it starts: a
# classifier of an earlier run was trained on another PCA.
CLASSIFY_ARTIFACTS = ("classifier_model", *CLASSIFY_FIGURES, f"{EXECUTED_DIR}/{CLASSIFY_NOTEBOOK}")


# Spark's switch to Parquet's older layouts. Under it, an array whose elements cannot be null
# (the features, the PCA scores, the vectors of Spark ML's models) is written as a two-level
# list, ``repeated float array``: one call per value into Parquet's writer, where the standard
# three-level list wraps every value in a group and a field. Writing a 10,000-image run's
# ``features/`` from the cache, five alternating pairs: 3.8-4.4 -> 1.1-1.9 s with C1 only, 1.5-3.4
# -> 1.2-1.8 s with both JIT compilers. Spark, pyarrow and pandas read both layouts (Parquet's
# backward-compatibility rules), and Spark reads the column back as ``array<float>``. Decimals
# would also change layout; no output has any.
LEGACY_PARQUET_KEY = "spark.sql.parquet.writeLegacyFormat"
# The type of the vectors this project stores (features, PCA scores): floats, never null.
FLOAT_VECTOR = ArrayType(FloatType(), containsNull=False)


def vector_write_settings(frame: DataFrame) -> dict[str, str]:
    """The session settings under which ``frame``'s vectors are written. Set around the block
    that runs the writes (they are the session's, which Spark copies into the writers' Hadoop
    configuration), never inside concurrent ones.

    - Layout: two-level Parquet lists, or the standard layout when one of the arrays may hold
      nulls (rows read back from Parquet, whose element nullability Spark forgets): legacy
      mode would write those as Hive's three-level ``bag`` lists.
    - Encoding: float arrays plain from the start. Parquet's writer begins every column
      chunk with a dictionary and falls back to plain encoding once the dictionary outgrows
      its page (1 MB: 262,144 floats). Features and PCA scores hardly repeat, so past small
      writes every chunk's first quarter-million values were hashed and then encoded again,
      in vain: writing a 10,000-image ``features/`` from the cache (8 files, C1 only, four
      alternating pairs) 1.45-1.79 -> 1.34-1.42 s, the files the same size. Strings (labels)
      keep their dictionaries. Both layouts' column paths are named; Parquet ignores the
      other one.
    """
    arrays = [f for f in frame.schema.fields if isinstance(f.dataType, ArrayType)]
    compact = bool(arrays) and not any(f.dataType.containsNull for f in arrays)
    settings = {LEGACY_PARQUET_KEY: "true" if compact else "false"}
    for field in arrays:
        if isinstance(field.dataType.elementType, FloatType):
            for path in (f"{field.name}.array", f"{field.name}.list.element"):
                settings[f"parquet.enable.dictionary#{path}"] = "false"
    return settings


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path on this machine (no scheme, or ``file://``)."""
    return "://" not in uri or uri.startswith("file://")


def on_local_disk(spark: SparkSession, uri: str) -> bool:
    """Whether Hadoop reads ``uri`` from this machine's disk: a ``file:`` URI, or a path
    without a scheme where the default file system is the local one (not EMR's HDFS)."""
    scheme = URI_SCHEME.match(uri)
    if scheme:
        return scheme[0].lower() == "file:"
    jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    return jvm.org.apache.hadoop.fs.FileSystem.getDefaultUri(conf).getScheme() == "file"


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with ``/`` (URIs are not OS paths)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


_GLOB_CHARACTERS = re.compile(f"([{re.escape(GLOB_CHARACTERS)}\\\\])")


def literal(uri: str) -> str:
    """``uri`` as Spark's readers take it literally: they expand Hadoop glob patterns in a
    path, so ``out[1]/features`` would read ``out1/features`` (or fail), and ``run*`` every
    folder starting with ``run``. Each glob character is escaped with a backslash."""
    return _GLOB_CHARACTERS.sub(r"\\\1", uri)


def local_file_path(uri: str) -> str | None:
    """The path on this machine of a ``file:`` URI spelled as Hadoop and Spark's ``path``
    columns spell it (``file:/a b/c.jpg``, ``file:///a b/c.jpg``: not percent-encoded); None
    for any other URI, a path without a scheme included (Hadoop's default file system
    resolves it, HDFS on a cluster)."""
    if not uri.startswith("file:"):
        return None
    path = uri.removeprefix("file:")
    if path.startswith("//"):
        authority, _, rest = path[2:].partition("/")
        if authority not in ("", "localhost"):
            return None
        path = f"/{rest}"
    return path


def local_path(location: str) -> str:
    """A location on this machine as a path for Python: a ``file:`` URI's path, else the
    location as given."""
    return local_file_path(location) or location


def papermill_location(uri: str) -> str:
    """``uri`` as papermill's I/O handlers take it, which know neither ``file:`` URIs nor
    Hadoop's ``s3a://``/``s3n://``: a ``file:`` URI as its local path, those two as the
    same object's ``s3://`` URI."""
    if uri.startswith("file:"):
        return local_path(uri)
    for scheme in ("s3a://", "s3n://"):
        if uri.startswith(scheme):
            return "s3://" + uri.removeprefix(scheme)
    return uri


def normalize_uri(uri: str) -> str:
    """Spell a file URI the way Hadoop's ``Path.toString`` and Spark's ``path`` columns do.

    ``DataFrame.inputFiles`` returns percent-encoded URIs (``file:///a%20b``) while the
    ``binaryFile`` reader's ``path`` column is decoded (``file:/a b``); comparing the two
    needs one spelling.
    """
    parts = urlsplit(uri)
    if not parts.scheme:
        return uri
    authority = f"//{parts.netloc}" if parts.netloc else ""
    return f"{parts.scheme}:{authority}{unquote(parts.path)}"


def error_summary(error: BaseException) -> tuple[str, str]:
    """``(class name, message)`` of a failed read: the JVM's exception for a py4j error
    (whose own text starts with the py4j call), else the first line of Python's."""
    if isinstance(error, Py4JJavaError):
        java = error.java_exception
        return java.getClass().getSimpleName(), str(java.getMessage())
    return type(error).__name__, (str(error).splitlines() or [""])[0]


def error_line(error: BaseException) -> str:
    """A failed read's cause in one line (:func:`error_summary`'s): Spark's message, or the
    JVM's exception named (a missing bucket's ``UnknownStoreException``, a file that is not
    Parquet)."""
    name, message = error_summary(error)
    line = (message.splitlines() or [""])[0]
    return (f"{name}: {line}" if isinstance(error, Py4JJavaError) else line).rstrip(".")


class _FileSystem(NamedTuple):
    writer: object  # what Storage writes with: locally the raw file system (no .crc files)
    scheme: str
    whole: object  # as Hadoop gives it: locally checksummed, its delete takes the .crc along


class Storage:
    """Small file-system operations on any Hadoop URI, run on the driver."""

    def __init__(self, spark: SparkSession):
        # The class, looked up once: py4j resolves ``jvm.org.apache.hadoop.fs.Path`` one
        # name at a time, a round trip to the JVM each (five calls for every path made).
        self._hadoop_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()
        self._spark_context = spark.sparkContext
        # The file systems, by the URI's scheme and authority.
        self._file_systems: dict[tuple[str, str], _FileSystem] = {}

    def _path(self, uri: str):
        return self._hadoop_path(uri)

    def _located(self, uri: str) -> tuple:
        """``uri``'s Hadoop path and file system."""
        path = self._path(uri)
        return path, self._file_system(uri, path).writer

    def _file_system(self, uri: str, path) -> _FileSystem:
        """The file system of ``path`` (``uri``'s), each found once (three round trips to
        the JVM)."""
        parts = urlsplit(uri)
        key = (parts.scheme, parts.netloc)  # none: the default file system's
        if key not in self._file_systems:
            fs = path.getFileSystem(self._conf)
            scheme = fs.getUri().getScheme() or ""
            # The local checksummed FS would add a hidden .crc file beside every small file.
            writer = fs.getRawFileSystem() if scheme == "file" else fs
            self._file_systems[key] = _FileSystem(writer, scheme, fs)
        return self._file_systems[key]

    def exists(self, uri: str) -> bool:
        path, fs = self._located(uri)
        return bool(fs.exists(path))

    def relative_note(self, location: str) -> str:
        """For a message saying ``location`` was not found: where Hadoop looks for a relative
        one (in the JVM's working folder, or the default file system's home: EMR's HDFS). A
        notebook's kernel, and its JVM, run in the notebook's folder under nbconvert or VS
        Code."""
        if URI_SCHEME.match(location) or location.startswith("/"):
            return ""
        path = self._path(location)
        return f" ({location} is {path.getFileSystem(self._conf).makeQualified(path)} for Spark)"

    def local_folder(self, uri: str) -> str | None:
        """The path on this machine where Hadoop puts ``uri``, or None when its file system
        is not the local one (a path without a scheme is HDFS's on a cluster)."""
        path = self._path(uri)
        fs = self._file_system(uri, path)
        if fs.scheme != "file":
            return None
        return str(fs.whole.makeQualified(path).toUri().getPath())

    def size(self, uri: str) -> int:
        path, fs = self._located(uri)
        return int(fs.getFileStatus(path).getLen())

    def delete(self, uri: str) -> None:
        path = self._path(uri)
        # Spark's local writes leave a checksum beside each file: it goes too.
        fs = self._file_system(uri, path).whole
        if fs.exists(path):
            fs.delete(path, True)

    def list_names(self, uri: str) -> list[str]:
        """Names of the entries directly inside a folder (none when it does not exist)."""
        path, fs = self._located(uri)
        if not fs.exists(path):
            return []
        return sorted(status.getPath().getName() for status in fs.listStatus(path))

    def rename(self, src: str, dst: str) -> None:
        (source, fs), target = self._located(src), self._path(dst)
        fs.mkdirs(target.getParent())
        if not fs.rename(source, target):
            raise OSError(f"could not move {src} to {dst}")

    def read_bytes(self, uri: str) -> bytes:
        # A file: URI (the listing's paths in a local run) is read by Python itself: the
        # JVM's copy costs a few ms a file (notebook 01's 180 sample images: 0.46 s).
        path = local_file_path(uri)
        if path is not None:
            with open(path, "rb") as file:
                return file.read()
        # Else through a local copy that Python reads: py4j would move the bytes as base64
        # text (a 13 MB file took 1.2 s that way, 0.1 s this way).
        with tempfile.TemporaryDirectory(prefix="imagepca-") as folder:
            local = f"{folder}/copy"
            self.copy_to_local(uri, local)
            with open(local, "rb") as file:
                return file.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file; readers see the old or the new content, never a part."""
        path = self._path(uri)
        fs, scheme, _ = self._file_system(uri, path)
        # Object stores publish a PUT atomically; file systems need write-then-rename.
        target = path if scheme.startswith("s3") else self._path(f"{uri}.{uuid.uuid4().hex}.tmp")
        with tempfile.TemporaryDirectory(prefix="imagepca-") as folder:
            with open(f"{folder}/copy", "wb") as file:  # not through py4j: see read_bytes
                file.write(data)
            fs.copyFromLocalFile(False, True, self._path(f"file://{folder}/copy"), target)
        if target is not path:
            fs.delete(path, False)
            if not fs.rename(target, path):
                raise OSError(f"could not write {uri}")

    def copy_to_local(self, uri: str, local_path: str) -> None:
        path, fs = self._located(uri)
        fs.copyToLocalFile(False, path, self._path(f"file://{local_path}"), True)

    def read_json(self, uri: str) -> dict:
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    def read_json_if_exists(self, uri: str) -> dict | None:
        return self.read_json(uri) if self.exists(uri) else None

    def write_json(self, uri: str, document: dict) -> None:
        self.write_bytes(uri, json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))

    # -- run-level protocol -------------------------------------------------------------

    def begin_run(self, output: str) -> None:
        """Withdraw the completion markers before anything is replaced."""
        self.withdraw_success(output)
        self.delete(join(output, METRICS_FILE))

    def withdraw_success(self, output: str) -> None:
        """The output is no longer complete; its ``metrics.json`` is still to be read."""
        self.delete(join(output, SUCCESS_MARKER))

    def remove_artifacts(self, output: str, names: tuple[str, ...]) -> list[str]:
        """Delete those of ``OUTPUT/name`` that exist; return the names deleted."""
        removed = []
        for name in names:
            uri = join(output, name)
            if self.exists(uri):
                self.delete(uri)
                removed.append(name)
        return removed

    def missing(self, output: str, names: list[str] | tuple[str, ...]) -> list[str]:
        """Those of ``names`` not (or no longer) under ``output``, each once: what a run (or
        its notebooks, in turn) removed and did not make again."""
        return [name for name in dict.fromkeys(names) if not self.exists(join(output, name))]

    def _copy_ended(self, output: str, notebook: str) -> bool | None:
        """Whether papermill's copy of ``notebook`` under ``OUTPUT/notebooks/`` has ended:
        papermill sets ``end_time`` once an execution ends, so the copy ``imagepca run`` is
        writing while the notebook runs gives False; None when there is no papermill copy
        (or a half-written one)."""
        uri = join(output, EXECUTED_DIR, notebook)
        if not self.exists(uri):
            return None
        try:
            return self.read_json(uri)["metadata"]["papermill"]["end_time"] is not None
        except (ValueError, KeyError, TypeError):
            return None

    def remove_earlier_copy(self, output: str, notebook: str, *, log: bool = False) -> list[str]:
        """Delete ``OUTPUT/notebooks/NOTEBOOK`` if an earlier execution left it, and with
        ``log`` an earlier run's :data:`LOG_FILE` unless ``imagepca run`` is running this
        notebook (the log is then its own); return the names deleted.

        A notebook run by hand (JupyterHub, EMR Notebooks) replaces the output's work
        without saving its own copy there, so the copy of the run before would describe
        another run's outputs. The copy ``imagepca run`` is writing stays.
        """
        ended = self._copy_ended(output, notebook)
        names = []
        if log and ended is not False:
            names.append(LOG_FILE)
        if ended:
            names.append(f"{EXECUTED_DIR}/{notebook}")
        return self.remove_artifacts(output, tuple(names))

    def publish(self, output: str, name: str, write: Callable[[str], None]) -> str:
        """Write a dataset with ``write(staging_uri)``, then swap it in as ``OUTPUT/name``.

        A crash before the swap leaves the previous ``name`` untouched (and at most debris
        under ``_staging/``); the swap itself is a delete plus a rename.
        """
        return self.swap_in(output, name, self.stage(output, name, write))

    def stage(self, output: str, name: str, write: Callable[[str], None]) -> str:
        """The first half of :meth:`publish`: ``write`` into a new folder under
        ``OUTPUT/_staging/``, whose URI is returned. A write that fails (or is
        interrupted) takes its folder with it, and ``_staging/`` once nothing else is
        staged there: a failed run leaves no empty folder in the output."""
        staging = join(output, STAGING_DIR, f"{name}-{uuid.uuid4().hex[:12]}")
        try:
            with jobs_cancelled_on_interrupt(self._spark_context):  # before the folder goes
                write(staging)
        except BaseException:
            with suppress(Exception):  # the write's own error is the one to report
                self.delete(staging)
                self.remove_empty_staging(output)
            raise
        return staging

    def remove_empty_staging(self, output: str) -> None:
        if not self.list_names(join(output, STAGING_DIR)):
            self.delete(join(output, STAGING_DIR))

    def swap_in(self, output: str, name: str, staging: str) -> str:
        """The second half of :meth:`publish`: replace ``OUTPUT/name`` with ``staging``."""
        final = join(output, name)
        self.delete(final)
        self.rename(staging, final)
        return final

    def publish_all(self, output: str, writes: dict[str, Callable[[str], None]]) -> list[str]:
        """:meth:`publish` several datasets side by side (see
        :func:`imagepca.session.run_concurrently`); the final URIs in order. When one
        fails, ``_staging/`` goes too once the others have been swapped in."""
        try:
            return run_concurrently(
                *(partial(self.publish, output, name, write) for name, write in writes.items())
            )
        except BaseException:
            with suppress(Exception):
                self.remove_empty_staging(output)
            raise

    def mark_replacing(self, output: str, source: str) -> None:
        """Say in ``features/`` that a full run is replacing it (:data:`REPLACING_FILE`)."""
        started = {"input": source, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
        self.write_json(join(output, "features", REPLACING_FILE), started)

    def clear_replacing(self, output: str) -> None:
        """``features/`` is this run's (reused, added to, or replaced): no marker is left."""
        self.delete(join(output, "features", REPLACING_FILE))

    def refuse_half_replaced(self, output: str) -> None:
        """Raise when a full run's notebook 01 began replacing ``features/`` and stopped:
        the earlier features with this run's samples would complete a mixed output."""
        started = self.read_json_if_exists(join(output, "features", REPLACING_FILE))
        if started:
            raise RuntimeError(
                f"notebook 01 began replacing {join(output, 'features')} with the images of "
                f"{started['input']} at {started['started_at']} and did not finish: run it "
                "again (or `imagepca run`); --reuse-features keeps the earlier features"
            )

    def classified_since(self, output: str, metrics: dict) -> bool:
        """Whether notebook 03 has completed ``output`` on the reduction ``metrics`` (notebook
        02's) describe, since: its ``metrics.json`` is then the newer one. Raises when it
        began classifying it again and has not published."""
        current = self.read_json_if_exists(join(output, METRICS_FILE)) or {}
        classified = "classification" in current and "skipped" not in current["classification"]
        if not classified or reduction_of(current) != reduction_of(metrics):
            return False
        if not self.exists(join(output, SUCCESS_MARKER)):
            raise RuntimeError(
                "notebook 03 began classifying this reduction again and has not published: "
                "run it to its end, or notebook 02 from its top"
            )
        return True

    def finish_run(self, output: str, metrics: dict, *, complete: bool = True) -> None:
        """Write ``metrics.json`` and then ``_SUCCESS`` (unless a later stage of the run is
        to complete it): the last two files of a run."""
        self.delete(join(output, STAGING_DIR))
        self.write_json(join(output, METRICS_FILE), metrics)
        if complete:
            self.write_bytes(join(output, SUCCESS_MARKER), b"")
