"""The SparkSession: the cluster's when there is one (EMR, Livy), a local one otherwise.

Notebooks call :func:`get_spark` instead of building a session, so the same cell works in a
local ``python3`` kernel, in papermill on the EMR primary node (``--master yarn``) and in the
sparkmagic PySpark kernel, where Livy has already created ``spark``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from pyspark.sql import SparkSession

from .config import SPARK_SETTINGS

DEFAULT_MASTER = "local[*]"
# Rows per Arrow batch between the JVM and a Python worker: what one worker holds at once.
ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"
# Partitions of a shuffle (joins, aggregations, windows) when nothing else decides.
SHUFFLE_PARTITIONS_KEY = "spark.sql.shuffle.partitions"

_BASE_CONF = SPARK_SETTINGS


def get_spark(
    master: str | None = None,
    *,
    app_name: str = "imagepca",
    driver_memory: str = "4g",
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """Return the active SparkSession, or build one on ``master``.

    Parameters
    ----------
    master : str, optional
        ``local[*]`` (default), ``local[N,R]`` (N cores, R attempts per task), ``yarn``,
        ``spark://host:port``... Ignored when a session is already active: Livy and EMR
        notebooks own their session.
    app_name : str
        Shown in the Spark and YARN UIs.
    driver_memory : str
        Heap of the driver JVM, which in local mode also runs the executors.
    conf : dict, optional
        Extra Spark settings for a new session.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Executors' Python workers must run the driver's interpreter, or pandas UDFs cannot
    # import this package and its pinned libraries.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    master = master or os.environ.get("IMAGEPCA_MASTER") or DEFAULT_MASTER
    builder = SparkSession.builder.appName(app_name).master(master)
    settings = dict(_BASE_CONF)
    if master.startswith("local"):
        # A laptop run serves nothing to the network: driver, UI and block manager on loopback.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings["spark.driver.memory"] = driver_memory
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def stop_spark(timeout: float = 60.0) -> None:
    """Stop this process's SparkContext and, when this process launched the JVM, let the JVM
    exit and wait for it.

    ``imagepca run`` calls this in its kernel before shutting the kernel down: on shutdown
    ipykernel signals the kernel's child processes and sleeps in growing steps (0.01 s up to
    3 s) until none is left, and a JVM that has exited but was not waited for still counts,
    which cost 2 s at the end of every run. Stopping here is Spark's ordinary shutdown (the
    JVM exits when its standard input closes). Nothing happens without a session, or for a
    JVM this process did not launch (a ``pyspark`` shell's, Livy's).
    """
    from pyspark import SparkContext

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
    context = SparkContext._active_spark_context
    if context is not None:
        context.stop()
    gateway = SparkContext._gateway
    process = getattr(gateway, "proc", None)
    if gateway is None or process is None:
        return
    gateway.shutdown()
    SparkContext._gateway = None
    SparkContext._jvm = None
    process.stdin.close()
    process.wait(timeout)


def default_parallelism(spark: SparkSession) -> int:
    """Cores Spark can run tasks on right now (executors x cores, or local threads)."""
    return max(1, spark.sparkContext.defaultParallelism)


def task_cpus(spark: SparkSession) -> int:
    """Cores each Spark task owns: the threads one model interpreter may use."""
    return max(1, int(spark.conf.get("spark.task.cpus", "1")))


@contextmanager
def spark_settings(spark: SparkSession, settings: dict[str, str]):
    """Set session settings for the jobs run inside the block, then restore them."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def run_concurrently(*calls: Callable[[], object]) -> list:
    """Call each function on its own thread; their results in order (the first error
    raised, after every call has ended).

    For independent Spark jobs that are small next to their scheduling cost (a model's
    metadata file, an empty dataset, a checksum): PySpark gives each Python thread its own
    JVM thread, and Spark runs the jobs of several threads at once, so a small job's latency
    overlaps a larger job instead of adding to it. Measured: notebook 02's three publishes at
    10,000 images 5.9 -> 4.9 s; less on a cold JVM, whose small jobs are CPU-bound too.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]
