"""The whole run on S3, here: ``imagepca run --input s3://... --output s3://...`` against the
moto server, as the EMR step runs it on the primary node.

What is real: the CLI, papermill reading the notebooks from S3 and writing the executed
ones back (boto3, with papermill's ACL), the notebooks in a python3 kernel, Spark listing
and reading the images and writing Parquet through Hadoop's S3 client, the staged
publish and ``_SUCCESS`` through Hadoop's FileSystem API, the weights and the staged
TFLite model fetched from S3. The stand-in: S3A (Apache's hadoop-aws, fetched from PyPI by
:func:`moto_server.s3a_jars`) with ``fs.s3.impl`` = S3A, where EMR uses EMRFS for
``s3://``; and moto for S3. Every request the run sends is recorded, and the instance
role's policy must allow each.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import FRUIT_PHOTOS, WEIGHTS
from imagepca.aws import account, stage
from imagepca.aws.settings import AwsSettings
from moto_server import (  # noqa: F401
    ACCOUNT_ID,
    REGION,
    aws_env,
    denied,
    moto_endpoint,
    recording,
    s3_actions,
    spark_s3a_defaults,
)

BUCKET = "imagepca-e2e-bucket"
ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 4


def fake_wheel(project: Path, destination: Path) -> Path:
    wheel = destination / "imagepca-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK not used by this test")
    return wheel


def run_imagepca(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagepca", "run", *args],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.usefixtures("aws_env")
def test_run_reads_and_writes_s3_end_to_end(moto_endpoint, tmp_path):  # noqa: F811
    settings = AwsSettings(bucket=BUCKET, region=REGION, account_id=ACCOUNT_ID)
    s3 = boto3.client("s3")
    # The bucket without `aws setup`'s TLS-only policy: moto enforces it, and this
    # stand-in speaks plain HTTP (test_aws_setup checks that the policy refuses it).
    s3.create_bucket(Bucket=BUCKET)
    photos = tmp_path / "photos"
    for label in ("apple", "banana", "orange"):
        (photos / label).mkdir(parents=True)
        for path in sorted((FRUIT_PHOTOS / label).glob("*.jpg"))[:PER_CLASS]:
            (photos / label / path.name).symlink_to(path)
    # Straight under input/: `emr run`'s default input, whose listing starts with HEAD /input
    # (which the instance role must allow, below).
    stage.upload(photos, f"s3://{BUCKET}/input/", s3_client=s3, out=io.StringIO())
    uris = stage.stage(
        BUCKET, "0.1.0", WEIGHTS, s3_client=s3, wheel_builder=fake_wheel, out=io.StringIO()
    )

    conf_dir = tmp_path / "spark-conf"
    conf_dir.mkdir()
    defaults = spark_s3a_defaults(moto_endpoint)
    (conf_dir / "spark-defaults.conf").write_text(
        "".join(f"{key} {value}\n" for key, value in defaults.items())
    )
    env = {
        **os.environ,
        "SPARK_CONF_DIR": str(conf_dir),
        # A fresh cache: the node has no converted model, so it must fetch the staged one.
        "IMAGEPCA_CACHE": str(tmp_path / "node-cache"),
        "KERAS_HOME": str(tmp_path / "empty-keras-home"),
    }
    output = f"s3://{BUCKET}/runs/r1"
    args = [
        "--input", f"s3://{BUCKET}/input/", "--output", output,
        "--weights", uris["weights"], "--notebooks", uris["notebooks"],
        "--k", "3", "--skip-classify", "--master", "local[2]",
    ]  # fmt: skip
    started = time.perf_counter()
    with recording(moto_endpoint, tmp_path / "recording.jsonl") as requests:
        first = run_imagepca(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    print(f"first run {time.perf_counter() - started:.1f} s, {len(requests)} requests")

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/r1/")["Contents"]}
    top = {key.split("/")[2] for key in keys}
    assert {"features", "reduced", "pca_model", "rejected", "metrics.json", "_SUCCESS",
            "notebooks", "explained_variance.png", "projection.png"} <= top  # fmt: skip
    assert "_staging" not in top
    # The run's log, written locally while it runs, is copied beside the outputs.
    log = s3.get_object(Bucket=BUCKET, Key="runs/r1/logs/run.log")["Body"].read().decode()
    assert "[imagepca] [1/2] 01_extract_features.ipynb" in log
    assert "(copied to s3://" in first.stdout
    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/r1/metrics.json")["Body"].read())
    assert metrics["n_images"] == 3 * PER_CLASS and metrics["k"] == 3
    executed = json.loads(
        s3.get_object(Bucket=BUCKET, Key="runs/r1/notebooks/02_reduce_pca.ipynb")["Body"].read()
    )
    assert not executed["metadata"]["papermill"].get("exception")
    parts = sorted(k for k in keys if k.startswith("runs/r1/reduced/") and k.endswith(".parquet"))
    reduced = pd.concat(
        pd.read_parquet(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
        for k in parts
    )
    assert len(reduced) == 3 * PER_CLASS and all(len(v) == 3 for v in reduced["pca"])
    assert reduced["path"].str.startswith(f"s3://{BUCKET}/input/").all()
    # In a bucket, Spark's executors write reduced/, not the driver (imagepca.
    # driver_projection): its lists are the two-level ones of Spark's writer.
    part = pq.ParquetFile(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=parts[0])["Body"].read()))
    assert [column.path for column in part.schema] == ["path", "label", "pca.array"]

    # The driver took the TFLite model staged beside the weights instead of converting.
    model_reads = [
        r for r in requests
        if r["method"] == "GET" and "/models/tflite/" in r["url"] and r["url"].endswith(".tflite")
    ]  # fmt: skip
    assert model_reads, "the staged TFLite model was not fetched"
    # papermill's S3 writes carry an ACL: the permission row 1 of issue 14 is about.
    assert any(
        r["method"] == "PUT" and "/notebooks/" in r["url"] and "x-amz-acl" in
        {h.lower() for h in r["headers"]} for r in requests
    )  # fmt: skip

    # Every request of the run, as the EMR step would send it with the instance profile.
    needed = s3_actions(requests, BUCKET)
    policy = account.render_policy("emr-instance-role-policy", settings, ROOT / "aws")
    assert denied(policy, needed) == []

    # A rerun into the same output replaces it cleanly. Its weights are local: the input's
    # listing is the first to open the bucket, whose file system then writes the figures.
    k_at = args.index("--k") + 1
    # It classifies too: notebook 03's figures, model and metrics into the bucket.
    rerun = [*args[:k_at], "2", *args[k_at + 1 :]]
    rerun[rerun.index("--weights") + 1] = str(WEIGHTS)
    rerun.remove("--skip-classify")
    with recording(moto_endpoint, tmp_path / "rerun.jsonl") as requests:
        second = run_imagepca(rerun, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert denied(policy, s3_actions(requests, BUCKET)) == []  # notebook 03's requests too
    # Notebook 03's driver read the features it compares with itself (pyarrow's S3 client),
    # not through Spark, with the endpoint and keys of Hadoop's fs.s3a settings.
    feature_reads = {
        str({k.lower(): v for k, v in r["headers"].items()}.get("user-agent"))[:40]
        for r in requests
        if r["method"] == "GET" and "/runs/r1/features/" in r["url"] and ".parquet" in r["url"]
    }
    assert any("aws-sdk-cpp" in agent for agent in feature_reads), feature_reads
    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/r1/metrics.json")["Body"].read())
    assert metrics["k"] == 2 and metrics["classification"]["reduced"]["n_test"] == 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/r1/")["Contents"]}
    for name in ("classifier_model/metadata/part-00000", "confusion_matrix.png", "k_sweep.png"):
        assert f"runs/r1/{name}" in keys
    executed = s3.get_object(Bucket=BUCKET, Key="runs/r1/notebooks/01_extract_features.ipynb")
    assert "could not be read" not in executed["Body"].read().decode()  # the samples drawn
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/r1/")["Contents"]}
    assert not any("/_staging/" in key for key in keys)


@pytest.mark.usefixtures("aws_env")
def test_an_output_in_a_bucket_that_does_not_exist_is_refused_before_the_run(capsys):
    """papermill would find it only at its first write, after the kernel's start, and the
    error would name a partial notebook that could not be written there."""
    from imagepca.cli import main

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    run = ["run", "--input", f"s3://{BUCKET}/input/", "--weights", str(WEIGHTS), "--k", "2"]
    assert main([*run, "--output", "s3a://no-such-bucket/runs/r1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --output s3a://no-such-bucket/runs/r1: S3 bucket 'no-such-bucket' does not "
        "exist; create it (aws s3 mb s3://no-such-bucket) or choose an output in a bucket of yours"
    )
