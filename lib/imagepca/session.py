"""The SparkSession: the cluster's when there is one (EMR, Livy), a local one otherwise.

Notebooks call :func:`get_spark` instead of building a session, so the same cell works in a
local ``python3`` kernel, in papermill on the EMR primary node (``--master yarn``) and in the
sparkmagic PySpark kernel, where Livy has already created ``spark``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyspark
from pyspark import SparkConf
from pyspark.find_spark_home import _find_spark_home
from pyspark.sql import SparkSession

from .config import SPARK_SETTINGS, cache_dir, check_master
from .local_folders import utf8_locale
from .progress import jobs_cancelled_on_interrupt

DEFAULT_MASTER = "local[*]"
# Rows per Arrow batch between the JVM and a Python worker: what one worker holds at once.
ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"
# Partitions of a shuffle (joins, aggregations, windows) when nothing else decides.
SHUFFLE_PARTITIONS_KEY = "spark.sql.shuffle.partitions"

# "0" turns the local JVM's class archive off (see class_archive_options).
CLASS_ARCHIVE_ENV = "IMAGEPCA_JVM_CLASS_ARCHIVE"
# "1" has a local JVM compile with C1 only (QUICK_JIT_OPTION): `imagepca run` sets it for
# small local inputs (imagepca.runner.jvm_environment).
QUICK_JIT_ENV = "IMAGEPCA_JVM_QUICK_JIT"
# C2, the optimizing compiler, spends a short run's seconds compiling Spark on the cores the
# Python workers featurize on; its code pays off only over a long run. On 2 cores, whole runs
# with C1 only against both compilers: 2,000 images 46 s against 54 s (medians of six), 10,000
# images 84 s against 91 s, but 100,000 images 624 s against 603 s, and the PCA fit alone on
# 100,000 rows 13.8 s against 10.8 s (Parquet's and Arrow's per-value loops want C2).
QUICK_JIT_OPTION = "-XX:TieredStopAtLevel=1"
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
# The archive's own warnings (classes it cannot hold, an archive it cannot map) are noise:
# the JVM loads such classes the ordinary way.
_QUIET_ARCHIVE = "-Xlog:cds=off,cds+dynamic=off"

_BASE_CONF = SPARK_SETTINGS
# The archive this process's JVM writes when it exits: (where it writes, where it belongs).
_pending_archive: tuple[Path, Path] | None = None
# The JVM start_spark is launching: (the session's settings, the future py4j gateway).
_launch: tuple[dict[str, str], Future] | None = None


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
        _discard_launch()  # a session came first: nothing will use that JVM
        return active
    master, settings = _new_session_settings(master, app_name, driver_memory, conf)
    _adopt_launched_jvm(settings)
    builder = SparkSession.builder
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()  # on the adopted JVM's context, if there is one
    spark.sparkContext.setLogLevel("ERROR")
    if _pending_archive is not None:
        atexit.register(stop_spark)  # the archive is kept only once its JVM has exited
    return spark


def start_spark(
    master: str | None = None,
    *,
    app_name: str = "imagepca",
    driver_memory: str = "4g",
    conf: dict[str, str] | None = None,
) -> None:
    """Start the driver's JVM in the background for a later :func:`get_spark` with the same
    arguments, and return at once.

    Notebook 01 calls it before importing its libraries: the JVM boots (a second here) while
    they import, 0.6-0.7 s off every local run. Only the JVM is launched; the SparkContext
    is still created by :func:`get_spark`, on the main thread, where PySpark installs the
    interrupt handler that cancels running jobs. Nothing happens when a session is active
    (Livy, EMR notebooks) or this process already has a JVM. A :func:`get_spark` with other
    arguments, or :func:`stop_spark`, ends the launched JVM.
    """
    global _launch
    from pyspark import SparkContext
    from pyspark.java_gateway import launch_gateway

    if SparkSession.getActiveSession() is not None or SparkContext._gateway or _launch:
        return
    master, settings = _new_session_settings(master, app_name, driver_memory, conf)
    _launch = (settings, in_background(launch_gateway, SparkConf().setAll(settings.items())))


def _new_session_settings(
    master: str | None, app_name: str, driver_memory: str, conf: dict[str, str] | None
) -> tuple[str, dict[str, str]]:
    """The master and every setting of a new session (the JVM's options among them)."""
    # Executors' Python workers must run the driver's interpreter, or pandas UDFs cannot
    # import this package and its pinned libraries.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    utf8 = utf8_locale()  # Java reads file names in its locale's encoding: ASCII under C
    if utf8:
        os.environ["LC_ALL"] = utf8
    master = master or os.environ.get("IMAGEPCA_MASTER") or DEFAULT_MASTER
    check_master(master)
    settings = {"spark.master": master, "spark.app.name": app_name, **_BASE_CONF}
    if master.startswith("local"):
        # A laptop run serves nothing to the network: driver, UI and block manager on loopback.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings["spark.driver.memory"] = driver_memory
    settings.update(conf or {})
    if master.startswith("local"):
        options = local_jvm_options(settings.get("spark.driver.extraClassPath", ""))
        if options:
            settings[JAVA_OPTIONS_KEY] = f"{settings.get(JAVA_OPTIONS_KEY, '')} {options}".strip()
    return master, settings


def _adopt_launched_jvm(settings: dict[str, str]) -> None:
    """Create the SparkContext on the JVM :func:`start_spark` launched with ``settings``
    (a failed launch raises here, as :func:`get_spark`'s own would); one launched with other
    settings is ended."""
    global _launch
    from pyspark import SparkContext

    if _launch is None:
        return
    launched_settings, launching = _launch
    if launched_settings != settings:
        _discard_launch()
        return
    failure = launching.exception()  # an interrupt here leaves the launch to _discard_launch
    _launch = None
    if failure is not None:
        raise failure
    SparkContext(conf=SparkConf().setAll(settings.items()), gateway=launching.result())


def _discard_launch(timeout: float = 30.0) -> None:
    """End the JVM :func:`start_spark` launched, which no session will use, as Spark ends its
    own: its standard input closed, it exits and its shutdown hooks remove its scratch
    folder (killed, it left one in the temporary folder). It holds no SparkContext. A class
    archive it wrote as it exited (of the gateway's classes alone) is removed."""
    global _launch
    if _launch is None:
        return
    settings, launching = _launch
    _launch = None
    try:
        gateway = launching.result()
    except Exception:
        return  # it never started
    gateway.shutdown()
    if gateway.proc is None:
        return
    gateway.proc.stdin.close()
    try:
        gateway.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        gateway.proc.wait()
    archive = re.search(r"-XX:ArchiveClassesAtExit=(\S+)", settings.get(JAVA_OPTIONS_KEY, ""))
    if archive:
        Path(archive[1]).unlink(missing_ok=True)


def local_jvm_options(extra_class_path: str = "") -> str:
    """Java options for a local Spark's JVM: its class archive (:func:`class_archive_options`,
    unless ``IMAGEPCA_JVM_CLASS_ARCHIVE=0``) and, with ``IMAGEPCA_JVM_QUICK_JIT=1``, C1 only
    (:data:`QUICK_JIT_OPTION`); neither where ``spark-defaults.conf`` sets the driver's
    Java options."""
    if _admin_java_options(Path(_find_spark_home())):
        return ""
    options = []
    if os.environ.get(CLASS_ARCHIVE_ENV, "1") != "0":
        options.append(class_archive_options(extra_class_path))
    if os.environ.get(QUICK_JIT_ENV) == "1":
        options.append(QUICK_JIT_OPTION)
    return " ".join(option for option in options if option)


def class_archive_options(extra_class_path: str = "") -> str:
    """JVM options that map the archive of the classes a local Spark loads, or, when there
    is none yet, write it as this JVM exits ("" where Java cannot, before Java 13).

    A local JVM spends seconds of every run loading and verifying the same tens of
    thousands of Spark classes. Java's dynamic class data sharing maps them from an archive
    instead: measured here, session start + listing + a first query 11.7-12.4 -> 7.1-8.6 s,
    and ``make demo`` about 6 s faster. Writing the archive costs the first run about
    10 s (and ~150 MB in the cache), once per Java, Spark and class path. The archive is
    written under a temporary name and kept by :func:`stop_spark` once the JVM has exited
    cleanly; a JVM that cannot use an archive (another JDK build) loads classes the
    ordinary way.
    """
    global _pending_archive
    java_home = _java_home()
    spark_home = Path(_find_spark_home())
    if java_home is None or (_java_major(java_home) or 0) < 13:
        return ""
    # Spark's launcher puts the configuration folder on the class path, and Java writes no
    # archive for a class path with a non-empty folder (it printed "Cannot have non-empty
    # directory in paths" at every exit instead).
    conf_dir = _conf_dir(spark_home)
    if conf_dir.is_dir() and any(conf_dir.iterdir()):
        return ""
    jars = spark_home / "jars"
    identity = "\n".join(
        [
            str(java_home.resolve()),
            (java_home / "release").read_text(errors="replace"),
            pyspark.__version__,
            str(jars.resolve()),
            str(jars.stat().st_mtime_ns) if jars.is_dir() else "",
            extra_class_path,
        ]
    )
    folder = cache_dir() / "jvm"
    archive = folder / f"spark-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.jsa"
    if archive.is_file():
        return f"-XX:SharedArchiveFile={archive} {_QUIET_ARCHIVE}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_archives(folder)
    except OSError:
        return ""  # a read-only cache: runs as before
    writing = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
    _pending_archive = (writing, archive)
    return f"-XX:ArchiveClassesAtExit={writing} {_QUIET_ARCHIVE}"


def _admin_java_options(spark_home: Path) -> bool:
    """Whether ``spark-defaults.conf`` sets the driver's Java options (an EMR node's does):
    a session's own setting would replace them, so they win and the session adds none."""
    try:
        text = (_conf_dir(spark_home) / "spark-defaults.conf").read_text(errors="replace")
    except OSError:
        return False
    setting = re.compile(rf"\s*{re.escape(JAVA_OPTIONS_KEY)}\s*[=:\s]")  # Java properties
    return any(setting.match(line) for line in text.splitlines())


def _conf_dir(spark_home: Path) -> Path:
    """Spark's configuration folder, as its launcher finds it."""
    return Path(os.environ.get("SPARK_CONF_DIR") or spark_home / "conf")


def _java_home() -> Path | None:
    """The Java that Spark's launcher runs: ``$JAVA_HOME``, else ``java`` on the PATH."""
    if os.environ.get("JAVA_HOME"):
        return Path(os.environ["JAVA_HOME"])
    java = shutil.which("java")
    return Path(os.path.realpath(java)).parent.parent if java else None


def _java_major(java_home: Path) -> int | None:
    """17 for ``JAVA_VERSION="17.0.15"``, 8 for ``"1.8.0_402"`` (the JDK's release file)."""
    try:
        release = (java_home / "release").read_text(errors="replace")
    except OSError:
        return None
    for line in release.splitlines():
        if line.startswith("JAVA_VERSION="):
            parts = line.split("=", 1)[1].strip().strip('"').split(".")
            major = parts[1] if parts[0] == "1" and len(parts) > 1 else parts[0]
            return int(major) if major.isdigit() else None
    return None


def _remove_abandoned_archives(folder: Path) -> None:
    """Partial archives of JVMs whose Python process has ended without keeping them."""
    for partial in folder.glob("*.tmp"):
        pid = partial.suffixes[-2].lstrip(".") if len(partial.suffixes) > 1 else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_class_archive(exit_code: int | None) -> None:
    """Give the archive the exited JVM wrote its final name (a failed JVM's is dropped)."""
    global _pending_archive
    if _pending_archive is None:
        return
    writing, archive = _pending_archive
    _pending_archive = None
    if exit_code == 0 and writing.is_file() and writing.stat().st_size > 0:
        os.replace(writing, archive)
    else:
        writing.unlink(missing_ok=True)


def stop_spark(timeout: float = 60.0) -> None:
    """Stop this process's SparkContext and, when this process launched the JVM, let the JVM
    exit and wait for it.

    ``imagepca run`` calls this in its kernel before ending the kernel, which it then kills
    (see :func:`imagepca.runner.run_notebooks`): a JVM killed with its kernel's process
    group would leave its scratch directories and no class archive. Stopping here is
    Spark's ordinary shutdown (the JVM exits when its standard input closes), and waiting
    for the JVM also spares an orderly kernel shutdown the 2 s ipykernel sleeps while a
    child that has exited but was not waited for is left. A JVM writing its class archive
    (see :func:`class_archive_options`) has written it once it has exited, and the archive
    is kept. Nothing happens without a session, or for a JVM this process did not launch (a
    ``pyspark`` shell's, Livy's). A JVM :func:`start_spark` launched that no session took is
    ended too (see :func:`_discard_launch`).
    """
    from pyspark import SparkContext

    _discard_launch()
    accumulators = _detach_accumulator_server(SparkContext._active_spark_context)
    try:
        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
        context = SparkContext._active_spark_context
        if context is not None:
            context.stop()
    finally:  # also when stopping failed (a JVM that died): the server's socket is closed
        if accumulators is not None:
            # A daemon thread: stop_spark also runs at interpreter exit (atexit), where an
            # executor no longer accepts work.
            threading.Thread(
                target=accumulators.shutdown, name="imagepca-accumulators", daemon=True
            ).start()
    gateway = SparkContext._gateway
    process = getattr(gateway, "proc", None)
    if gateway is None or process is None:
        return
    gateway.shutdown()
    SparkContext._gateway = None
    SparkContext._jvm = None
    process.stdin.close()
    process.wait(timeout)
    _keep_class_archive(process.returncode)


def _detach_accumulator_server(context):
    """Take the context's accumulator server, for :func:`stop_spark` to shut down on a thread
    of its own once the context has stopped.

    ``SparkContext.stop`` shuts it down and waits: its handler looks for the shutdown once a
    second, between reads of the JVM's updates, so every stop after a Python UDF's job
    waited 0-1 s (0.53-0.90 s measured here), the end of every run. Shut down aside, it ends
    on its own within a second, or at once when the JVM, its only client, exits and closes
    the connection; the traceback that closing would print is silenced.
    """
    server = getattr(context, "_accumulatorServer", None)
    if server is None:
        return None
    context._accumulatorServer = None
    server.handle_error = lambda request, client_address: None
    return server


def default_parallelism(spark: SparkSession) -> int:
    """Cores Spark can run tasks on right now (executors x cores, or local threads)."""
    return max(1, spark.sparkContext.defaultParallelism)


def cached_shuffle_settings(spark: SparkSession, n_rows: int) -> dict[str, str]:
    """Shuffle partitions for a small-rowed table (paths, labels) about to be cached.

    A cached plan keeps the partitions its shuffle had when ``persist`` planned it: the
    session's default (200 unless set), which adaptive execution does not coalesce there.
    Every later job over the table then runs 200 nearly empty tasks (seconds on a few
    hundred rows). One partition per 200,000 rows, at most one per core. Set around the
    ``persist`` and the table's first job.
    """
    partitions = max(1, min(default_parallelism(spark), -(-n_rows // 200_000)))
    return {SHUFFLE_PARTITIONS_KEY: str(partitions)}


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


def java_doubles(spark: SparkSession, values: np.ndarray):
    """A JVM ``double[]`` holding ``values`` (flattened in C order), for a Java constructor.

    py4j sends bytes as base64 text in its command stream: a 1280 x 1280 component matrix
    (13 MB) took 0.18-0.36 s to reach the JVM that way (PySpark's ``_py2java``), 0.03-0.05 s
    written to a local temporary file the JVM reads into the array. The driver's Python and
    its JVM always share a host: PySpark's gateway is local (under Livy and YARN too).
    """
    gateway, jvm = spark.sparkContext._gateway, spark.sparkContext._jvm
    values = np.ascontiguousarray(values, dtype="<f8")
    handle, name = tempfile.mkstemp(prefix="imagepca-", suffix=".f64")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(values.data)
        path = jvm.java.nio.file.Paths.get(name, gateway.new_array(jvm.String, 0))
        channel = jvm.java.nio.channels.FileChannel.open(
            path, gateway.new_array(jvm.java.nio.file.OpenOption, 0)
        )
        try:
            buffer = jvm.java.nio.ByteBuffer.allocate(values.nbytes)
            while buffer.hasRemaining():
                if channel.read(buffer) < 0:
                    raise EOFError(f"{name} ended before its {values.nbytes} bytes")
        finally:
            channel.close()
    finally:
        os.unlink(name)
    buffer.flip()
    array = gateway.new_array(jvm.double, values.size)
    buffer.order(jvm.java.nio.ByteOrder.LITTLE_ENDIAN).asDoubleBuffer().get(array)
    return array


def in_background(call: Callable, *args: object) -> Future:
    """Start ``call(*args)`` on a thread of its own and return its future at once (the
    thread ends with the call)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagepca")
    future = worker.submit(call, *args)
    worker.shutdown(wait=False)
    return future


def run_concurrently(*calls: Callable[[], object]) -> list:
    """Call each function on its own thread; their results in order (the first error
    raised, after every call has ended).

    For independent Spark jobs that are small next to their scheduling cost (a model's
    metadata file, an empty dataset, a checksum): PySpark gives each Python thread its own
    JVM thread, and Spark runs the jobs of several threads at once, so a small job's latency
    overlaps a larger job instead of adding to it. Measured: notebook 02's three publishes at
    10,000 images 5.9 -> 4.9 s; less on a cold JVM, whose small jobs are CPU-bound too.
    """
    # An interrupt stops the wait, not the calls' threads: their Spark jobs are cancelled.
    with (
        jobs_cancelled_on_interrupt(pyspark.SparkContext._active_spark_context),
        ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool,
    ):
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]
