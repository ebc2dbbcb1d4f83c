"""The notebooks run by papermill's own command line, as its users run them, give what
``imagepca run`` gives on the same input.

The README's form: ``papermill notebooks/01_extract_features.ipynb out.ipynb -p input ...
-p output ...``, then 02 and 03, from the project's venv, with paths relative to the current
folder and the default weights (``imagenet``: the Keras cache, seeded by conftest).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

BIN = Path(sys.executable).parent  # the venv running the tests (.venv/bin under make test)
NOTEBOOKS = ("01_extract_features.ipynb", "02_reduce_pca.ipynb", "03_classify.ipynb")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same small sample through ``imagepca run --quiet`` and through papermill's CLI."""
    work = tmp_path_factory.mktemp("papermill_cli")
    subprocess.run(
        [BIN / "imagepca", "sample", "sample", "--classes", "3", "--per-class", "8"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    cli = subprocess.run(
        [BIN / "imagepca", "run", "--quiet", "--input", "sample", "--output", "by-cli"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    (work / "executed").mkdir()
    for name in NOTEBOOKS:
        parameters = ["-p", "output", "by-papermill"]
        if name.startswith("01"):
            parameters = ["-p", "input", "sample", *parameters]
        result = subprocess.run(
            [
                BIN / "papermill",
                REPO / "notebooks" / name,
                f"executed/{name}",
                *parameters,
            ],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return work, cli


def _files(root: Path) -> set[str]:
    """The run's datasets, models, plots and markers (imagepca run also keeps its executed
    notebooks and its log)."""
    return {p.name for p in root.iterdir()} - {"notebooks", "logs"}


def test_quiet_run_prints_only_the_summary(runs):
    _, cli = runs
    assert cli.stderr == ""
    lines = cli.stdout.splitlines()
    assert lines[0].startswith("images: 24 in features/, 0 rejected, 3 classes")
    assert lines[-2].startswith("log: ") and lines[-1].startswith("done in ")


def test_papermill_cli_writes_what_imagepca_run_writes(runs):
    work, _ = runs
    by_cli, by_papermill = work / "by-cli", work / "by-papermill"
    assert _files(by_papermill) == _files(by_cli)
    for name in NOTEBOOKS:
        assert (work / "executed" / name).is_file()

    cli, pm = (json.loads((root / "metrics.json").read_text()) for root in (by_cli, by_papermill))
    for key in ("n_files_found", "n_images", "n_rejected", "n_classes", "k", "images_per_label"):
        assert pm[key] == cli[key], key
    assert pm["variance_reached"] == pytest.approx(cli["variance_reached"], abs=1e-6)
    assert pm["explained_variance"] == pytest.approx(cli["explained_variance"], abs=1e-6)
    for key in ("accuracy", "f1_macro", "confusion_matrix", "n_train", "n_test", "k"):
        assert pm["classification"]["reduced"][key] == cli["classification"]["reduced"][key], key

    def features(root: Path) -> pd.DataFrame:
        return pd.read_parquet(root / "features").sort_values("path").reset_index(drop=True)

    a, b = features(by_cli), features(by_papermill)
    assert list(a["path"]) == list(b["path"]) and list(a["label"]) == list(b["label"])
    np.testing.assert_allclose(np.stack(a["features"]), np.stack(b["features"]), atol=1e-5)
