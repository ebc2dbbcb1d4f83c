"""Multi-process Spark for the tests: a standalone cluster on loopback, and driver scripts.

The session ``spark`` fixture is a ``local[2]`` session, and a process can hold only one
SparkContext, so cluster-mode Spark code runs in a *subprocess*: a driver script written by
:func:`write_driver` and run by :func:`run_driver`, which writes a JSON result the test
compares with the local-mode run. Two kinds of cluster are supported:

* ``local-cluster[N,C,M]``: N workers inside the driver JVM, each launching its executor as
  a separate JVM (Spark's own multi-process test mode; needs nothing but pip pyspark).
* :class:`StandaloneCluster`: a master and workers as separate processes started with pip
  pyspark's ``bin/spark-class``, so a test can kill a whole worker (and its executor JVM and
  Python workers) while a job runs, as a lost node does.

Executors do not see the editable install: :func:`clean_python` makes a venv that reuses
this venv's libraries but not its ``.pth`` files, and :func:`ship_lib` zips ``lib/imagepca``
for ``SparkContext.addPyFile``, the way the library reaches executors on EMR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

from group_watch import watch_group

REPO = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
SPARK_CLASS = SPARK_HOME / "bin" / "spark-class"
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20
DAEMON_LIFETIME_S = 3600  # ended by the watchdog if no fixture stopped them by then


# -- shipping the library -----------------------------------------------------------------


def ship_lib(dest: Path) -> Path:
    """Zip ``lib/imagepca`` as ``dest/imagepca.zip`` (``imagepca/...`` at the top).

    The same layout ``python -m zipfile -c imagepca.zip lib/imagepca`` gives: what
    ``addPyFile`` puts on the executors' ``sys.path``. Caches and notebooks are left out.
    """
    archive = dest / "imagepca.zip"
    source = REPO / "lib" / "imagepca"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" not in path.parts:
                zf.write(path, Path("imagepca") / path.relative_to(source))
    return archive


def clean_python(dest: Path) -> Path:
    """A venv whose interpreter imports this venv's libraries but *not* ``imagepca``.

    A ``.pth`` line naming a directory adds it to ``sys.path`` without processing the
    ``.pth`` files inside it, so the editable install's ``_editable_impl_imagepca.pth``
    (which adds ``lib/``) is not applied: numpy, pyspark, TFLite... import, the library
    only from what Spark ships.
    """
    venv = dest / "clean-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
        )
        site = Path(
            subprocess.check_output(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                text=True,
            ).strip()
        )
        (site / "reuse_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


# -- driver scripts -------------------------------------------------------------------------

DRIVER_SCRIPT = r'''
"""Cluster-mode driver written by tests/cluster.py: runs the pipeline, writes a JSON result."""
import json
import os
import signal
import sys
import threading
import time

from pyspark.sql import SparkSession

args = json.loads(sys.argv[1])
builder = SparkSession.builder.appName("imagepca-cluster-test").master(args["master"])
for key, value in args.get("conf", {}).items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()
sc = spark.sparkContext
sc.setLogLevel("ERROR")


def executor_count():
    return sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver


# local[N] runs its tasks in the driver: no executor ever registers, nothing to wait for.
wanted = args.get("executors", 0 if args["master"].startswith("local[") else 1)
deadline = time.time() + args.get("executor_timeout_s", 120)
while executor_count() < wanted and time.time() < deadline:
    time.sleep(0.2)
result = {"executors_at_start": executor_count()}

if args.get("pyfile"):
    sc.addPyFile(args["pyfile"])

import imagepca  # noqa: E402  (from the shipped zip when pyfile is set)
from imagepca.config import ExtractParams, ReduceParams  # noqa: E402
from imagepca.pipeline import extract_features, finish_run, reduce_features  # noqa: E402

result["driver_imagepca"] = imagepca.__file__


def where_imported(_):
    import socket
    import sys as executor_sys

    import imagepca as executor_copy

    return [(executor_copy.__file__, executor_sys.executable, os.getpid(), socket.gethostname(),
             executor_sys.path)]


if args.get("check_imports", True):
    result["executor_imports"] = (
        sc.parallelize(range(8), 8).mapPartitions(where_imported).collect()
    )

kill = args.get("kill")
killed = {}


def kill_worker_when_running():
    """Once a stage of >= min_tasks tasks (named with stage_contains, when given: the call
    site) has completed min_completed of them and still runs some, SIGKILL a process group
    (a worker: ``pgid``) or tell the test to (``signal_file``)."""
    tracker = sc.statusTracker()
    deadline = time.time() + kill["timeout_s"]
    while time.time() < deadline:
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if (
                info is not None
                and info.numTasks >= kill["min_tasks"]
                and info.numCompletedTasks >= kill.get("min_completed", 1)
                and info.numActiveTasks >= 1
                and kill.get("stage_contains", "") in info.name
            ):
                if "pgid" in kill:
                    os.killpg(kill["pgid"], signal.SIGKILL)
                else:
                    with open(kill["signal_file"], "w") as handle:
                        handle.write(str(stage_id))
                killed.update(stage_id=stage_id, num_tasks=info.numTasks,
                              completed_at_kill=info.numCompletedTasks, at=time.time())
                return
        time.sleep(0.05)


if kill:
    watcher = threading.Thread(target=kill_worker_when_running, daemon=True)
    watcher.start()

started = time.time()
extract = ExtractParams(**args["extract"])
extraction = extract_features(spark, extract)
reduction = reduce_features(spark, ReduceParams(**args["reduce"]))
finish_run(spark, extract.output, reduction.metrics)
result["elapsed_s"] = round(time.time() - started, 2)
if kill:
    watcher.join(timeout=1)
    result["killed"] = killed
    if killed:
        info = sc.statusTracker().getStageInfo(killed["stage_id"])
        result["killed"]["failed_tasks"] = info.numFailedTasks if info else None
        result["killed"]["attempt"] = info.currentAttemptId if info else None
result["executors_at_end"] = executor_count()
result["extraction"] = extraction.metadata
result["reduction"] = {k: v for k, v in reduction.metrics.items() if k != "versions"}
with open(args["result"], "w") as handle:
    json.dump(result, handle, indent=2, default=str)
spark.stop()
'''


def write_driver(dest: Path) -> Path:
    """Write the driver script into ``dest`` (outside the repository, so that with the
    clean interpreter nothing but the shipped zip provides ``imagepca``)."""
    script = dest / "cluster_driver.py"
    script.write_text(DRIVER_SCRIPT)
    return script


def base_conf(**extra: str) -> dict[str, str]:
    """The settings of ``imagepca.session.get_spark`` plus small executors and no UIs."""
    return {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.compression.codec": "zstd",
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "4",
        "spark.executor.memory": "768m",
        "spark.driver.memory": "1g",
        **extra,
    }


def driver_env(python: Path, **extra: str) -> dict[str, str]:
    """Environment of a driver subprocess: one interpreter for driver and Python workers,
    Spark on loopback, the test session's Keras/model caches (inherited from os.environ)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        PYSPARK_PYTHON=str(python),
        PYSPARK_DRIVER_PYTHON=str(python),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_HOME=str(SPARK_HOME),
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return env


@dataclass
class DriverRun:
    returncode: int
    result: dict
    stdout: str
    stderr: str
    seconds: float
    killed_on_signal: bool = False


def run_driver(
    script: Path,
    args: dict,
    *,
    python: Path,
    cwd: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    kill_on_file: Path | None = None,
) -> DriverRun:
    """Run the driver script with ``python`` in its own process group; killed on timeout.

    ``args["result"]`` names the JSON file the script writes on success. With
    ``kill_on_file``, the whole group (driver, its JVM, Python workers) is SIGKILLed as soon
    as that file appears: an interruption at a point the script chose.
    """
    started = time.perf_counter()
    out, err = cwd / "driver.stdout", cwd / "driver.stderr"
    killed = False
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [str(python), str(script), json.dumps(args)],
            cwd=cwd,
            env=env or driver_env(python),
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    watch_group(process.pid, timeout_s + 60)
    try:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            if kill_on_file is not None and kill_on_file.exists():
                _kill_group(process)
                killed = True
                break
            time.sleep(0.02)
        if process.poll() is None:
            err.write_text(err.read_text() + f"\n[cluster.py] driver killed after {timeout_s} s")
    finally:
        _kill_group(process)  # the driver's JVM and Python workers, if any were left
    result_file = Path(args["result"])
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return DriverRun(
        process.returncode,
        result,
        out.read_text(errors="replace"),
        err.read_text(errors="replace"),
        time.perf_counter() - started,
        killed,
    )


def _kill_group(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)


# -- standalone cluster -------------------------------------------------------------------


@dataclass
class Daemon:
    """One ``spark-class`` process (its own process group, so its children die with it)."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_log(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text(errors="replace"))
            if match:
                return match
            if not self.alive():
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"{self.name} did not log {pattern!r} within {timeout_s} s "
            f"(exit code {self.process.poll()}); log tail:\n"
            + self.log.read_text(errors="replace")[-3000:]
        )

    def group_pids(self) -> list[int]:
        """Processes of this daemon's group: the JVM, executor JVMs, Python workers."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with suppress(OSError):
                    stat = (entry / "stat").read_text()
                    state, _, pgid = stat.rsplit(")", 1)[1].split()[:3]
                    if int(pgid) == self.pgid and state != "Z":
                        pids.append(int(entry.name))
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILL the whole group, as when a node is lost, and reap the daemon."""
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class StandaloneCluster:
    """Master + workers on 127.0.0.1, web UIs on ephemeral ports, logs under ``workdir``."""

    workdir: Path
    python: Path
    master: Daemon | None = None
    workers: list[Daemon] = field(default_factory=list)
    url: str = ""

    def _spawn(self, name: str, *arguments: str) -> Daemon:
        log = self.workdir / f"{name}.log"
        env = driver_env(self.python)
        env.update(
            SPARK_LOG_DIR=str(self.workdir / "logs"),
            SPARK_WORKER_DIR=str(self.workdir / "work"),
            SPARK_NO_DAEMONIZE="1",
        )
        with open(log, "w") as handle:
            process = subprocess.Popen(
                [str(SPARK_CLASS), *arguments],
                cwd=self.workdir,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        watch_group(process.pid, DAEMON_LIFETIME_S)
        return Daemon(name, process, log)

    def start(self, workers: int = 2, cores: int = 1, memory: str = "1g") -> StandaloneCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master = self._spawn(
            "master",
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--webui-port",
            "0",
        )
        port = self.master.wait_for_log(r"Starting Spark master at spark://127\.0\.0\.1:(\d+)")
        self.url = f"spark://127.0.0.1:{port.group(1)}"
        for index in range(workers):
            worker = self._spawn(
                f"worker{index}",
                "org.apache.spark.deploy.worker.Worker",
                self.url,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--webui-port",
                "0",
                "--cores",
                str(cores),
                "--memory",
                memory,
                "--work-dir",
                str(self.workdir / f"work{index}"),
            )
            self.workers.append(worker)
        for worker in self.workers:
            worker.wait_for_log(r"Successfully registered with master")
        return self

    def executor_pids(self, worker: Daemon) -> list[int]:
        """Executor JVMs the worker launched (CoarseGrainedExecutorBackend in its group)."""
        found = []
        for pid in worker.group_pids():
            with suppress(OSError):
                if b"CoarseGrainedExecutorBackend" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def stop(self) -> None:
        """Kill every worker (with its executors) and the master; never leaves a process."""
        for daemon in [*self.workers, self.master]:
            if daemon is not None:
                daemon.kill()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:  # children (the launcher, executors) are reaped by init a moment later
            leftovers = [pid for d in [*self.workers, self.master] if d for pid in d.group_pids()]
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if leftovers:
            raise RuntimeError(f"cluster processes still alive after teardown: {leftovers}")


@contextmanager
def standalone_cluster(
    workdir: Path, python: Path, workers: int = 2
) -> Iterator[StandaloneCluster]:
    """A running :class:`StandaloneCluster`, stopped (processes killed) on exit."""
    cluster = StandaloneCluster(workdir, python)
    try:
        yield cluster.start(workers=workers)
    finally:
        cluster.stop()


def local_cluster_master(workers: int = 2, cores: int = 1, memory_mb: int = 1024) -> str:
    """``local-cluster[N,C,M]``: N worker threads in the driver JVM, executors as JVMs."""
    return f"local-cluster[{workers},{cores},{memory_mb}]"
