"""The operator policy allows what the operator's commands actually send to AWS.

The actions are not listed by hand: every request ``aws upload``, ``emr stage``, ``emr
doctor``, ``emr up``/``run``/``down`` send to the moto server is recorded and turned into IAM
actions. ``emr run`` goes all three ways: a step; notebook executions (EMR's side stubbed,
moto has none); and ``--via livy`` for real, papermill on this machine reading the staged
notebooks from S3 and writing the executed ones there, their cells in a session of the Livy
test server (:mod:`livy_server`), which writes the output as a cluster's driver would. The
requests become IAM actions (:func:`moto_server.s3_actions`,
:func:`moto_server.api_actions`), on a bucket whose default encryption is SSE-KMS, so
each write also needs ``kms:GenerateDataKey`` and each read ``kms:Decrypt`` (S3 User
Guide, "Using server-side encryption with AWS KMS keys"). The instance role's side is
checked the same way by tests/test_s3_end_to_end.py.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import boto3
import pytest
from botocore.stub import Stubber

from conftest import write_notebook
from imagepca.aws import account, commands, doctor, stage
from imagepca.aws.settings import AwsSettings, EmrSettings
from livy_server import LivyServer
from moto_server import (  # noqa: F401
    ACCOUNT_ID,
    REGION,
    api_actions,
    aws_env,
    denied,
    moto_endpoint,
    recording,
    request_tags,
    s3_actions,
    set_step_states,
)

BUCKET = "imagepca-perm-bucket"
ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def fake_wheel(project: Path, destination: Path) -> Path:
    wheel = destination / "imagepca-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK fake")
    return wheel


def fake_model(weights: Path, size: int) -> Path:
    model = weights.parent / f"model-{size}.tflite"
    model.write_bytes(b"TFL3" * 1000)
    return model


def run_job_flow_needs(requests: list[dict], settings: AwsSettings) -> set:
    """What a RunJobFlow needs besides itself: ``iam:PassRole`` for its service role and the
    instance profile's role, and ``elasticmapreduce:AddTags`` for the tags it launches with."""
    needed = set()
    for request in requests:
        if request["headers"].get("X-Amz-Target", "").endswith(".RunJobFlow"):
            body = json.loads(request["body"])
            assert body["ServiceRole"] == settings.service_role
            assert body["JobFlowRole"] == settings.instance_profile
            for role in (settings.service_role, settings.instance_role):
                needed.add(("iam:PassRole", f"arn:aws:iam::{ACCOUNT_ID}:role/{role}", None))
            needed.add(("elasticmapreduce:AddTags", "*", None, request_tags(body["Tags"])))
    return needed


def notebook_execution_needs(started: list[dict], execution_ids: list[str]) -> set:
    """What each ``StartNotebookExecution`` sent needs (Service Authorization Reference,
    the operations table): the action on its cluster, ``iam:PassRole`` for its
    ``ServiceRole``, ``elasticmapreduce:AddTags`` on the new execution for its ``Tags``;
    then ``DescribeNotebookExecution`` on it while polling."""
    emr = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT_ID}"
    needed = set()
    for body, execution in zip(started, execution_ids, strict=True):
        cluster = body["ExecutionEngine"]["Id"]
        needed.add(("elasticmapreduce:StartNotebookExecution", f"{emr}:cluster/{cluster}", None))
        role = f"arn:aws:iam::{ACCOUNT_ID}:role/{body['ServiceRole']}"
        needed.add(("iam:PassRole", role, None))
        if body.get("Tags"):
            needed.add((
                "elasticmapreduce:AddTags", f"{emr}:notebook-execution/{execution}", None,
                request_tags(body["Tags"]),
            ))  # fmt: skip
        needed.add((
            "elasticmapreduce:DescribeNotebookExecution", f"{emr}:notebook-execution/{execution}",
            None,
        ))  # fmt: skip
    return needed


@contextmanager
def stubbed_emr(started: list[dict], executions: list[str]) -> Iterator[Stubber]:
    """The commands' EMR client stubbed (moto has no notebook executions), S3 still moto's;
    each ``StartNotebookExecution`` request is kept in ``started``."""
    emr = boto3.client("emr")
    emr.meta.events.register(
        "provide-client-params.emr.StartNotebookExecution",
        lambda params, **_: started.append(dict(params)),
    )
    stub = Stubber(emr)
    for execution in executions:
        stub.add_response("start_notebook_execution", {"NotebookExecutionId": execution})
        stub.add_response(
            "describe_notebook_execution",
            {"NotebookExecution": {"NotebookExecutionId": execution, "Status": "FINISHED"}},
            {"NotebookExecutionId": execution},
        )
    real = commands._client

    def client(service: str, region: str | None):
        return emr if service == "emr" else real(service, region)

    with stub, mock.patch.object(commands, "_client", client):
        yield stub


@pytest.mark.usefixtures("aws_env")
def test_operator_policy_allows_every_request_of_the_operator_commands(
    moto_endpoint,  # noqa: F811
    tmp_path,
    capsys,
):
    key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    settings = AwsSettings(bucket=BUCKET, region=REGION, account_id=ACCOUNT_ID, kms_key_arn=key)
    account.setup(settings, out=io.StringIO())
    s3 = boto3.client("s3")
    # The TLS-only bucket policy refuses this stand-in's plain HTTP (moto enforces it).
    s3.delete_bucket_policy(Bucket=BUCKET)
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24")["Subnet"]["SubnetId"]
    photos = tmp_path / "photos"
    (photos / "apple").mkdir(parents=True)
    (photos / "apple" / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 100)
    big = photos / "apple" / "big.jpg"  # multipart: CreateMultipartUpload, UploadPart...
    big.write_bytes(b"\xff\xd8" + bytes(70 * 1024 * 1024))
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"weights")
    project = tmp_path / "project"
    shutil.copytree(ROOT / "bootstrap", project / "bootstrap")
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    emr_settings = EmrSettings.load(
        None,
        {"bucket": BUCKET, "region": REGION, "subnet_id": subnet, "artifacts_version": "0.1.0"},
    )
    common = ["--bucket", BUCKET, "--region", REGION, "--subnet-id", subnet, "--version", "0.1.0"]
    # What notebooks 01, 02 and 03 leave on a cluster, read by the notebook-execution run
    # (the stubbed executions carry no start time: the features are taken as this run's).
    for name, body in (
        ("features/_extraction.json", b'{"created_at": "2026-11-29T18:00:00+00:00"}'),
        ("metrics.json", b'{"classification": {"accuracy": 1.0}}'),
        ("_SUCCESS", b""),
    ):
        s3.put_object(Bucket=BUCKET, Key=f"runs/nb1/{name}", Body=body)
    started: list[dict] = []
    executions = ["ex-01", "ex-02", "ex-03"]
    # For `--via livy`, notebooks staged as a version of their own that write what notebooks
    # 01 and 02 leave in the output (from the Livy session, as the cluster's driver does);
    # papermill here reads them from S3 and writes the executed copies there.
    notebooks = tmp_path / "livy-notebooks"
    notebooks.mkdir()
    put = (
        "import boto3, json\nbucket, prefix = output.removeprefix('s3://').split('/', 1)\n"
        "def put(name, body):\n"
        "    boto3.client('s3').put_object(Bucket=bucket, Key=f'{prefix}/{name}', Body=body)\n"
    )
    write_notebook(
        notebooks / "01_extract_features.ipynb", "output = None",
        put + "put('features/_extraction.json', json.dumps({'created_at': 'now'}))",
    )  # fmt: skip
    metrics = {
        "n_images": 2, "n_rejected": 0, "n_classes": 1, "k": 1, "k_mode": "fixed",
        "variance_reached": 1.0, "variance_threshold": 0.95, "timings_s": {},
        "classification": {"skipped": "fewer than 2 labels"},
    }  # fmt: skip
    write_notebook(
        notebooks / "02_reduce_pca.ipynb", "output = None",
        put + f"put('metrics.json', json.dumps({metrics!r}))\nput('_SUCCESS', b'')",
    )  # fmt: skip
    for path in notebooks.iterdir():
        s3.upload_file(str(path), BUCKET, f"artifacts/0.2.0/notebooks/{path.name}")

    with (
        LivyServer(tmp_path / "livy", max_lifetime=600) as livy_server,
        recording(moto_endpoint, tmp_path / "recording.jsonl") as requests,
    ):
        assert cli("aws", "upload", str(photos), f"s3://{BUCKET}/input/photos/") == 0
        stage.stage(
            BUCKET, "0.1.0", weights, s3_client=s3, project=project,
            wheel_builder=fake_wheel, model_converter=fake_model, out=io.StringIO(),
        )  # fmt: skip
        offline = EmrSettings.load(None, {**vars(emr_settings), "offline": True})
        doctor.run_checks(offline, clients=account.client_factory(REGION), project=project)
        assert cli("emr", "up", *common, "--poll-seconds", "0.05") == 0
        cluster_id = boto3.client("emr").list_clusters()["Clusters"][0]["Id"]
        assert cli("emr", "run", *common, "--cluster-id", cluster_id, "--no-wait") == 0
        with stubbed_emr(started, executions) as stub:
            via = ["--via", "notebook-execution", "--run-id", "nb1", "--poll-seconds", "0"]
            assert cli("emr", "run", *common, "--cluster-id", cluster_id, *via) == 0
            stub.assert_no_pending_responses()
        via = ["--via", "livy", "--livy-url", livy_server.url, "--run-id", "r1"]
        assert (
            cli("emr", "run", *common, "--version", "0.2.0", "--cluster-id", cluster_id, *via) == 0
        )
        assert (
            cli("emr", "down", *common, "--cluster-id", cluster_id, "--poll-seconds", "0.05") == 0
        )
    printed = capsys.readouterr().out
    assert "classifier skipped: fewer than 2 labels" in printed  # the --via livy summary

    policy = account.render_policy("iam-operator-policy", settings, ROOT / "aws")
    needed = s3_actions(requests, BUCKET, kms_key=key) | run_job_flow_needs(requests, settings)
    assert [body["ServiceRole"] for body in started] == ["EMR_Notebooks_DefaultRole"] * 3
    needed |= notebook_execution_needs(started, executions)
    notebooks_role = f"arn:aws:iam::{ACCOUNT_ID}:role/EMR_Notebooks_DefaultRole"
    assert ("iam:PassRole", notebooks_role, None) in needed
    assert ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/runs/nb1/metrics.json", None) in needed
    extraction = f"arn:aws:s3:::{BUCKET}/runs/nb1/features/_extraction.json"
    assert ("s3:GetObject", extraction, None) in needed
    actions = api_actions(requests)
    names = {entry if isinstance(entry, str) else entry[0] for entry in actions}
    assert {"elasticmapreduce:RunJobFlow", "kms:GenerateDataKey", "ec2:DescribeVpcs"} <= names
    (launch,) = [entry for entry in actions if entry[0] == "elasticmapreduce:RunJobFlow"]
    assert ("project", "imagepca") in launch[3]  # what LaunchTaggedClusters requires
    # `--via livy`: papermill read the staged notebooks and wrote the executed ones (with
    # the ACL its S3 handler sets), and the runner read the run's metrics.
    livy_run = {
        ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/artifacts/0.2.0/notebooks/{name}", None)
        for name in ("01_extract_features.ipynb", "02_reduce_pca.ipynb")
    } | {
        ("s3:PutObjectAcl", f"arn:aws:s3:::{BUCKET}/runs/r1/notebooks/01_extract_features.ipynb",
         None),
        ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/runs/r1/metrics.json", None),
    }  # fmt: skip
    assert livy_run <= needed
    assert ("kms:GenerateDataKey", key, None) in needed
    assert denied(policy, needed | actions) == []

    # The check can fail: without the statements issue 14 added, it names what is missing.
    before = {
        "Statement": [
            s for s in policy["Statement"]
            if s["Sid"] not in ("WriteExecutedNotebooksWithAcl", "UseProjectKmsKey")
        ]
    }  # fmt: skip
    missing = {entry[0] for entry in denied(before, needed)}
    assert {"s3:PutObjectAcl", "kms:GenerateDataKey", "kms:Decrypt"} <= missing
    # ... and without the notebooks role in PassRole or the notebook-execution tagging.
    without_notebooks = json.loads(
        json.dumps(policy).replace(f'"{notebooks_role}"', '"arn:aws:iam::0:role/none"')
    )
    without_notebooks["Statement"] = [
        s for s in without_notebooks["Statement"] if s["Sid"] != "TagNotebookExecutionsAtStart"
    ]
    missing = {entry[:2] for entry in denied(without_notebooks, needed)}
    assert ("iam:PassRole", notebooks_role) in missing
    execution = f"arn:aws:elasticmapreduce:{REGION}:{ACCOUNT_ID}:notebook-execution/ex-01"
    assert ("elasticmapreduce:AddTags", execution) in missing
    # ... and a launch or a tagging with another project tag is denied, as IAM would.
    elsewhere = {
        (entry[0], entry[1], entry[2], request_tags([
            {"Key": k, "Value": "someone-else" if k == "project" else v} for k, v in entry[3]
        ]))
        for entry in needed | actions
        if isinstance(entry, tuple) and len(entry) == 4
    }  # fmt: skip
    assert {entry[0] for entry in elsewhere} == {
        "elasticmapreduce:RunJobFlow", "elasticmapreduce:AddTags"
    }  # fmt: skip
    assert sorted(denied(policy, elsewhere)) == sorted(elsewhere)


def test_policy_check_reads_requests_as_iam_does():
    """The request-to-action mapping on hand-made requests (one per rule)."""
    put = {
        "method": "PUT",
        "url": "/b/runs/x.ipynb",
        "headers": {"x-amz-acl": "bucket-owner-full-control"},
    }
    copy = {
        "method": "PUT",
        "url": "/b/runs/y",
        "headers": {"x-amz-copy-source": "/b/runs/_staging/y"},
    }
    listing = {"method": "GET", "url": "/b?list-type=2&prefix=input/", "headers": {}}
    delete = {"method": "POST", "url": "/b?delete", "headers": {},
              "body": "<Delete><Object><Key>runs/a&amp;b</Key></Object></Delete>"}  # fmt: skip
    needed = s3_actions([put, copy, listing, delete], "b", kms_key="k")
    assert needed == {
        ("s3:PutObject", "arn:aws:s3:::b/runs/x.ipynb", None),
        ("s3:PutObjectAcl", "arn:aws:s3:::b/runs/x.ipynb", None),
        ("kms:GenerateDataKey", "k", None),
        ("s3:PutObject", "arn:aws:s3:::b/runs/y", None),
        ("s3:GetObject", "arn:aws:s3:::b/runs/_staging/y", None),
        ("s3:ListBucket", "arn:aws:s3:::b", "input/"),
        ("s3:DeleteObject", "arn:aws:s3:::b/runs/a&b", None),
    }
