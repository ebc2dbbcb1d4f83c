"""Shared test fixtures: one local SparkSession, the shared weights and images, and runs
of the pipeline that several test modules inspect (each made once per test session).

The shared assets live in ``../shared`` beside the checkout (``IMAGEPCA_SHARED`` overrides)
and are read in place, never copied into the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEPCA_SHARED", REPO.parent / "shared")).resolve()
WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
FRUIT_PHOTOS = SHARED / "datasets" / "fruit-photos"
# What a local `imagepca run` starts: its kernel and the JVM the kernel launches.
RUN_PROCESSES = ("ipykernel_launcher", "org.apache.spark.deploy.SparkSubmit")
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
    file), a per-session model cache, Spark on loopback, one Python for driver and workers."""
    keras_home = tmp_path_factory.mktemp("keras_home")
    (keras_home / "models").mkdir()
    (keras_home / "models" / WEIGHTS.name).symlink_to(WEIGHTS)
    settings = {
        "KERAS_HOME": str(keras_home),
        "IMAGEPCA_CACHE": str(tmp_path_factory.mktemp("imagepca_cache")),
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


def run_processes() -> dict[int, str]:
    """Kernels and Spark JVMs alive on this machine, by process id (with their commands)."""
    found = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if any(part in line for part in RUN_PROCESSES):
            found[process.info["pid"]] = line[:200]
    return found


def spark_scratch_dirs() -> set[Path]:
    """Spark's scratch directories (``spark.local.dir``: Java's temporary folder, ``/tmp`` on
    Linux, unless set): a JVM removes its own when it stops."""
    return set(Path("/tmp").glob("spark-*"))


@pytest.fixture(scope="session")
def sample_run(sample_dir, tmp_path_factory, test_environment):
    """``imagepca run`` on the sample: every notebook executed by papermill (python3 kernel)."""
    from imagepca.cli import main

    output = tmp_path_factory.mktemp("sample_run") / "out"
    processes, scratch = run_processes(), spark_scratch_dirs()
    status = main(
        ["run", "--input", str(sample_dir), "--output", str(output), "--master", "local[2]"]
    )
    assert status == 0
    # The kernel is killed once its Spark has stopped: no process of the run is left, and
    # the JVM stopped in order first (a JVM killed with its kernel leaves its scratch
    # directories behind).
    left = {pid: line for pid, line in run_processes().items() if pid not in processes}
    assert not left, f"processes of the run still alive: {left}"
    assert not spark_scratch_dirs() - scratch, "the run's JVM did not stop in order"
    return output
