"""progress.track on a real local Spark job: a binaryFile scan of a generated sample through a
slow pandas UDF, split into several tasks, as feature extraction runs.

The job runs in a subprocess with its own SparkSession (the session fixture's settings
cannot change once its SparkContext runs), two task attempts allowed, so one planned task
failure shows as a warning and is retried.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from imagepca import progress
from imagepca.progress import format_duration, format_line

N_IMAGES = 24  # 3 classes x 8

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["PYSPARK_PYTHON"] = sys.executable
    import pandas as pd
    from pyspark.sql import SparkSession, functions as F
    from pyspark.sql.functions import pandas_udf
    from imagepca import progress
    from imagepca.sample import write_sample

    root = sys.argv[1]
    write_sample(root, classes=3, per_class=8)
    spark = (
        SparkSession.builder.master("local[2,2]")
        .config("spark.ui.enabled", "false")
        .config("spark.executor.heartbeatInterval", "1s")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
        .config("spark.sql.files.maxPartitionNum", "8")
        .config("spark.sql.files.maxPartitionBytes", "12k")
        .config("spark.sql.files.openCostInBytes", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    FAIL = {"on": False}

    def run(fail):
        @pandas_udf("long")
        def slow(content: pd.Series) -> pd.Series:
            from pyspark import TaskContext
            ctx = TaskContext.get()
            if fail and ctx.partitionId() == 0 and ctx.attemptNumber() == 0:
                raise ValueError("planned failure on the first attempt")
            time.sleep(0.5 * len(content))
            return content.str.len()

        images = (
            spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(root)
        )
        scored = images.select(slow("content").alias("n"))
        with progress.track(spark, "featurize", total=24, interval=1.0) as tracker:
            rows = scored.groupBy((F.col("n") > 0).alias("ok")).count().collect()
        return {
            "rows": sum(r["count"] for r in rows),
            "tasks": tracker.last.tasks,
            "group_after": spark.sparkContext.getLocalProperty("spark.jobGroup.id"),
        }

    for name, fail in (("plain", False), ("retried", True)):
        print(f"@@{name}", flush=True)
        print(f"\\n@@{name} " + json.dumps(run(fail)), flush=True)
        print(f"@@{name}", file=sys.stderr, flush=True)
    """
)

DURATION = r"(?:\d+ min )?\d+ s"  # format_duration: "48 s", "3 min 20 s"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Both jobs' stdout and stderr, split by job."""
    tmp = tmp_path_factory.mktemp("progress")
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp / "images")],
        capture_output=True,
        timeout=300,
    )
    # Bytes, decoded here: text mode would turn the refreshing "\r" into newlines.
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = {}, {}
    for name in ("plain", "retried"):
        out[name] = result.stdout.split(f"@@{name}")[1]
        summary = result.stdout.split(f"@@{name} ")[1].splitlines()[0]
        out[name + "_summary"] = summary
        err[name] = result.stderr.split(f"@@{name}")[0].split("@@plain")[-1]
    return out, err


def _progress_lines(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip().startswith("featurize:")]


def test_the_line_refreshes_in_place_with_done_total_rate_and_eta(tracked):
    out, _ = tracked
    lines = _progress_lines(out["plain"])
    assert "\r" in out["plain"], "the line is refreshed in place"
    counts = [int(re.match(r"featurize: ([\d,]+)", line)[1].replace(",", "")) for line in lines]
    assert counts == sorted(counts), f"progress never goes back: {lines}"
    middle = [
        line
        for line, n in zip(lines, counts, strict=True)
        if 0 < n < N_IMAGES and "/24 images" in line
    ]
    assert middle, f"no line while the job was under way: {lines}"
    assert any(re.search(rf"\d+\.\d images/s, ETA {DURATION}", line) for line in middle), middle
    assert any(re.search(r"\d+/\d+ tasks", line) for line in middle), middle
    assert re.fullmatch(rf"featurize: 24 images in {DURATION}, \d+\.\d images/s", lines[-1]), lines
    assert '"rows": 24' in out["plain_summary"]
    assert '"group_after": null' in out["plain_summary"], "the caller's job group is restored"


def test_a_failed_task_is_a_warning_and_its_retry_completes(tracked):
    out, err = tracked
    warnings = [line for line in err["retried"].splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err["retried"][-2000:]
    assert "featurize: task 0 (attempt 0) failed" in warnings[0]
    assert "ValueError: planned failure on the first attempt" in warnings[0]
    assert warnings[0].endswith("Spark retries it")
    assert _progress_lines(out["retried"])[-1].startswith("featurize: 24 images in ")
    assert not [line for line in err["plain"].splitlines() if line.startswith("warning: ")]


def test_format_line_and_durations():
    assert format_duration(48.4) == "48 s"
    assert format_duration(200) == "3 min 20 s"
    assert format_duration(3900) == "1 h 05 min"
    assert format_line("featurize", 0, 9673, 2.0, None, "images") == (
        "featurize: 0/9,673 images (0.0%), 2 s, starting"
    )
    assert format_line("featurize", 1234, 9673, 10.0, 123.4, "images", (2, 8)) == (
        "featurize: 1,234/9,673 images (12.8%), 2/8 tasks, 10 s, 123.4 images/s, ETA 1 min 08 s"
    )


def test_a_failing_block_keeps_its_own_error_when_the_jvm_is_gone(spark):
    """Restoring the thread's job group after a JVM died raised py4j's error, which then
    replaced the job's own in the cell's output and the run's last line."""
    from py4j.protocol import Py4JNetworkError

    from imagepca import progress

    class GoneJvm:
        def __init__(self, context):
            self.context = context

        def setLocalProperty(self, key, value):
            raise Py4JNetworkError("Answer from Java side is empty")

        def __getattr__(self, name):
            return getattr(self.context, name)

    context = spark.sparkContext
    try:
        with (
            pytest.raises(ValueError, match="the job's own error"),
            progress.track(spark, "gone", out=io.StringIO(), err=io.StringIO()) as tracker,
        ):
            previous = dict(tracker._previous)
            tracker._sc = GoneJvm(context)
            raise ValueError("the job's own error")
    finally:
        for key, value in previous.items():
            context.setLocalProperty(key, value)


def test_a_cell_run_by_livy_stays_cancellable_in_its_job_group(spark):
    """Livy runs each cell in the job group of its statement id and cancels the cell with
    cancelJobGroup: a tracked job stays in that group, so the notebook's interrupt stops it,
    and the cell's earlier jobs are not counted as its progress."""
    context = spark.sparkContext
    outcome = {}

    def cell() -> None:  # the thread Livy's interpreter runs statement 7 in
        context.setJobGroup("7", "statement 7", interruptOnCancel=True)
        spark.range(10).count()  # an earlier job of the same cell
        try:
            with progress.track(spark, "featurize", out=io.StringIO(), err=io.StringIO()) as t:
                outcome["tracker"] = t
                spark.range(4, numPartitions=2).rdd.map(lambda x: time.sleep(60) or x).count()
        except Exception as error:  # the cancelled job
            outcome["error"] = error

    thread = threading.Thread(target=cell)
    started = time.monotonic()
    thread.start()
    status = context.statusTracker()
    while time.monotonic() - started < 60 and not any(
        status.getJobInfo(job).status == "RUNNING" and status.getJobInfo(job).stageIds
        and "tracker" in outcome
        for job in status.getJobIdsForGroup("7")
    ):  # fmt: skip
        time.sleep(0.2)
    context.cancelJobGroup("7")
    thread.join(timeout=30)
    assert not thread.is_alive(), "the tracked job was not cancelled with its cell's group"
    assert "cancel" in str(outcome["error"]).lower()
    assert time.monotonic() - started < 50  # well before its tasks' 60 s sleep
    tracker = outcome["tracker"]
    assert tracker.group == "7"
    assert len(tracker._job_ids()) == 1  # the tracked job, not the cell's earlier count


def test_an_interrupted_write_stops_its_jobs_before_its_folder_goes(spark, tmp_path):
    """A notebook's interrupt raises KeyboardInterrupt in the cell (ipykernel's handler,
    not PySpark's, which would cancel the jobs): the write's jobs are cancelled and ended
    before its staging folder is removed, so nothing is written there afterwards."""
    from imagepca.storage import STAGING_DIR, Storage

    context, output = spark.sparkContext, str(tmp_path / "out")
    started, ended = threading.Event(), {}

    def slow_rows(batches):
        for batch in batches:
            time.sleep(60)
            yield batch

    def slow_write(uri: str) -> None:  # the job the cell was waiting on when interrupted
        try:
            spark.range(4, numPartitions=2).mapInPandas(slow_rows, "id long").write.parquet(uri)
        except Exception as error:
            ended["error"] = error

    def write(uri: str) -> None:
        job = threading.Thread(target=slow_write, args=(uri,), daemon=True)
        job.start()
        deadline = time.monotonic() + 60
        while not context.statusTracker().getActiveJobsIds() and time.monotonic() < deadline:
            time.sleep(0.1)
        started.set()
        raise KeyboardInterrupt

    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # Storage.stage's own handling, untracked
        Storage(spark).stage(output, "features", write)
    assert started.is_set()
    assert not context.statusTracker().getActiveJobsIds()
    deadline = time.monotonic() + 10
    while "error" not in ended and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cancelled" in str(ended["error"])
    assert time.monotonic() - begun < 50  # well before the tasks' 60 s sleep
    time.sleep(1)  # a job still running would write its task files now
    assert not (tmp_path / "out" / STAGING_DIR).exists()
