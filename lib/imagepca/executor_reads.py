"""Reading image bytes by URI on the executors: a manifest's images, or an incremental
run's new files, without Spark's file listing.

Each Python worker keeps one pyarrow file system per bucket, configured from the Hadoop
settings the driver read (:func:`read_options`), and reads a task's files in a small thread
pool: an object store answers each GET after tens of milliseconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from pyspark.sql import SparkSession

from .config import URI_SCHEME

# Hadoop's S3A options that pyarrow's S3 client takes (names without "fs.s3a.").
S3A_OPTIONS = (
    "endpoint",
    "connection.ssl.enabled",
    "access.key",
    "secret.key",
    "session.token",
    "endpoint.region",
)
PER_BUCKET_PREFIX = "fs.s3a.bucket."
# The file systems pyarrow reaches with the settings here, as Spark does (on others, such as
# hdfs://, it needs libraries and settings of its own).
PYARROW_SCHEMES = ("", "file", "s3", "s3a", "s3n")
# Spark's binaryFile reader holds a file's bytes in one row: a larger file fails the job.
BINARY_FILE_MAX_BYTES = 2**31 - 1


@dataclass(frozen=True)
class ReadOptions:
    """How executors reach the images: S3 settings taken from the Hadoop configuration
    (the ``fs.s3a.*`` keys, and S3A's per-bucket ``fs.s3a.bucket.BUCKET.*`` overrides), so a
    manifest's images are read where Spark would read them."""

    s3a: dict = field(default_factory=dict)  # option -> value, for every bucket
    s3a_per_bucket: dict = field(default_factory=dict)  # "BUCKET.option" -> value
    threads: int = 16

    def s3(self, bucket: str) -> dict:
        """pyarrow ``S3FileSystem`` arguments for ``bucket``: a bucket's own option wins,
        as in S3A."""
        options = {
            option: self.s3a_per_bucket.get(f"{bucket}.{option}", self.s3a.get(option))
            for option in S3A_OPTIONS
        }
        s3: dict = {}
        endpoint = options["endpoint"]
        if endpoint and "amazonaws.com" not in endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
            ssl = (options["connection.ssl.enabled"] or "true").lower() == "true"
            s3["endpoint_override"] = parts.netloc
            s3["scheme"] = parts.scheme or ("https" if ssl else "http")
        for argument, option in (
            ("access_key", "access.key"),
            ("secret_key", "secret.key"),
            ("session_token", "session.token"),
            ("region", "endpoint.region"),
        ):
            if options[option]:
                s3[argument] = options[option]
        return s3


def read_options(spark: SparkSession) -> ReadOptions:
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    per_bucket = dict(conf.getPropsWithPrefix(PER_BUCKET_PREFIX))  # "BUCKET.option" -> value
    suffixes = tuple(f".{option}" for option in S3A_OPTIONS)
    return ReadOptions(
        s3a={option: conf.get(f"fs.s3a.{option}") for option in S3A_OPTIONS},
        s3a_per_bucket={k: v for k, v in per_bucket.items() if k.endswith(suffixes)},
    )


def uri_scheme(uri: str) -> str:
    """``uri``'s scheme in lower case, or "" for a path."""
    return uri.split(":", 1)[0].lower() if URI_SCHEME.match(uri) else ""


_FILESYSTEMS: dict[tuple, tuple] = {}  # (scheme, authority) -> (settings, fs)
_FILESYSTEMS_LOCK = threading.Lock()


def pyarrow_filesystem(uri: str, options: ReadOptions):
    """A pyarrow file system and the path within it; one per worker and bucket.

    The URI is split by hand, not by ``urlsplit``: ``#`` and ``?`` are ordinary characters
    of an object key or a file name (as Spark's ``path`` column and Hadoop's ``Path`` keep
    them), not a fragment or a query.
    """
    from pyarrow import fs

    scheme = uri_scheme(uri)
    if scheme in ("", "file"):
        path = uri.split(":", 1)[1] if scheme else uri
        return fs.LocalFileSystem(), "/" + path.lstrip("/")
    authority, _, path = uri.split(":", 1)[1].removeprefix("//").partition("/")
    in_bucket = scheme in ("s3", "s3a", "s3n")  # pyarrow's S3 paths start with the bucket
    settings = options.s3(authority) if in_bucket else {}
    key = (scheme, authority)
    # A Python worker outlives its task: a later job's settings (new keys) replace the file
    # system the earlier ones made.
    configured = tuple(sorted(settings.items()))
    with _FILESYSTEMS_LOCK:
        if _FILESYSTEMS.get(key, (None,))[0] != configured:
            if in_bucket:
                if "endpoint_override" not in settings and "region" not in settings:
                    settings["region"] = fs.resolve_s3_region(authority)
                filesystem = fs.S3FileSystem(**settings)
            else:  # hdfs://, gs://...: whatever pyarrow supports there
                filesystem = fs.FileSystem.from_uri(f"{scheme}://{authority}/")[0]
            _FILESYSTEMS[key] = (configured, filesystem)
    return _FILESYSTEMS[key][1], f"{authority}/{path}" if in_bucket else f"/{path}"


def read_file(uri: str, options: ReadOptions) -> bytes:
    filesystem, path = pyarrow_filesystem(uri, options)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def read_files(
    uris: Iterable[str], options: ReadOptions
) -> tuple[list[bytes | None], list[str | None]]:
    """Each URI's bytes, or why it has none (``missing: ...`` / ``unreadable: ...``).

    Reads run in a small thread pool: an object store answers each GET after tens of
    milliseconds, which would otherwise leave the core idle between images.
    """

    def one(uri: str) -> tuple[bytes | None, str | None]:
        if URI_SCHEME.match(uri) and uri.index(":") == 1:  # C:\photos\1.jpg, D:1.jpg
            return None, (
                f"unreadable: {uri} is a Windows path, which the cluster cannot read; list "
                "URIs (s3://bucket/key, hdfs://..., file:/...) or paths on its file system"
            )
        try:
            return read_file(uri, options), None
        except FileNotFoundError:
            return None, f"missing: {uri} does not exist"
        except Exception as error:  # permissions, network, unknown scheme
            message = _first_line(error)
            if "not found" in message.lower() or "does not exist" in message.lower():
                return None, f"missing: {message}"
            return None, f"unreadable: {type(error).__name__}: {message}"

    results = _in_pool(one, uris, options)
    return [data for data, _ in results], [reason for _, reason in results]


def unscanned_reason(size: int) -> str:
    """Why Spark's scan of a folder returned no row for a listed file of ``size`` bytes."""
    if size == 0:
        return "empty file: 0 bytes"
    if size > BINARY_FILE_MAX_BYTES:
        return (
            f"unreadable: {size:,} bytes, more than the {BINARY_FILE_MAX_BYTES:,} Spark's "
            "binaryFile reader holds as one file"
        )
    return "unreadable: the scan could not read it (I/O error)"


def unscanned_reasons(uris: Iterable[str], options: ReadOptions) -> list[str]:
    """Why a folder's scan returned no row for each of these listed files (on
    :data:`PYARROW_SCHEMES`), from a look at each where it is: :func:`unscanned_reason`, or
    ``missing: ...``, or ``unreadable: ...``."""
    from pyarrow import fs

    def one(uri: str) -> str:
        try:
            filesystem, path = pyarrow_filesystem(uri, options)
            info = filesystem.get_file_info(path)
        except Exception as error:  # permissions, network
            return f"unreadable: {type(error).__name__}: {_first_line(error)}"
        if info.type == fs.FileType.NotFound:
            return f"missing: {uri} does not exist"
        if info.type != fs.FileType.File:  # a folder now, say
            return f"unreadable: {uri} is not a file ({info.type})"
        return unscanned_reason(info.size)

    return _in_pool(one, uris, options)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


Result = TypeVar("Result")


def _in_pool(
    one: Callable[[str], Result], uris: Iterable[str], options: ReadOptions
) -> list[Result]:
    """``one`` of each URI, in order, on a pool of ``options.threads`` threads at most."""
    uris = list(uris)
    with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(uris)))) as pool:
        return list(pool.map(one, uris))
