"""Reading image bytes by URI on the executors: a manifest's images, or an incremental
run's new files, without Spark's file listing.

Each Python worker keeps one pyarrow file system per bucket, configured from the Hadoop
settings the driver read (:func:`read_options`), and reads a task's files in a small thread
pool: an object store answers each GET after tens of milliseconds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pyspark.sql import SparkSession

from .storage import URI_SCHEME


@dataclass(frozen=True)
class ReadOptions:
    """How executors reach the images: S3 settings taken from the Hadoop configuration
    (the ``fs.s3a.*`` keys), so a manifest's images are read where Spark would read them."""

    s3: dict = field(default_factory=dict)
    threads: int = 16


def read_options(spark: SparkSession) -> ReadOptions:
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    s3: dict = {}
    endpoint = conf.get("fs.s3a.endpoint")
    if endpoint and "amazonaws.com" not in endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        ssl = (conf.get("fs.s3a.connection.ssl.enabled") or "true").lower() == "true"
        s3["endpoint_override"] = parts.netloc
        s3["scheme"] = parts.scheme or ("https" if ssl else "http")
    for option, key in (
        ("access_key", "fs.s3a.access.key"),
        ("secret_key", "fs.s3a.secret.key"),
        ("session_token", "fs.s3a.session.token"),
        ("region", "fs.s3a.endpoint.region"),
    ):
        if conf.get(key):
            s3[option] = conf.get(key)
    return ReadOptions(s3=s3)


_FILESYSTEMS: dict[tuple, object] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def _filesystem(uri: str, options: ReadOptions):
    """A pyarrow file system and the path within it; one per worker and bucket.

    The URI is split by hand, not by ``urlsplit``: ``#`` and ``?`` are ordinary characters
    of an object key or a file name (as Spark's ``path`` column and Hadoop's ``Path`` keep
    them), not a fragment or a query.
    """
    from pyarrow import fs

    scheme = uri.split(":", 1)[0].lower() if URI_SCHEME.match(uri) else ""
    if scheme in ("", "file"):
        path = uri.split(":", 1)[1] if scheme else uri
        return fs.LocalFileSystem(), "/" + path.lstrip("/")
    authority, _, path = uri.split(":", 1)[1].removeprefix("//").partition("/")
    key = (scheme, authority)
    with _FILESYSTEMS_LOCK:
        if key not in _FILESYSTEMS:
            if scheme in ("s3", "s3a", "s3n"):
                settings = dict(options.s3)
                if "endpoint_override" not in settings and "region" not in settings:
                    settings["region"] = fs.resolve_s3_region(authority)
                _FILESYSTEMS[key] = fs.S3FileSystem(**settings)
            else:  # hdfs://, gs://...: whatever pyarrow supports there
                _FILESYSTEMS[key] = fs.FileSystem.from_uri(f"{scheme}://{authority}/")[0]
    in_bucket = scheme in ("s3", "s3a", "s3n")  # pyarrow's S3 paths start with the bucket
    return _FILESYSTEMS[key], f"{authority}/{path}" if in_bucket else f"/{path}"


def read_file(uri: str, options: ReadOptions) -> bytes:
    filesystem, path = _filesystem(uri, options)
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
        try:
            return read_file(uri, options), None
        except FileNotFoundError:
            return None, f"missing: {uri} does not exist"
        except Exception as error:  # permissions, network, unknown scheme
            message = str(error).splitlines()[0] if str(error) else ""
            if "not found" in message.lower() or "does not exist" in message.lower():
                return None, f"missing: {message}"
            return None, f"unreadable: {type(error).__name__}: {message}"

    uris = list(uris)
    with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(uris)))) as pool:
        results = list(pool.map(one, uris))
    return [data for data, _ in results], [reason for _, reason in results]
