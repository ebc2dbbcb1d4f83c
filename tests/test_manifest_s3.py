"""``imagepca run --manifest s3://.../manifest.json``: an S3 Inventory report as the input,
on the moto server.

What is real: the CLI and the three notebooks, the report's ``manifest.json`` read through
Hadoop's S3 client (S3A standing in for EMRFS, as in test_s3_end_to_end), its gzipped CSV
data file read by Spark, URL-encoded keys, the executors reading each image from S3 with
pyarrow's S3 client at the endpoint and keys of the Hadoop configuration.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import pandas as pd
import pytest

from conftest import FRUIT_PHOTOS, WEIGHTS
from moto_server import aws_env, moto_endpoint, spark_s3a_defaults  # noqa: F401

BUCKET = "imagepca-inventory-bucket"
REPORT = "inventory/imagepca-inventory-bucket/daily/2026-11-28T00-00Z"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("aws_env")
def test_run_from_an_s3_inventory_report(moto_endpoint, tmp_path):  # noqa: F811
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    objects = {}
    for label in ("apple", "banana"):
        for n, path in enumerate(sorted((FRUIT_PHOTOS / label).glob("*.jpg"))[:3]):
            # Spaces, "#" and "?": encoded in the CSV, ordinary characters of the key.
            key = f"images/{label}/{label} photo {('#', '?', '')[n]}{n}.jpg"
            s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
            objects[key] = path.stat().st_size
    # Where a URI parser would cut "apple photo #0.jpg" short: another object, not read.
    s3.put_object(Bucket=BUCKET, Key="images/apple/apple photo ", Body=b"not this one")
    s3.put_object(Bucket=BUCKET, Key="images/README.txt", Body=b"not an image")
    objects["images/README.txt"] = 12
    objects["images/banana/deleted since the report.jpg"] = 1000  # listed, not there

    schema = ["Bucket", "Key", "Size", "LastModifiedDate"]
    lines = [
        ",".join(
            f'"{value}"'
            for value in (BUCKET, quote_plus(key, safe="/"), size, "2026-11-27T23:00:00.000Z")
        )
        for key, size in objects.items()
    ]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    data_key = f"{REPORT.rsplit('/', 1)[0]}/data/0a1b2c3d.csv.gz"
    s3.put_object(Bucket=BUCKET, Key=data_key, Body=data)
    manifest = {
        "sourceBucket": BUCKET,
        "destinationBucket": f"arn:aws:s3:::{BUCKET}",
        "version": "2016-11-30",
        "creationTimestamp": "1764288000000",
        "fileFormat": "CSV",
        "fileSchema": ", ".join(schema),
        "files": [
            {"key": data_key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()}
        ],
    }
    s3.put_object(Bucket=BUCKET, Key=f"{REPORT}/manifest.json", Body=json.dumps(manifest))

    conf_dir = tmp_path / "spark-conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text(
        "".join(f"{k} {v}\n" for k, v in spark_s3a_defaults(moto_endpoint).items())
    )
    output = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable, "-m", "imagepca", "run",
            "--manifest", f"s3://{BUCKET}/{REPORT}/manifest.json",
            "--output", str(output), "--weights", str(WEIGHTS),
            "--k", "2", "--skip-classify", "--master", "local[2]",
        ],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "SPARK_CONF_DIR": str(conf_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["n_files_found"] == 7  # six photos and the deleted one; not the README
    assert metrics["n_images"] == 6 and metrics["images_per_label"] == {"apple": 3, "banana": 3}
    assert metrics["rejected_by_kind"] == {"missing": 1}
    features = pd.read_parquet(output / "features")
    assert sorted(features.path) == sorted(
        f"s3://{BUCKET}/{key}" for key in objects if key.endswith(".jpg") and "deleted" not in key
    )
    assert (features["size"] == [objects[p.split("/", 3)[3]] for p in features.path]).all()
    rejected = pd.read_parquet(output / "rejected")
    assert list(rejected.path) == [f"s3://{BUCKET}/images/banana/deleted since the report.jpg"]
    assert rejected.reason[0].startswith("missing: ")


def test_executor_reads_take_s3a_per_bucket_settings(spark, moto_endpoint, monkeypatch):  # noqa: F811
    """A bucket's ``fs.s3a.bucket.BUCKET.*`` options win over ``fs.s3a.*``, as in S3A: here
    only the bucket's own endpoint reaches the server."""
    from imagepca.executor_reads import read_files, read_options

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket, photo = "imagepca-per-bucket", sorted((FRUIT_PHOTOS / "apple").glob("*.jpg"))[0]
    s3 = boto3.client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="apple/one #1.jpg", Body=photo.read_bytes())

    closed_port = "http://127.0.0.1:9"  # discard: nothing listens there
    settings = {
        "fs.s3a.endpoint": closed_port,
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.access.key": "testing",
        "fs.s3a.secret.key": "testing",
        f"fs.s3a.bucket.{bucket}.endpoint": moto_endpoint,
        f"fs.s3a.bucket.{bucket}.endpoint.region": "us-east-1",
        f"fs.s3a.bucket.{bucket}.retry.limit": "1",  # not an option pyarrow takes
    }
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    saved = {key: conf.get(key) for key in settings}
    for key, value in settings.items():
        conf.set(key, value)
    try:
        options = read_options(spark)
    finally:
        for key, value in saved.items():
            conf.unset(key) if value is None else conf.set(key, value)

    assert options.s3("another-bucket")["endpoint_override"] == "127.0.0.1:9"
    assert options.s3(bucket) == {
        "endpoint_override": moto_endpoint.removeprefix("http://"),
        "scheme": "http",
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
    }
    # The option pyarrow does not take stays on the driver.
    assert sorted(options.s3a_per_bucket) == [f"{bucket}.endpoint", f"{bucket}.endpoint.region"]
    contents, reasons = read_files([f"s3a://{bucket}/apple/one #1.jpg"], options)
    assert reasons == [None]
    assert contents == [photo.read_bytes()]
