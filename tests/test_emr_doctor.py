"""`imagepca emr doctor` against the moto server: each finding, and its fix, on an account
set up the way a new one is (bucket with a KMS key, roles, a subnet, staged artifacts)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from imagepca.aws import account, cluster, commands, doctor, stage
from imagepca.aws.settings import EMR_TAG, AwsSettings, EmrSettings
from moto_server import ACCOUNT_ID, REGION, aws_env, moto_endpoint, stubbed  # noqa: F401

BUCKET = "imagepca-doctor-bucket"
ROOT = Path(__file__).resolve().parents[1]
TAG = {"Key": EMR_TAG, "Value": "true"}


def fake_wheel(project: Path, destination: Path) -> Path:
    wheel = destination / "imagepca-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK fake")
    return wheel


def fake_model(weights: Path, size: int) -> Path:
    model = weights.parent / f"model-{size}.tflite"
    model.write_bytes(b"TFL3")
    return model


@pytest.fixture
def new_account(aws_env, tmp_path):  # noqa: F811
    """`aws setup --kms-key`, a VPC and subnet, artifacts staged from a project copy."""
    key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    account.setup(
        AwsSettings(bucket=BUCKET, region=REGION, account_id=ACCOUNT_ID, kms_key_arn=key),
        out=io.StringIO(),
    )
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    ec2.create_tags(Resources=[subnet], Tags=[TAG])  # the subnet only, as the old docs said
    group = ec2.create_security_group(
        GroupName="ElasticMapReduce-Master-Private", Description="left by an earlier cluster",
        VpcId=vpc,
    )["GroupId"]  # fmt: skip
    project = tmp_path / "project"
    shutil.copytree(ROOT / "bootstrap", project / "bootstrap")
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"weights")
    # The TLS-only bucket policy refuses this stand-in's plain HTTP (moto enforces it).
    boto3.client("s3").delete_bucket_policy(Bucket=BUCKET)
    stage.stage(
        BUCKET, "0.1.0", weights, s3_client=boto3.client("s3"), project=project,
        wheel_builder=fake_wheel, model_converter=fake_model, out=io.StringIO(),
    )  # fmt: skip
    settings = EmrSettings.load(
        None,
        {"bucket": BUCKET, "region": REGION, "subnet_id": subnet, "artifacts_version": "0.1.0"},
    )
    return {"key": key, "vpc": vpc, "subnet": subnet, "group": group, "project": project,
            "settings": settings}  # fmt: skip


def check(new_account, **changes) -> dict[str, doctor.Finding]:
    settings = EmrSettings.load(None, {**vars(new_account["settings"]), **changes})
    findings = doctor.run_checks(
        settings, clients=account.client_factory(REGION), project=new_account["project"]
    )
    return {f.check: f for f in findings}


def test_doctor_reports_each_problem_with_its_fix(new_account):
    found = check(new_account)
    assert found["bucket"].level == "ok"
    assert found["KMS key"].level == "ok"  # GenerateDataKey + Decrypt with the caller's creds
    assert found["service role"].level == "ok" and found["instance profile"].level == "ok"
    assert found["subnet tag"].level == "ok"
    # Row 4: AmazonEMRServicePolicy_v2 needs the VPC and old ElasticMapReduce-* groups tagged.
    assert found["VPC tag"].level == "fail" and new_account["vpc"] in found["VPC tag"].fix
    assert found["security group tag"].level == "fail"
    assert new_account["group"] in found["security group tag"].fix
    assert found["artifacts"].level == "ok"
    assert found["security configuration"].level == "ok"

    ec2 = boto3.client("ec2")
    ec2.create_tags(Resources=[new_account["vpc"], new_account["group"]], Tags=[TAG])
    found = check(new_account)
    assert all(f.level != "fail" for f in found.values()), found

    # A named security configuration that does not exist (row 13).
    found = check(new_account, security_configuration="imagepca-security")
    assert found["security configuration"].level == "fail"
    assert "security-config" in found["security configuration"].fix

    # Artifacts staged from another checkout: an edited pin is caught by content (row 14).
    requirements = new_account["project"] / "bootstrap" / "requirements-emr.txt"
    requirements.write_text(requirements.read_text().replace("pandas==2.3.3", "pandas==2.3.2"))
    found = check(new_account)
    assert (
        found["artifacts"].level == "fail" and "requirements-emr.txt" in found["artifacts"].detail
    )
    assert found["artifacts"].fix == "imagepca emr stage --version 0.1.0"

    # A disabled key stops uploads and staging: reported before any cluster (row 3).
    boto3.client("kms").disable_key(KeyId=new_account["key"].rsplit("/", 1)[1])
    assert check(new_account)["KMS key"].level == "fail"


def test_doctor_on_a_missing_bucket_and_subnet(aws_env):  # noqa: F811
    settings = EmrSettings.load(
        None, {"bucket": "nobody-made-this", "region": REGION, "subnet_id": "subnet-0abc12345"}
    )
    found = doctor.run_checks(settings, clients=account.client_factory(REGION))
    by_check = {f.check: f for f in found}
    assert by_check["bucket"].level == "fail" and "aws setup" in by_check["bucket"].fix
    assert by_check["subnet"].level == "fail"
    assert by_check["service role"].level == "fail"
    assert "artifacts" not in by_check  # not checked without a bucket


def test_doctor_command_exit_status(new_account, capsys):
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    argv = [
        "emr", "doctor", "--bucket", BUCKET, "--region", REGION,
        "--subnet-id", new_account["subnet"], "--version", "0.1.0",
    ]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 1  # the VPC is not tagged
    out = capsys.readouterr().out
    assert "[FAIL] VPC tag" in out and "fix: aws ec2 create-tags" in out
    assert "checks," in out.splitlines()[-1]


def test_offline_wheels_are_for_every_nodes_architecture(new_account, tmp_path, capsys):
    """``"offline": true`` installs from the staged wheels alone: a Graviton node given
    x86_64 wheels fails its bootstrap ten minutes into ``emr up``. Doctor and ``emr up``
    say so before any cluster exists."""
    assert "offline wheels" not in check(new_account)  # installs from PyPI: nothing to check
    found = check(new_account, offline=True)["offline wheels"]
    assert found.level == "fail" and "holds no platform wheels" in found.detail

    wheelhouse = tmp_path / "wheelhouse"  # what `emr wheelhouse --arch x86_64` leaves, in short
    wheelhouse.mkdir()
    for name in (
        "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "six-1.17.0-py2.py3-none-any.whl",
    ):
        (wheelhouse / name).write_bytes(b"PK fake")
    stage.stage(
        BUCKET, "0.1.0", tmp_path / "weights.h5", s3_client=boto3.client("s3"),
        project=new_account["project"], wheel_builder=fake_wheel, model_converter=fake_model,
        wheelhouse=wheelhouse, out=io.StringIO(),
    )  # fmt: skip
    found = check(new_account, offline=True)["offline wheels"]
    assert (found.level, found.detail) == ("ok", "x86_64 wheels for ['m5.2xlarge', 'm5.xlarge']")
    # EC2 lists i386 first for some types: x86_64 wheels are theirs too.
    found = check(new_account, offline=True, core_instance_type="m1.medium")["offline wheels"]
    assert found.level == "ok"

    graviton = {"core_instance_type": "m7g.2xlarge", "task_instance_type": "r7gd.2xlarge"}
    found = check(new_account, offline=True, task_instance_count=2, **graviton)
    found = found["offline wheels"]
    assert found.level == "fail"
    assert found.detail.endswith(
        "holds x86_64 wheels; m7g.2xlarge (aarch64), r7gd.2xlarge (aarch64) nodes cannot "
        "install them offline"
    )
    assert found.fix.startswith(
        "imagepca emr wheelhouse --arch aarch64 DIR, then imagepca emr stage --version 0.1.0 "
        "--wheelhouse DIR"
    )

    # `emr up` checks the types of the request it sends: here a template's, not the settings'.
    template = json.loads((ROOT / "emr_config.json").read_text())
    for group in template["Instances"]["InstanceGroups"]:
        group["InstanceType"] = "m7g.xlarge"
    (tmp_path / "emr_config.json").write_text(json.dumps(template))
    settings = tmp_path / "emr_settings.json"
    settings.write_text(json.dumps({**vars(new_account["settings"]), "offline": True}))
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["emr", "up", "--settings", str(settings), "--config", str(tmp_path / "emr_config.json")]
    )
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert "offline wheels:" in error and "fix: imagepca emr wheelhouse --arch aarch64" in error
    assert boto3.client("emr").list_clusters()["Clusters"] == []  # nothing was submitted


@pytest.mark.parametrize(
    "key", [None, "aws/s3", "alias/aws/s3", f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:alias/aws/s3"]
)
def test_bucket_with_the_aws_managed_key_is_fine(key):
    """SSE-KMS with the AWS managed key aws/s3: its key policy lets the account use it
    through S3, so there is nothing to grant and no key of ours to check."""
    settings = EmrSettings.load(
        None, {"bucket": BUCKET, "region": REGION, "subnet_id": "subnet-0abc12345"}
    )
    s3 = stubbed("s3")
    default = {"SSEAlgorithm": "aws:kms", **({"KMSMasterKeyID": key} if key else {})}
    clients = {"s3": s3}  # no "kms": asking for it fails the test
    with Stubber(s3) as stub:
        stub.add_response("head_bucket", {}, {"Bucket": BUCKET})
        stub.add_response(
            "get_bucket_encryption",
            {"ServerSideEncryptionConfiguration": {
                "Rules": [{"ApplyServerSideEncryptionByDefault": default}]
            }},
            {"Bucket": BUCKET},
        )  # fmt: skip
        found = list(doctor.check_bucket(settings, clients.__getitem__))
        stub.assert_no_pending_responses()
    assert [(f.level, f.check) for f in found] == [("ok", "bucket"), ("ok", "bucket encryption")]
    assert "AWS managed key" in found[1].detail


def test_network_reads_the_caller_may_not_make_are_reported_not_fatal():
    """ec2:DescribeVpcs / DescribeSecurityGroups denied: "cannot check", and doctor goes on."""
    settings = EmrSettings.load(
        None, {"bucket": BUCKET, "region": REGION, "subnet_id": "subnet-0abc12345"}
    )
    ec2 = stubbed("ec2")
    subnet = {"SubnetId": "subnet-0abc12345", "VpcId": "vpc-0abc", "Tags": [TAG]}
    with Stubber(ec2) as stub:
        stub.add_response(
            "describe_subnets", {"Subnets": [subnet]}, {"SubnetIds": ["subnet-0abc12345"]}
        )
        stub.add_client_error("describe_vpcs", "UnauthorizedOperation", http_status_code=403)
        stub.add_client_error(
            "describe_security_groups", "UnauthorizedOperation", http_status_code=403
        )
        found = {f.check: f for f in doctor.check_network(settings, {"ec2": ec2}.__getitem__)}
        stub.assert_no_pending_responses()
    assert found["subnet tag"].level == "ok"
    for check in ("VPC tag", "security group tag"):
        assert found[check].level == "warn"
        assert found[check].detail == "cannot check: UnauthorizedOperation"


def test_an_architecture_check_the_caller_may_not_make_warns_and_lets_up_go_on(capsys):
    """An operator policy from before ec2:DescribeInstanceTypes: `emr up` says the check was
    not made, and goes on."""
    settings = EmrSettings.load(
        None,
        {"bucket": BUCKET, "region": REGION, "subnet_id": "subnet-0abc12345", "offline": True},
    )
    s3, ec2 = stubbed("s3"), stubbed("ec2")
    wheel = "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    with Stubber(s3) as s3_stub, Stubber(ec2) as ec2_stub:
        prefix = f"artifacts/{settings.version}/wheels/"
        s3_stub.add_response(
            "list_objects_v2",
            {"Contents": [{"Key": prefix + wheel}], "IsTruncated": False},
            {"Bucket": BUCKET, "Prefix": prefix},
        )
        ec2_stub.add_client_error(
            "describe_instance_types", "UnauthorizedOperation", http_status_code=403
        )
        clients = {"s3": s3, "ec2": ec2}.__getitem__
        findings = list(
            doctor.check_offline_wheels(settings, clients, cluster.render_config(settings))
        )
    assert [(f.level, f.detail) for f in findings] == [
        ("warn", "cannot check: UnauthorizedOperation")
    ]
    doctor.require(findings)  # no failure: `emr up` goes on
    assert "warning: offline wheels: cannot check: UnauthorizedOperation" in capsys.readouterr().err
