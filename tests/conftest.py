"""Shared test fixtures: one local SparkSession, the shared weights and images, and runs
of the pipeline that several test modules inspect (each made once per test session).

The shared assets live in ``../shared`` beside the checkout (``IMAGEPCA_SHARED`` overrides)
and are read in place, never copied into the repository.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEPCA_SHARED", REPO.parent / "shared")).resolve()
WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
FRUIT_PHOTOS = SHARED / "datasets" / "fruit-photos"
FRUIT360 = SHARED / "datasets" / "fruit360-shapes"
# What notebooks 01 and 02 leave in the output folder (notebook 03 adds its own files).
OUTPUT_LAYOUT = (
    "features",
    "rejected",
    "pca_model",
    "pca_components",
    "reduced",
    "metrics.json",
    "explained_variance.png",
    "projection.png",
    "samples.png",
    "notebooks",
    "_SUCCESS",
)


def pytest_configure(config):
    missing = [p for p in (WEIGHTS, FRUIT_PHOTOS, FRUIT360) if not p.exists()]
    if missing:
        raise pytest.UsageError(
            f"shared test assets not found: {', '.join(map(str, missing))}. "
            "The tests read ../shared beside the checkout (or set IMAGEPCA_SHARED)."
        )


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory):
    """Keras cache seeded with the shared weights (a link, as a user's cache would hold the
    file), a per-session model cache, Spark on loopback, one Python for driver and workers.

    Every Spark JVM the tests start (drivers, standalone workers, local-cluster executors)
    keeps its scratch folders in the session's temporary folder: one killed by a test leaves
    them there, not in /tmp."""
    keras_home = tmp_path_factory.mktemp("keras_home")
    (keras_home / "models").mkdir()
    (keras_home / "models" / WEIGHTS.name).symlink_to(WEIGHTS)
    settings = {
        "KERAS_HOME": str(keras_home),
        "IMAGEPCA_CACHE": str(tmp_path_factory.mktemp("imagepca_cache")),
        "SPARK_LOCAL_DIRS": str(tmp_path_factory.mktemp("spark_local")),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield settings
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def spark(test_environment):
    from imagepca.session import get_spark

    session = get_spark(
        "local[2]",
        conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The generated Fruits-360-like sample (6 classes x 40 images)."""
    from imagepca.sample import write_sample

    root = tmp_path_factory.mktemp("sample") / "data"
    write_sample(root)
    return root


@pytest.fixture(scope="session")
def photos_run(spark, tmp_path_factory):
    """The real photos through both stages with the real weights, in this process."""
    from imagepca.config import ExtractParams, ReduceParams
    from imagepca.pipeline import extract_features, finish_run, reduce_features

    output = str(tmp_path_factory.mktemp("photos") / "out")
    extraction = extract_features(
        spark, ExtractParams(input=str(FRUIT_PHOTOS), output=output, weights=str(WEIGHTS))
    )
    reduction = reduce_features(spark, ReduceParams(output=output, variance=0.9))
    finish_run(spark, output, reduction.metrics)
    return {"output": output, "extraction": extraction, "reduction": reduction}


def processes_with(marker: str) -> dict[int, str]:
    """Processes alive whose environment holds ``marker`` (what a run's kernel and its JVM
    inherit), with their commands."""
    found = {}
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        if marker in (process.info["environ"] or {}):
            found[process.info["pid"]] = " ".join(process.info["cmdline"] or [])[:200]
    return found


@pytest.fixture(scope="session")
def sample_run(sample_dir, tmp_path_factory, test_environment):
    """``imagepca run`` on the sample: every notebook executed by papermill (python3 kernel)."""
    from imagepca.cli import main

    output = tmp_path_factory.mktemp("sample_run") / "out"
    # The run's processes inherit a marker, and its JVM a scratch folder of its own.
    marker, scratch = f"IMAGEPCA_TEST_RUN_{os.getpid()}", output.parent / "spark-local"
    scratch.mkdir()
    session_scratch = os.environ["SPARK_LOCAL_DIRS"]
    os.environ.update({marker: "1", "SPARK_LOCAL_DIRS": str(scratch)})
    threads_before = set(threading.enumerate())
    try:
        status = main(
            ["run", "--input", str(sample_dir), "--output", str(output), "--master", "local[2]"]
        )
    finally:
        os.environ.pop(marker)
        os.environ["SPARK_LOCAL_DIRS"] = session_scratch
    assert status == 0
    # Every kernel client the run made (papermill's, one per notebook) is stopped: a running
    # one's sockets would reconnect to the ended kernel's ports as long as this process lives.
    clients = [
        t for t in set(threading.enumerate()) - threads_before if type(t).__name__ == "HBChannel"
    ]
    assert not clients, f"kernel clients still running: {clients}"
    # The kernel is killed once its Spark has stopped: no process of the run is left, and
    # the JVM stopped in order first (a JVM killed with its kernel leaves its scratch
    # directories behind).
    # (A Python worker the JVM's exit signalled may take a moment to go.)
    deadline = time.monotonic() + 10
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the run still alive: {left}"
    assert not any(scratch.iterdir()), "the run's JVM did not stop in order"
    return output


def signal_once_started(
    process, saved: Path, send, *, cell: int = -1, ready=lambda: True, timeout: float = 120
) -> str:
    """Once cell ``cell`` of the notebook papermill saves at ``saved`` has started (and
    ``ready()``), ``send(process)``; the process's standard error once it has ended. Its
    process group is killed if anything fails on the way."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:  # papermill rewrites the file in place: a read may catch it half written
                cells = nbformat.read(str(saved), as_version=4).cells
            except (OSError, ValueError):  # missing, or not JSON yet
                cells = []
            started = cells and cells[cell].metadata.get("papermill", {}).get("start_time")
            if started and ready():
                break
            assert time.monotonic() < deadline and process.poll() is None, "never started"
            time.sleep(0.2)
        send(process)
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """A ``python3`` notebook at ``path``: papermill's parameters cell, then ``cells``."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
        *(nbformat.v4.new_code_cell(source) for source in cells),
    ]
    nbformat.write(notebook, str(path))
    return path
