"""Issue 9, "Real cluster": the pipeline on separate executor JVMs, the library shipped as a zip.

Local mode runs executors' Python workers next to the driver, where the editable install
is importable, so it cannot catch what breaks on EMR: closures that do not pickle, modules
missing from the shipped library, state that only exists on the driver. Here the features
and the PCA are computed on ``local-cluster[2,1,1024]`` (two executor JVMs) by a driver
subprocess whose interpreter cannot import ``imagepca`` except from the zip given to
``SparkContext.addPyFile``, and the result must equal the local-mode run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster import (
    base_conf,
    clean_python,
    local_cluster_master,
    run_driver,
    ship_lib,
    write_driver,
)
from conftest import FRUIT360, FRUIT_PHOTOS, WEIGHTS

PHOTOS_PER_CLASS = 12
FRUIT360_CLASSES = ("Apple Braeburn", "Apple Golden 1", "Apricot")
FRUIT360_PER_CLASS = 20


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """36 real photos (3 classes) + 60 Fruits-360 images (3 classes, names with spaces)."""
    root = tmp_path_factory.mktemp("cluster_subset") / "input"
    for label in ("apple", "banana", "orange"):
        (root / label).mkdir(parents=True)
        for path in sorted((FRUIT_PHOTOS / label).iterdir())[:PHOTOS_PER_CLASS]:
            shutil.copy(path, root / label / path.name)
    for label in FRUIT360_CLASSES:
        (root / label).mkdir(parents=True)
        for path in sorted((FRUIT360 / label).iterdir())[:FRUIT360_PER_CLASS]:
            shutil.copy(path, root / label / path.name)
    return root


def read_features(output: str | Path) -> pd.DataFrame:
    frame = pd.read_parquet(Path(output) / "features").sort_values("path")
    return frame.reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(spark, subset, tmp_path_factory):
    """The subset through both stages in local mode (this process) and on
    ``local-cluster[2,1,1024]`` (a driver subprocess importing the shipped zip only)."""
    from imagepca.config import ExtractParams, ReduceParams
    from imagepca.pipeline import extract_features, finish_run, reduce_features

    tmp_path = tmp_path_factory.mktemp("cluster_runs")
    local_out = tmp_path / "local"
    local = extract_features(
        spark, ExtractParams(input=str(subset), output=str(local_out), weights=str(WEIGHTS))
    )
    local_reduction = reduce_features(spark, ReduceParams(output=str(local_out), variance=0.9))
    finish_run(spark, str(local_out), local_reduction.metrics)

    work = tmp_path / "driver"  # cwd of the driver: no imagepca/ or lib/ here
    work.mkdir()
    python = clean_python(tmp_path)
    not_installed = subprocess.run(
        [str(python), "-c", "import imagepca.pipeline"], cwd=work, capture_output=True, text=True
    )
    archive = ship_lib(work)
    cluster_out = tmp_path / "cluster"
    run = run_driver(
        write_driver(work),
        {
            "master": local_cluster_master(2, 1, 1024),
            "conf": base_conf(),
            "executors": 2,
            "pyfile": str(archive),
            "extract": {"input": str(subset), "output": str(cluster_out), "weights": str(WEIGHTS)},
            "reduce": {"output": str(cluster_out), "variance": 0.9},
            "result": str(work / "result.json"),
        },
        python=python,
        cwd=work,
        timeout_s=400,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    print(f"cluster driver: {run.seconds:.1f} s, pipeline {run.result['elapsed_s']} s")
    return {
        "local_out": local_out,
        "local": local,
        "local_reduction": local_reduction,
        "cluster_out": cluster_out,
        "result": run.result,
        "python": python,
        "not_installed": not_installed,
    }


@pytest.mark.cluster
def test_executors_import_the_shipped_zip_only(runs):
    """Two executor JVMs, the clean interpreter, imagepca from the zip given to addPyFile."""
    assert runs["not_installed"].returncode != 0, "the clean interpreter sees the editable copy"
    result = runs["result"]
    assert result["executors_at_start"] == 2
    assert "imagepca.zip" in result["driver_imagepca"]
    origins = {file for file, *_ in result["executor_imports"]}
    # Executors run in their work dir, where addPyFile put the zip: "./imagepca.zip/...".
    assert origins and all(
        file.endswith("imagepca.zip/imagepca/__init__.py") for file in origins
    ), origins
    assert {exe for _, exe, *_ in result["executor_imports"]} == {str(runs["python"])}
    editable = str(Path(__file__).resolve().parents[1] / "lib")
    assert all(editable not in path for *_, path in result["executor_imports"])


@pytest.mark.cluster
def test_cluster_features_equal_local_features(runs):
    """Same rows, labels and features (within 1e-4) as the local-mode run."""
    result, local = runs["result"], runs["local"]
    assert result["extraction"]["n_images"] == local.n_images == 96
    assert result["extraction"]["n_rejected"] == local.n_rejected == 0
    local_features, cluster_features = (
        read_features(runs["local_out"]),
        read_features(runs["cluster_out"]),
    )
    assert list(cluster_features["path"]) == list(local_features["path"])
    assert list(cluster_features["label"]) == list(local_features["label"])
    np.testing.assert_allclose(
        np.stack(cluster_features["features"]), np.stack(local_features["features"]), atol=1e-4
    )
    cluster_out = runs["cluster_out"]
    assert (cluster_out / "_SUCCESS").exists() and (cluster_out / "metrics.json").exists()
    reduced = pd.read_parquet(cluster_out / "reduced")
    assert len(reduced) == 96 and {len(v) for v in reduced["pca"]} == {result["reduction"]["k"]}


def reference_explained_variance(features: pd.DataFrame) -> np.ndarray:
    """StandardScaler (sample std) + PCA explained-variance ratios computed with numpy."""
    x = np.stack(features["features"]).astype(np.float64)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    eigenvalues = np.linalg.eigvalsh(np.cov(z, rowvar=False))[::-1]
    return eigenvalues / eigenvalues.sum()


@pytest.mark.cluster
def test_cluster_pca_equals_local_pca(runs):
    """Same k and explained variance (within 1e-6) in both runs, and both equal to numpy's."""
    result, local_fit = runs["result"], runs["local_reduction"].fit
    reference = reference_explained_variance(read_features(runs["local_out"]))
    n = len(local_fit.explained_variance)
    np.testing.assert_allclose(local_fit.explained_variance, reference[:n], atol=1e-6)
    np.testing.assert_allclose(result["reduction"]["explained_variance"], reference[:n], atol=1e-6)
    assert result["reduction"]["k"] == local_fit.k
