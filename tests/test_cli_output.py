"""What a person sees while a run works: a line per notebook, the kernel's progress line and
warnings, and none of Spark's, TensorFlow's or the kernel's log noise, which goes to the
run's log file instead.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings

import nbformat
import pytest

from conftest import REPO, WEIGHTS
from imagepca import runner
from imagepca.console import NORMAL, VERBOSE, Console, log_path, upload_log

NOISE = re.compile(r"NativeCodeLoader|WARN |without encryption|XNNPACK|absl|Stage \d+:")

# A stand-in notebook that does what notebook 01 does to the terminal: a tracked Spark job,
# a warning, and plenty of library output. It writes the metrics.json the runner reads.
CELLS = [
    """
import json, os, sys, time
os.environ["PYSPARK_PYTHON"] = sys.executable
import pandas as pd
from pyspark.sql import SparkSession, functions as F
from pyspark.sql.functions import pandas_udf
from imagepca import progress
from imagepca.sample import write_sample
""",
    "output = 'out'\nimages = 'images'",
    """
write_sample(images, classes=2, per_class=6)
spark = (
    SparkSession.builder.master("local[2]")
    .config("spark.ui.enabled", "false")
    .config("spark.sql.files.maxPartitionBytes", "8k")
    .config("spark.sql.files.openCostInBytes", "1")
    .getOrCreate()
)
print("a cell's own chatter")
print("WARNING: a library's log line, not ours", file=sys.stderr)
""",
    """
@pandas_udf("long")
def slow(content: pd.Series) -> pd.Series:
    time.sleep(0.4 * len(content))
    return content.str.len()

df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(images)
with progress.track(spark, "featurize", total=12, interval=1.0):
    df.select(slow("content").alias("n")).where("n > 0").count()
print("warning: 1 image file rejected (test)", file=sys.stderr)
""",
    """
os.makedirs(output, exist_ok=True)
with open(os.path.join(output, "metrics.json"), "w") as f:
    json.dump({"ok": True}, f)
spark.stop()
""",
]

DURATION = r"(?:\d+ min )?\d+ s"  # format_duration: "48 s", "3 min 20 s"


def _stand_in(folder, name="progress.ipynb"):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source.strip()) for source in CELLS]
    notebook.cells[1].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python"}
    nbformat.write(notebook, folder / name)
    return name


@pytest.mark.parametrize("mode", [NORMAL, VERBOSE])
def test_runner_console_shows_notebooks_progress_and_warnings_only(tmp_path, mode):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    name = _stand_in(notebooks)
    output = tmp_path / "out"
    terminal = io.StringIO()
    runs = [runner.NotebookRun(name, {"output": str(output), "images": str(tmp_path / "images")})]
    with Console(mode, stream=terminal, log=log_path(str(output))) as console:
        console.NON_TTY_PROGRESS_S = 0.0  # every refresh, to see several
        metrics = runner.run_notebooks(runs, str(output), notebooks=str(notebooks), console=console)
    assert metrics == {"ok": True}
    shown = terminal.getvalue()
    lines = shown.splitlines()
    assert lines[0] == f"[1/1] {name} ..."
    assert re.fullmatch(rf"\[1/1\] {name} done in \d+\.\d s", lines[-1])
    progress = [line for line in lines if line.startswith("featurize: ")]
    assert any(re.match(r"featurize: \d+/12 images", line) for line in progress), shown
    assert re.fullmatch(rf"featurize: 12 images in {DURATION}, \d+\.\d images/s", progress[-1])
    assert "warning: 1 image file rejected (test)" in lines
    log = (output / "logs" / "run.log").read_text()
    assert "a cell's own chatter" in log and "WARNING: a library's log line" in log
    if mode == NORMAL:
        assert "chatter" not in shown and "a library's log line" not in shown
        assert not NOISE.search(shown), shown
    else:
        assert "a cell's own chatter" in shown and "a library's log line" in shown


def test_imagepca_run_shows_notebook_lines_and_keeps_noise_in_the_log(tmp_path):
    """The real command, as a person runs it: a subprocess on a small generated sample."""
    sample = tmp_path / "sample"
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    subprocess.run(
        [python, "-m", "imagepca", "sample", str(sample), "--classes", "3", "--per-class", "8"],
        check=True,
        capture_output=True,
    )
    output = tmp_path / "out"
    result = subprocess.run(
        [
            python,
            "-m",
            "imagepca",
            "run",
            "--input",
            str(sample),
            "--output",
            str(output),
            "--weights",
            str(WEIGHTS),
            "--master",
            "local[2]",
            "--skip-classify",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr.splitlines()
    assert re.fullmatch(r"\[1/2\] 01_extract_features\.ipynb \.\.\.", err[0]), err
    first_done = r"\[1/2\] 01_extract_features\.ipynb done in \d+\.\d s"
    assert any(re.fullmatch(first_done, line) for line in err), err
    assert re.fullmatch(r"\[2/2\] 02_reduce_pca\.ipynb done in \d+\.\d s", err[-1]), err
    featurized = rf"featurize: 24 images in {DURATION}, \d+\.\d images/s"
    assert any(re.fullmatch(featurized, line) for line in err), err
    assert not NOISE.search(result.stderr + result.stdout), result.stderr
    log = output / "logs" / "run.log"
    assert f"log: {log}" in result.stdout.splitlines()
    assert NOISE.search(log.read_text()), "the kernel's logs are kept in the log file"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["n_images"] == 24


def test_the_log_is_copied_without_papermill_warning_of_its_name(tmp_path):
    """papermill's writer warns of any file but .ipynb and .json; the run's log is copied
    through it (to an s3:// output) without that warning on the user's terminal."""
    log = tmp_path / "run.log"
    log.write_text("[imagepca] the run's log\n")
    destination = tmp_path / "out" / "logs" / "run.log"
    destination.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upload_log(log, str(destination)) == str(destination)
    assert destination.read_text() == "[imagepca] the run's log\n"
