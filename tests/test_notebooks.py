"""The notebooks, as committed and as executed by papermill through ``imagepca run``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from conftest import OUTPUT_LAYOUT, REPO
from imagepca.cli import main

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LAYOUT = [
    *OUTPUT_LAYOUT,
    "notebooks/01_extract_features.ipynb",
    "notebooks/02_reduce_pca.ipynb",
]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean_and_parameterized(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert not any("%%configure" in c.source or "%%local" in c.source for c in code)
    # Logic lives in the lib: cells stay short.
    assert max(len(c.source.splitlines()) for c in code if c not in tagged) <= 20


def test_run_writes_the_whole_layout(sample_run):
    for name in LAYOUT:
        assert (sample_run / name).exists(), name
    assert not (sample_run / "_staging").exists()
    # Notebook 01 lists in a cell of its own and hands the listing over: its time is kept.
    timings = json.loads((sample_run / "metrics.json").read_text())["timings_s"]
    assert timings["list_s"] > 0.01


def test_executed_notebooks_ran_every_cell_with_injected_parameters(sample_run):
    for name in ("01_extract_features.ipynb", "02_reduce_pca.ipynb"):
        notebook = nbformat.read(sample_run / "notebooks" / name, as_version=4)
        assert not notebook.metadata.papermill.get("exception")
        tags = [c.metadata.get("tags", []) for c in notebook.cells]
        injected = [
            c for c, t in zip(notebook.cells, tags, strict=True) if "injected-parameters" in t
        ]
        assert len(injected) == 1
        assert f'output = "{sample_run}"' in injected[0].source
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code)
        assert not any(o.output_type == "error" for c in code for o in c.outputs)
        images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(images) == (1 if name.startswith("01") else 2)
        # %matplot shows the PNG file the run saved, not another drawing of the figure.
        saved = (
            ["samples.png"]
            if name.startswith("01")
            else ["explained_variance.png", "projection.png"]
        )
        for output, file_name in zip(images, saved, strict=True):
            assert (
                base64.b64decode(output["data"]["image/png"])
                == (sample_run / file_name).read_bytes()
            )


def test_sample_classes_separate_on_the_principal_components(sample_run):
    metrics = json.loads((sample_run / "metrics.json").read_text())
    assert metrics["n_images"] == 240 and metrics["n_rejected"] == 0 and metrics["n_classes"] == 6
    reduced = pd.read_parquet(sample_run / "reduced")
    points = np.stack(reduced["pca"].to_numpy())[:, :5]
    labels = reduced["label"].to_numpy()
    centroids = {label: points[labels == label].mean(axis=0) for label in set(labels)}
    names = sorted(centroids)
    nearest = [
        names[int(np.argmin([np.linalg.norm(p - centroids[n]) for n in names]))] for p in points
    ]
    accuracy = float(np.mean(np.array(nearest) == labels))
    assert accuracy > 0.95, f"nearest-centroid accuracy on 5 PCs: {accuracy:.3f}"


def test_failed_run_exits_non_zero_with_the_reason_last(tmp_path, capsys):
    status = main(
        [
            "run",
            "--input",
            str(tmp_path / "nothing"),
            "--output",
            str(tmp_path / "out"),
            "--master",
            "local[1]",
            "--skip-classify",
        ]
    )
    assert status != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 01_extract_features.ipynb failed")
    assert "InputError" in last and "nothing" in last
    executed = nbformat.read(tmp_path / "out" / "notebooks" / "01_extract_features.ipynb", 4)
    assert executed.metadata.papermill.exception is True
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_bad_parameters_stop_at_the_edge(tmp_path, capsys):
    status = main(["run", "--input", "in", "--output", str(tmp_path), "--variance", "1.5"])
    assert status == 2
    assert "variance must be a fraction in (0, 1]" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())


def test_stop_spark_ends_the_jvm_the_kernel_launched(tmp_path):
    """What ``imagepca run`` runs in its kernel before shutting it down: the session stops
    and the JVM this process launched has exited and been waited for (no child left for
    ipykernel's shutdown to wait on)."""
    import subprocess
    import sys

    code = (
        "import os, psutil\n"
        "from pyspark import SparkContext\n"
        "from imagepca.session import get_spark, stop_spark\n"
        "spark = get_spark('local[1]', conf={'spark.ui.enabled': 'false'})\n"
        "assert spark.range(3).count() == 3\n"
        "jvm = SparkContext._gateway.proc\n"
        "stop_spark()\n"
        "assert jvm.returncode is not None, 'JVM still running'\n"
        "assert SparkContext._gateway is None and SparkContext._active_spark_context is None\n"
        "assert not psutil.Process().children(recursive=True), 'a child process is left'\n"
        "stop_spark()  # nothing to stop: no error\n"
        "print('stopped')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("stopped")
