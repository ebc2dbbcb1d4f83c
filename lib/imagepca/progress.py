"""Progress of a long Spark job that a person can follow: done / total, rate, time left.

The numbers are Spark's own. The jobs run inside :func:`track` are tagged with a job group,
and a daemon thread in the driver's process (the notebook kernel) reads their stages from
the application status store (what the Spark UI shows) every second: a stage's
``inputRecords`` (one record per image file for a ``binaryFile`` scan) and its finished and
failed tasks. Finished tasks count exactly. On a cluster, running tasks also report the
records read so far with each executor heartbeat (``spark.executor.heartbeatInterval``, 10 s
by default), so the count moves between task ends; in local mode Spark sends no such live
record counts, and the count moves as tasks finish.

The line goes to the kernel's stdout, refreshed in place (``\r``) at most every
``interval`` seconds: in a notebook it is one updating line under the cell, and
``imagepca run`` reads it from the kernel's output and shows it in the terminal. Failed
tasks (which Spark retries) and lost executors are printed as ``warning:`` lines on stderr.

Usage::

    with progress.track(spark, "featurize", total=len(listing)):
        rows = df.groupBy(...).count().collect()
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TextIO

INTERVAL_S = 3.0  # least time between two refreshes of the line
POLL_S = 1.0  # how often the status store is read
WARNING_PREFIX = "warning: "
_GROUP_KEY = "spark.jobGroup.id"
_DESCRIPTION_KEY = "spark.job.description"
# The stages' names in the Spark UI (their call site): a DataFrameWriter's, called from Python,
# would read "parquet at NativeMethodAccessorImpl.java:0".
_CALL_SITE_KEY = "callSite.short"


@dataclass(frozen=True)
class Snapshot:
    """The tracked jobs' state at one moment, as Spark reports it."""

    done: int  # records read by the tracked stages (capped at the total)
    tasks_done: int
    tasks: int
    failed_tasks: int
    jobs: int


def format_duration(seconds: float) -> str:
    """``48 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_line(
    name: str,
    done: int,
    total: int | None,
    elapsed: float,
    rate: float | None,
    unit: str,
    tasks: tuple[int, int] | None = None,
) -> str:
    """``featurize: 1,234/9,673 images (12.8%), 2/8 tasks, 12 s, 175.3 images/s, ETA 48 s``."""
    head = f"{name}: {done:,}/{total:,} {unit}" if total else f"{name}: {done:,} {unit}"
    if total:
        head += f" ({done / total:.1%})"
    parts = [head]
    if tasks and tasks[1]:
        parts.append(f"{tasks[0]}/{tasks[1]} tasks")
    parts.append(format_duration(elapsed))
    if rate:
        parts.append(f"{rate:.1f} {unit}/s")
        if total and done < total:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
    elif done == 0:
        parts.append("starting")
    return ", ".join(parts)


class Tracker:
    """Reads the tracked jobs' progress from Spark; :func:`track` runs it in a thread."""

    def __init__(
        self,
        spark,
        name: str,
        total: int | None = None,
        *,
        unit: str = "images",
        interval: float = INTERVAL_S,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.interval = interval
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.group = f"imagepca-{name}-{uuid.uuid4().hex[:8]}"  # unless the cell has one
        self._earlier_jobs: set[int] = set()
        self._sc = spark.sparkContext
        self._store = self._status_store()
        self._started = time.monotonic()
        self._failed_seen: set[tuple[int, int, int, int]] = set()
        self._executors_lost: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: Snapshot | None = None
        self._shown = 0  # length of the line on screen, to write over

    # -- Spark's numbers ---------------------------------------------------------------

    def _status_store(self):
        """The live application status store (what the Spark UI shows), or None."""
        try:
            return self._sc._jsc.sc().statusStore()
        except Exception:  # not a classic JVM session: task counts only
            return None

    def _stages(self, stage_id: int) -> list:
        """Every attempt of one stage, from the status store."""
        jvm = self._sc._gateway.jvm
        empty = self._sc._gateway.new_array(jvm.double, 0)
        try:
            seq = self._store.stageData(stage_id, False, jvm.java.util.ArrayList(), False, empty)
        except Exception:  # not in the store yet
            return []
        return [seq.apply(i) for i in range(seq.size())]

    def _job_ids(self) -> list[int]:
        """The jobs of the block: the group's, less those it held before the block."""
        jobs = self._sc.statusTracker().getJobIdsForGroup(self.group)
        return [job for job in jobs if job not in self._earlier_jobs]

    def snapshot(self) -> Snapshot:
        tracker = self._sc.statusTracker()
        job_ids = self._job_ids()
        stage_ids = sorted(
            {sid for job in job_ids if (info := tracker.getJobInfo(job)) for sid in info.stageIds}
        )
        done = tasks_done = tasks = failed = 0
        for stage_id in stage_ids:
            if self._store is not None:
                attempts = self._stages(stage_id)
                if attempts:
                    latest = max(attempts, key=lambda a: a.attemptId())
                    failed += sum(a.numFailedTasks() for a in attempts)
                    # Tasks of the stages that read the input: not the shuffle stages after
                    # them, nor stages still waiting for their parents.
                    reads_input = latest.shuffleReadRecords() == 0 and str(latest.status()) in (
                        "ACTIVE",
                        "COMPLETE",
                    )
                    if reads_input:
                        done += max(a.inputRecords() for a in attempts)
                        tasks += latest.numTasks()
                        tasks_done += latest.numCompleteTasks()
                    continue
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                tasks += info.numTasks
                tasks_done += info.numCompletedTasks
                failed += info.numFailedTasks
        if self._store is None and self.total and tasks:
            # No record counts without the status store: report whole tasks only.
            done = self.total * tasks_done // tasks
        if self.total is not None:
            done = min(done, self.total)
        return Snapshot(done, tasks_done, tasks, failed, len(job_ids))

    def _failures(self, stage_ids: list[int]) -> list[str]:
        """One line per task failure not reported yet (Spark retries the task)."""
        if self._store is None:
            return []
        jvm = self._sc._gateway.jvm
        v1 = jvm.org.apache.spark.status.api.v1
        lines = []
        for stage_id in stage_ids:
            for attempt in self._stages(stage_id):
                if attempt.numFailedTasks() == 0:
                    continue
                statuses = jvm.java.util.ArrayList()
                statuses.add(v1.TaskStatus.FAILED)
                tasks = self._store.taskList(
                    stage_id, attempt.attemptId(), 0, 1000, v1.TaskSorting.ID, statuses
                )
                for i in range(tasks.size()):
                    task = tasks.apply(i)
                    key = (stage_id, attempt.attemptId(), task.index(), task.attempt())
                    if key in self._failed_seen:
                        continue
                    self._failed_seen.add(key)
                    message = task.errorMessage()
                    reason = message.get() if message.isDefined() else "no reason given"
                    reason = _last_meaningful_line(reason)
                    lines.append(
                        f"{self.name}: task {task.index()} (attempt {task.attempt()}) failed on "
                        f"executor {task.executorId()}: {reason}; Spark retries it"
                    )
        return lines

    def _lost_executors(self) -> list[str]:
        """Executors removed for a reason other than dynamic allocation's idle timeout."""
        if self._store is None:
            return []
        lines = []
        executors = self._store.executorList(False)
        for i in range(executors.size()):
            executor = executors.apply(i)
            if executor.isActive() or executor.id() in self._executors_lost:
                continue
            self._executors_lost.add(executor.id())
            reason = executor.removeReason()
            reason = reason.get() if reason.isDefined() else "no reason given"
            if "killed by driver" in reason.lower():  # dynamic allocation: idle, not lost
                continue
            lines.append(f"{self.name}: executor {executor.id()} lost: {reason}")
        return lines

    def _known_dead_executors(self) -> None:
        """Executors already gone before tracking started are not news."""
        if self._store is None:
            return
        executors = self._store.executorList(False)
        for i in range(executors.size()):
            executor = executors.apply(i)
            if not executor.isActive():
                self._executors_lost.add(executor.id())

    # -- the line ----------------------------------------------------------------------

    def rate(self, now: float, done: int) -> float | None:
        """Records per second since tracking started (None before any record).

        Over the whole run, not a recent window: where records arrive a task at a time
        (local mode), a window would swing between zero and a burst.
        """
        elapsed = now - self._started
        return done / elapsed if done > 0 and elapsed > 0 else None

    def line(self, snap: Snapshot, now: float) -> str:
        return format_line(
            self.name,
            snap.done,
            self.total,
            now - self._started,
            self.rate(now, snap.done),
            self.unit,
            (snap.tasks_done, snap.tasks),
        )

    def _write(self, stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except Exception:  # a closed stream must not kill the job
            pass

    def _report(self, final: bool = False, failed: bool = False) -> None:
        snap = self.snapshot()
        self.last = snap
        now = time.monotonic()
        stage_ids = sorted(
            {
                sid
                for job in self._job_ids()
                if (info := self._sc.statusTracker().getJobInfo(job))
                for sid in info.stageIds
            }
        )
        warnings = []
        if snap.failed_tasks:
            warnings += self._failures(stage_ids)
        warnings += self._lost_executors()
        if warnings:
            self._write(self.out, "\n")
            self._shown = 0
            self._write(self.err, "".join(f"{WARNING_PREFIX}{w}\n" for w in warnings))
        if final:
            elapsed = now - self._started
            if failed:
                text = (
                    f"{self.name}: stopped at {snap.done:,}"
                    f"{f'/{self.total:,}' if self.total else ''} {self.unit} after "
                    f"{format_duration(elapsed)}"
                )
            else:
                done = snap.done if self.total is None else self.total
                rate = done / elapsed if elapsed > 0 else 0.0
                text = (
                    f"{self.name}: {done:,} {self.unit} in {format_duration(elapsed)}, "
                    f"{rate:.1f} {self.unit}/s"
                )
            self._refresh(f"{text}\n")
        else:
            self._refresh(self.line(snap, now))

    def _refresh(self, text: str) -> None:
        """Write over the previous line: ``\r``, then spaces past a longer previous line
        (a notebook's output area, like a terminal, does not clear the rest of the line)."""
        body = text.rstrip("\n")
        padded = body.ljust(self._shown)
        self._shown = 0 if text.endswith("\n") else len(body)
        self._write(self.out, f"\r{padded}{text[len(body) :]}")

    def _loop(self) -> None:
        last_print = -self.interval
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            if now - last_print < self.interval:
                continue
            last_print = now
            try:
                self._report()
            except Exception:  # the session is stopping, or a transient py4j error
                continue

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        self._previous = {
            key: self._sc.getLocalProperty(key)
            for key in (_GROUP_KEY, _DESCRIPTION_KEY, _CALL_SITE_KEY)
        }
        # Livy runs each cell in the job group of its statement id, and cancels the cell
        # (the notebook's interrupt) with cancelJobGroup: a cell's group is kept, so its
        # jobs stay cancellable and in Livy's progress; its earlier jobs are not counted.
        if self._previous[_GROUP_KEY]:
            self.group = self._previous[_GROUP_KEY]
            self._earlier_jobs = set(self._sc.statusTracker().getJobIdsForGroup(self.group))
        else:
            self._sc.setLocalProperty(_GROUP_KEY, self.group)
        self._sc.setLocalProperty(_DESCRIPTION_KEY, self.name)
        self._sc.setLocalProperty(_CALL_SITE_KEY, self.name)
        with suppress(Exception):
            self._known_dead_executors()
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=self._loop, name=f"imagepca-progress-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, failed: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # Never raises: a JVM that died would otherwise put py4j's error in place of the
        # job's own, which is what the user needs to see.
        with suppress(Exception):
            for key, value in self._previous.items():
                self._sc.setLocalProperty(key, value)
        with suppress(Exception):
            self._report(final=True, failed=failed)


@contextmanager
def jobs_cancelled_on_interrupt(spark_context):
    """On KeyboardInterrupt in the block, :func:`cancel_jobs` before the interrupt goes on
    (to the block's clean-up: a staging folder's removal, say); ``None``: no Spark."""
    try:
        yield
    except KeyboardInterrupt:
        if spark_context is not None:
            with suppress(Exception):
                cancel_jobs(spark_context)
        raise


def cancel_jobs(spark_context, timeout: float = 60.0) -> bool:
    """Cancel every running Spark job and wait until none is active; whether they ended.

    What PySpark's own Ctrl-C handler does, for code a notebook's interrupt stops: the
    kernel's handler (ipykernel's) raises KeyboardInterrupt in the cell, and the jobs the
    cell started would otherwise run on and write after the cell's clean-up.
    """
    spark_context.cancelAllJobs()
    tracker = spark_context.statusTracker()
    deadline = time.monotonic() + timeout
    while tracker.getActiveJobsIds():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _last_meaningful_line(message: str) -> str:
    """The line of a Spark error that says what went wrong (Python's last traceback line)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    python = [line for line in lines if not line.startswith(("at ", "...", "File ", "^"))]
    for line in reversed(python):
        if "Error" in line or "Exception" in line:
            return line[:300]
    return (python or lines or ["no reason given"])[0][:300]


@contextmanager
def track(
    spark,
    name: str,
    total: int | None = None,
    *,
    unit: str = "images",
    interval: float = INTERVAL_S,
    out: TextIO | None = None,
    err: TextIO | None = None,
):
    """Show the progress of the Spark jobs run inside the block, refreshed in place.

    Parameters
    ----------
    spark : SparkSession
    name : str
        What the jobs do, e.g. ``"featurize"``; starts the line and names the Spark jobs.
    total : int, optional
        Records the jobs will read (e.g. the number of image files): gives the share done
        and the time left.
    unit : str
        What a record is, for the line (``images``).
    interval : float
        Least seconds between two refreshes.
    out, err : file, optional
        Where the line and the warnings go (default: ``sys.stdout`` and ``sys.stderr``).

    Yields
    ------
    Tracker
        ``tracker.last`` holds the last :class:`Snapshot` after the block.
    """
    tracker = Tracker(spark, name, total, unit=unit, interval=interval, out=out, err=err)
    tracker.start()
    try:
        with jobs_cancelled_on_interrupt(spark.sparkContext):  # a notebook's interrupt
            yield tracker
    except BaseException:
        tracker.stop(failed=True)
        raise
    tracker.stop()
