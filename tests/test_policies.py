"""IAM policy documents under aws/: valid, least privilege, and clean under parliament."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parliament import analyze_policy_string, enhance_finding

from imagepca.aws import account
from imagepca.aws.settings import AwsSettings

ROOT = Path(__file__).resolve().parents[1]
POLICY_FILES = sorted(
    p for p in (ROOT / "aws").glob("*.json") if p.name != "emr-security-configuration.json"
)
TRUST_POLICIES = {"emr-service-role-trust.json", "emr-instance-role-trust.json"}
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SETTINGS = AwsSettings(
    bucket="imagepca-test-bucket", region="us-east-1", account_id="123456789012",
    kms_key_arn=KMS_KEY,
)  # fmt: skip


def rendered(path: Path) -> dict:
    return account.render_policy(path.stem, SETTINGS, ROOT / "aws")


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_policy_files_exist():
    names = {p.name for p in POLICY_FILES}
    assert {
        "bucket-policy.json",
        "iam-operator-policy.json",
        "emr-instance-role-policy.json",
        "emr-service-role-passrole-policy.json",
        "emr-service-role-kms-policy.json",
    } | TRUST_POLICIES <= names


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_valid_json_iam_policy_without_wildcard_admin(path):
    raw = json.loads(path.read_text())  # the template itself is valid JSON
    assert raw["Version"] == "2012-10-17"
    document = rendered(path)
    assert "${" not in json.dumps(document)
    assert "AdministratorAccess" not in path.read_text()
    for statement in document["Statement"]:
        assert statement["Effect"] in ("Allow", "Deny")
        actions = as_list(statement.get("Action", []))
        resources = as_list(statement.get("Resource", []))
        if statement["Effect"] == "Allow":
            assert "NotAction" not in statement and "NotResource" not in statement
            assert "*" not in actions and "*:*" not in actions
            assert not ("*" in resources and any(a.endswith(":*") for a in actions))
            # IAM: PassRole, the EMR service-linked role, and reads of the project's roles
            # (doctor); each is scoped to named roles below, never to "*".
            iam = [a for a in actions if a.startswith("iam:")]
            assert set(iam) <= IAM_ALLOWED, iam
            assert not iam or "*" not in resources


IAM_ALLOWED = {
    "iam:PassRole",
    "iam:CreateServiceLinkedRole",
    "iam:GetRole",
    "iam:GetInstanceProfile",
    "iam:ListAttachedRolePolicies",
}


def findings(path: Path) -> list:
    # parliament's built-in auditors; the community ones only flag that iam:PassRole is a
    # permissions-management action, which the PassRole test below checks is scoped.
    found = analyze_policy_string(json.dumps(rendered(path))).findings
    return [enhance_finding(f) for f in found]


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_parliament_reports_nothing_medium_or_worse(path):
    serious = []
    for finding in findings(path):
        if (
            path.name in TRUST_POLICIES
            and finding.issue == "MALFORMED"
            and "neither Resource nor NotResource" in str(finding.detail)
        ):
            # Ignored on purpose: parliament lints identity policies, and a role trust
            # policy has a Principal instead of a Resource by definition.
            continue
        if finding.severity in ("CRITICAL", "HIGH", "MEDIUM"):
            serious.append((finding.issue, finding.severity, finding.detail))
    assert not serious


def test_bucket_policy_denies_requests_without_tls():
    (statement,) = rendered(ROOT / "aws" / "bucket-policy.json")["Statement"]
    assert statement["Effect"] == "Deny" and statement["Principal"] == "*"
    assert statement["Action"] == "s3:*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert set(statement["Resource"]) == {
        "arn:aws:s3:::imagepca-test-bucket",
        "arn:aws:s3:::imagepca-test-bucket/*",
    }


def test_instance_role_is_limited_to_the_project_prefixes():
    document = rendered(ROOT / "aws" / "emr-instance-role-policy.json")
    allowed = {f"arn:aws:s3:::imagepca-test-bucket/{p}/*" for p in account.PREFIXES}
    # The bare prefix keys too: Hadoop's getFileStatus on s3://BUCKET/input/ sends
    # HEAD /input first, and a HEAD the role may not make is a 403, not a 404.
    allowed |= {
        "arn:aws:s3:::imagepca-test-bucket/input",
        "arn:aws:s3:::imagepca-test-bucket/artifacts",
    }
    for statement in document["Statement"]:
        for resource in as_list(statement["Resource"]):
            if resource.startswith("arn:aws:s3:::") and "/" in resource:
                assert resource in allowed
            elif resource.startswith("arn:aws:s3:::"):
                assert resource == "arn:aws:s3:::imagepca-test-bucket"
            else:
                assert resource == KMS_KEY
    writes = [s for s in document["Statement"] if "s3:PutObject" in as_list(s.get("Action"))]
    (write,) = writes
    assert not any("/input/" in r or "/artifacts/" in r for r in write["Resource"])
    listing = next(s for s in document["Statement"] if s["Action"] == "s3:ListBucket")
    assert "s3:prefix" in listing["Condition"]["StringLike"]


def test_kms_statement_dropped_without_a_key():
    plain = AwsSettings(bucket="b-b-b", region="us-east-1", account_id="123456789012")
    for name in ("emr-instance-role-policy", "iam-operator-policy", "emr-service-role-kms-policy"):
        document = account.render_policy(name, plain, ROOT / "aws")
        assert all("kms:" not in json.dumps(s) for s in document["Statement"])


def test_pass_role_is_scoped_to_project_roles_and_services():
    """The two project roles, and the EMR notebooks role `emr run --via
    notebook-execution` passes to StartNotebookExecution; only to EMR and EC2."""
    document = rendered(ROOT / "aws" / "iam-operator-policy.json")
    (pass_role,) = [s for s in document["Statement"] if s["Action"] == "iam:PassRole"]
    assert set(pass_role["Resource"]) == {
        "arn:aws:iam::123456789012:role/imagepca-emr-service-role",
        "arn:aws:iam::123456789012:role/imagepca-emr-ec2-role",
        "arn:aws:iam::123456789012:role/EMR_Notebooks_DefaultRole",
    }
    assert pass_role["Condition"] == {
        "StringLike": {
            "iam:PassedToService": ["elasticmapreduce.amazonaws.com", "ec2.amazonaws.com"]
        }
    }
    custom = AwsSettings(
        bucket="b-b-b", region="us-east-1", account_id="123456789012",
        notebook_service_role="team-notebooks",
    )  # fmt: skip
    document = account.render_policy("iam-operator-policy", custom, ROOT / "aws")
    (pass_role,) = [s for s in document["Statement"] if s["Action"] == "iam:PassRole"]
    assert "arn:aws:iam::123456789012:role/team-notebooks" in pass_role["Resource"]


def test_tags_only_on_project_clusters_and_notebook_executions():
    """RunJobFlow and StartNotebookExecution with Tags also need elasticmapreduce:AddTags
    (Service Authorization Reference, the operations table): only with project=imagepca."""
    document = rendered(ROOT / "aws" / "iam-operator-policy.json")
    tagging = [s for s in document["Statement"] if s["Action"] == "elasticmapreduce:AddTags"]
    assert {s["Resource"].rsplit(":", 1)[1] for s in tagging} == {
        "cluster/*",
        "notebook-execution/*",
    }
    for statement in tagging:
        assert statement["Condition"] == {"StringEquals": {"aws:RequestTag/project": "imagepca"}}


def test_service_linked_role_is_only_emrs_cleanup_role():
    """Row 5: the operator may create the one service-linked role EMR makes with an
    account's first cluster, nothing else."""
    document = rendered(ROOT / "aws" / "iam-operator-policy.json")
    (create,) = [s for s in document["Statement"] if s["Action"] == "iam:CreateServiceLinkedRole"]
    assert "elasticmapreduce.amazonaws.com" in create["Resource"]
    assert create["Resource"].endswith("/AWSServiceRoleForEMRCleanup*")
    assert create["Condition"] == {
        "StringLike": {"iam:AWSServiceName": "elasticmapreduce.amazonaws.com"}
    }
