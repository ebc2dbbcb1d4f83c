"""`imagepca aws setup` and `aws upload` against a moto server over real HTTP."""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil

import boto3
import pytest
from botocore.exceptions import ClientError

from imagepca.aws import account, commands, stage
from imagepca.aws.settings import AwsError, AwsSettings
from moto_server import ACCOUNT_ID, REGION, aws_env, moto_endpoint  # noqa: F401

BUCKET = "imagepca-test-bucket"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.usefixtures("aws_env")
def test_setup_creates_private_encrypted_tls_only_bucket_and_roles():
    assert cli("aws", "setup", "--bucket", BUCKET, "--region", REGION) == 0
    s3 = boto3.client("s3", region_name=REGION)

    block = s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    rules = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    policy = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])
    (deny,) = policy["Statement"]
    assert deny["Effect"] == "Deny"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert f"arn:aws:s3:::{BUCKET}/*" in deny["Resource"]
    assert s3.get_bucket_versioning(Bucket=BUCKET).get("Status") is None

    iam = boto3.client("iam", region_name=REGION)
    attached = iam.list_attached_role_policies(RoleName="imagepca-emr-service-role")
    assert [p["PolicyArn"] for p in attached["AttachedPolicies"]] == [
        account.EMR_MANAGED_SERVICE_POLICY
    ]
    trust = iam.get_role(RoleName="imagepca-emr-service-role")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"]["Service"] == "elasticmapreduce.amazonaws.com"
    profile = iam.get_instance_profile(InstanceProfileName="imagepca-emr-ec2-profile")
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == ["imagepca-emr-ec2-role"]
    inline = iam.get_role_policy(
        RoleName="imagepca-emr-ec2-role", PolicyName="imagepca-bucket-prefixes"
    )["PolicyDocument"]
    sids = {s["Sid"] for s in inline["Statement"]}
    assert "UseProjectKmsKey" not in sids  # no KMS key given: statement dropped
    arn = f"arn:aws:iam::{ACCOUNT_ID}:policy/imagepca-operator"
    assert iam.get_policy(PolicyArn=arn)["Policy"]["PolicyName"] == "imagepca-operator"
    # Row 5: the EMR cleanup service-linked role, made ahead of the first cluster.
    # (moto names it AWSServiceRoleForelasticmapreduce; AWS: AWSServiceRoleForEMRCleanup)
    linked = iam.list_roles(PathPrefix="/aws-service-role/elasticmapreduce.amazonaws.com/")
    assert len(linked["Roles"]) == 1
    assert iam.list_role_policies(RoleName="imagepca-emr-service-role")["PolicyNames"] == [
        "pass-instance-role"  # no KMS key: no EBS key statement
    ]


@pytest.mark.usefixtures("aws_env")
def test_setup_is_idempotent_and_brings_the_operator_policy_up_to_date(capsys):
    argv = ["aws", "setup", "--bucket", BUCKET, "--region", REGION]
    assert cli(*argv) == 0
    assert cli(*argv) == 0
    assert "iam CreatePolicy: exists, unchanged" in capsys.readouterr().out
    iam = boto3.client("iam", region_name=REGION)
    arn = f"arn:aws:iam::{ACCOUNT_ID}:policy/imagepca-operator"

    def passable_roles() -> set[str]:
        version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        document = iam.get_policy_version(PolicyArn=arn, VersionId=version)
        statements = document["PolicyVersion"]["Document"]["Statement"]
        passing = [s for s in statements if "iam:PassRole" in s["Action"]]
        return {resource.rsplit("/", 1)[-1] for s in passing for resource in s["Resource"]}

    assert "EMR_Notebooks_DefaultRole" in passable_roles()
    # Another notebooks role: the managed policy gets a new default version, and IAM's
    # five versions are never exceeded (the oldest other one makes room).
    for number in range(6):
        assert cli(*argv, "--notebook-service-role", f"NotebooksRole{number}") == 0
        assert "iam CreatePolicy: exists, updated" in capsys.readouterr().out
    assert "NotebooksRole5" in passable_roles()
    assert "EMR_Notebooks_DefaultRole" not in passable_roles()
    assert len(iam.list_policy_versions(PolicyArn=arn)["Versions"]) == 5


@pytest.mark.usefixtures("aws_env")
def test_setup_for_another_bucket_and_region_is_refused_unless_replace(capsys):
    assert cli("aws", "setup", "--bucket", BUCKET, "--region", REGION) == 0
    capsys.readouterr()
    other = ["aws", "setup", "--bucket", "imagepca-other-bucket", "--region", "eu-west-1"]
    iam = boto3.client("iam", region_name=REGION)
    operator_arn = f"arn:aws:iam::{ACCOUNT_ID}:policy/imagepca-operator"

    def bindings() -> tuple[str, str, str]:
        inline = iam.get_role_policy(
            RoleName="imagepca-emr-ec2-role", PolicyName="imagepca-bucket-prefixes"
        )["PolicyDocument"]
        trust = iam.get_role(RoleName="imagepca-emr-service-role")["Role"]
        version = iam.get_policy(PolicyArn=operator_arn)["Policy"]["DefaultVersionId"]
        operator = iam.get_policy_version(PolicyArn=operator_arn, VersionId=version)
        return (
            json.dumps(inline),
            json.dumps(trust["AssumeRolePolicyDocument"]),
            json.dumps(operator["PolicyVersion"]["Document"]),
        )

    before = bindings()
    assert cli(*other) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: this account's imagepca roles and operator policy")
    assert f"imagepca-emr-ec2-role, policy imagepca-bucket-prefixes: bucket {BUCKET}" in error
    assert f"imagepca-emr-service-role, trust policy: region {REGION}" in error
    assert f"operator policy imagepca-operator: bucket {BUCKET}, region {REGION}" in error
    assert error.rstrip().endswith("to move the project, add --replace")
    # Nothing changed: not the roles, not the policy, and no bucket was made.
    assert bindings() == before
    s3 = boto3.client("s3", region_name=REGION)
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [BUCKET]

    assert cli(*other, "--replace") == 0
    inline, trust, operator = bindings()
    assert "arn:aws:s3:::imagepca-other-bucket" in inline and BUCKET not in inline
    # The trust policy too (CreateRole leaves an existing one as it was).
    assert f"arn:aws:elasticmapreduce:eu-west-1:{ACCOUNT_ID}:*" in trust and REGION not in trust
    assert "imagepca-other-bucket" in operator and BUCKET not in operator
    # Set up there, a re-run is no conflict.
    assert cli(*other) == 0


@pytest.mark.usefixtures("aws_env")
def test_a_grant_added_to_a_template_is_no_conflict_and_one_removed_is(tmp_path):
    """Re-running setup is how edits of aws/*.json reach AWS (docs/emr.md): a statement for
    another bucket added there is kept by every later setup, not taken for another setup's."""
    edited = tmp_path / "aws"
    shutil.copytree(account.find_resource("aws"), edited)
    template = edited / "emr-instance-role-policy.json"
    document = json.loads(template.read_text())
    document["Statement"].append(
        {"Sid": "ReadInventory", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": "arn:aws:s3:::my-inventory-bucket/*"}
    )  # fmt: skip
    template.write_text(json.dumps(document))
    settings = AwsSettings(bucket=BUCKET, region=REGION, account_id=ACCOUNT_ID)
    out = io.StringIO()
    account.setup(settings, out=out)
    account.setup(settings, out=out, policies_dir=edited)  # the grant added
    account.setup(settings, out=out, policies_dir=edited)  # and kept
    with pytest.raises(AwsError, match="policy imagepca-bucket-prefixes: bucket my-inventory"):
        account.setup(settings, out=out)  # the grant taken away: said, not done silently
    account.setup(settings, out=out, replace=True)


@pytest.mark.usefixtures("aws_env")
def test_setup_with_kms_versioning_outside_us_east_1():
    key = f"arn:aws:kms:eu-west-1:{ACCOUNT_ID}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    argv = ["aws", "setup", "--bucket", BUCKET, "--region", "eu-west-1", "--kms-key", key]
    assert cli(*argv, "--versioning") == 0
    s3 = boto3.client("s3", region_name="eu-west-1")
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] == "eu-west-1"
    rule = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms",
        "KMSMasterKeyID": key,
    }
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    iam = boto3.client("iam", region_name="eu-west-1")
    inline = iam.get_role_policy(
        RoleName="imagepca-emr-ec2-role", PolicyName="imagepca-bucket-prefixes"
    )["PolicyDocument"]
    kms = [s for s in inline["Statement"] if s["Sid"] == "UseProjectKmsKey"]
    assert kms and kms[0]["Resource"] == key
    # Row 2: the service role launches the KMS-encrypted EBS volumes, so it may use the key.
    ebs = iam.get_role_policy(RoleName="imagepca-emr-service-role", PolicyName="use-ebs-kms-key")
    statements = ebs["PolicyDocument"]["Statement"]
    assert {s["Resource"] for s in statements} == {key}
    grant = next(s for s in statements if "kms:CreateGrant" in s["Action"])
    assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    # Another key (or none) would leave what the first one encrypted unreadable: refused.
    other = key.replace("1234abcd", "5678efab")
    assert cli(*argv[:-1], other) == 1
    assert cli(*argv[:-2]) == 1
    assert cli(*argv[:-1], other, "--replace") == 0


def test_dry_run_prints_aws_cli_equivalents_without_calling_aws(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # would fail if called
    argv = ["aws", "setup", "--bucket", BUCKET, "--region", "eu-west-1"]
    assert cli(*argv, "--account-id", ACCOUNT_ID, "--dry-run") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # Last, commented out: the new version of an operator policy that exists already.
    note, update = lines[-2:]
    assert note == "# when the operator policy exists already:"
    update = shlex.split(update.removeprefix("# "))
    assert update[1:3] == ["iam", "create-policy-version"] and "--set-as-default" in update
    commands = [shlex.split(line) for line in lines[:-2]]
    assert all(c[0] == "aws" and c[-2:] == ["--region", "eu-west-1"] for c in commands)
    verbs = [" ".join(c[1:3]) for c in commands]
    assert verbs == [
        "s3api create-bucket",
        "s3api put-public-access-block",
        "s3api put-bucket-ownership-controls",
        "s3api put-bucket-encryption",
        "s3api put-bucket-policy",
        "iam create-service-linked-role",
        "iam create-role",
        "iam update-assume-role-policy",
        "iam attach-role-policy",
        "iam put-role-policy",
        "iam create-role",
        "iam update-assume-role-policy",
        "iam put-role-policy",
        "iam create-instance-profile",
        "iam add-role-to-instance-profile",
        "iam create-policy",
    ]
    create = commands[0]
    config = create[create.index("--create-bucket-configuration") + 1]
    assert json.loads(config) == {"LocationConstraint": "eu-west-1"}
    policy = commands[4][commands[4].index("--policy") + 1]
    slr = commands[5]
    assert slr[slr.index("--aws-service-name") + 1] == "elasticmapreduce.amazonaws.com"
    assert json.loads(policy)["Statement"][0]["Condition"]["Bool"]["aws:SecureTransport"] == (
        "false"
    )


def test_setup_rejects_bad_names(capsys):
    assert cli("aws", "setup", "--bucket", "Bad_Bucket", "--region", REGION, "--dry-run") == 1
    assert "invalid bucket name" in capsys.readouterr().err


def test_setup_refuses_a_kms_alias_arn(capsys):
    """A policy's Resource names the key ARN; KMS ignores an alias ARN there for key
    operations, so every grant the setup writes would silently allow nothing."""
    argv = ["aws", "setup", "--bucket", BUCKET, "--region", REGION, "--dry-run"]
    alias = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:alias/imagepca"
    assert cli(*argv, "--account-id", ACCOUNT_ID, "--kms-key", alias) == 1
    err = capsys.readouterr().err
    assert "pass the key's ARN" in err and "aws kms describe-key --key-id alias/NAME" in err
    key = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/mrk-1234abcd12ab34cd56ef1234567890ab"
    assert cli(*argv, "--account-id", ACCOUNT_ID, "--kms-key", key) == 0


def make_tree(root):
    files = {
        "apple/a 1.jpg": b"x" * 10,
        "banana/bänänä ö.jpg": b"y" * 20,
        "日本/写真 1.png": b"z" * 30,
        "nested/deeper/c.jpg": b"w" * 5,
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.usefixtures("aws_env")
def test_upload_skips_existing_same_size_and_handles_unicode(tmp_path, capsys):
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    files = make_tree(tmp_path / "photos")

    assert cli("aws", "upload", str(tmp_path / "photos"), f"s3://{BUCKET}/input/photos") == 0
    err = capsys.readouterr().err
    assert "uploaded 4 file(s)" in err and "[1/4]" in err
    listed = {
        o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="input/")["Contents"]
    }
    assert listed == {f"input/photos/{k}": len(v) for k, v in files.items()}
    body = s3.get_object(Bucket=BUCKET, Key="input/photos/日本/写真 1.png")["Body"].read()
    assert body == files["日本/写真 1.png"]

    assert cli("aws", "upload", str(tmp_path / "photos"), f"s3://{BUCKET}/input/photos/") == 0
    assert "uploaded 0 file(s), 0 bytes; skipped 4" in capsys.readouterr().err

    (tmp_path / "photos" / "apple" / "a 1.jpg").write_bytes(b"x" * 11)
    result = stage.upload(tmp_path / "photos", f"s3://{BUCKET}/input/photos/", s3_client=s3)
    assert result.uploaded == ["input/photos/apple/a 1.jpg"]
    assert len(result.skipped) == 3


@pytest.mark.usefixtures("aws_env")
def test_upload_reports_missing_source(tmp_path, capsys):
    assert cli("aws", "upload", str(tmp_path / "nope"), f"s3://{BUCKET}/input/") == 1
    assert "does not exist" in capsys.readouterr().err


def test_help_for_every_aws_command(capsys):
    for argv in (["aws", "--help"], ["aws", "setup", "--help"], ["aws", "upload", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(*argv)
        assert exit_info.value.code == 0
    assert "skipping" in capsys.readouterr().out


@pytest.mark.usefixtures("aws_env")
def test_bucket_policy_refuses_plain_http():
    """moto evaluates bucket policies, and this server speaks plain HTTP: the TLS-only
    statement must refuse it (the other tests remove the policy for that reason)."""
    assert cli("aws", "setup", "--bucket", BUCKET, "--region", REGION) == 0
    s3 = boto3.client("s3", region_name=REGION)
    with pytest.raises(ClientError) as error:
        s3.put_object(Bucket=BUCKET, Key="input/a.jpg", Body=b"x")
    assert error.value.response["Error"]["Code"] in ("AccessDenied", "403")
    s3.delete_bucket_policy(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="input/a.jpg", Body=b"x")


@pytest.mark.usefixtures("aws_env")
def test_a_refused_upload_is_one_error_line(tmp_path, capsys):
    """boto3's transfer manager wraps the refusal in its own S3UploadFailedError."""
    assert cli("aws", "setup", "--bucket", BUCKET, "--region", REGION) == 0  # TLS only
    make_tree(tmp_path / "photos")
    capsys.readouterr()
    assert cli("aws", "upload", str(tmp_path / "photos"), f"s3://{BUCKET}/input/") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: AWS said: Failed to upload ") and "Forbidden" in last
