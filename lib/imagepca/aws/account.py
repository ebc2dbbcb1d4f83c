"""Step 1, once per account: the S3 bucket, the IAM roles and policies (``aws setup``).

Why this module exists: the EMR workflow needs a bucket that is private, encrypted and
TLS-only, two IAM roles (EMR service role, EC2 instance profile for the nodes), the EMR
cleanup service-linked role and an operator policy. The policy documents live as JSON
templates under ``aws/`` so they can be reviewed and linted (parliament) as data; this
module only fills their ``${PLACEHOLDERS}`` and applies them. Every AWS call is described
as an :class:`AwsCall` first, so ``--dry-run`` prints exactly the ``aws`` CLI commands
that would run.

Credentials are never read or stored here: boto3 resolves them (prefer
``aws configure sso`` / ``aws sso login`` short-lived credentials).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import boto3
from botocore.exceptions import ClientError

from .settings import AwsError, AwsSettings, find_resource, render_text

EMR_MANAGED_SERVICE_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
"""AWS managed policy for the EMR service role.

Used instead of a hand-written one because the permissions EMR needs to launch and clean
up instances change with EMR releases and AWS maintains this policy; v2 is scoped to
resources tagged ``for-use-with-amazon-emr-managed-policies=true``: our cluster tags, and
the subnet, its VPC and any existing ``ElasticMapReduce-*`` security groups, which the
user tags (docs/emr.md). It grants no KMS use: see ``emr-service-role-kms-policy``.
"""

PREFIXES = ("input", "artifacts", "runs", "logs", "jupyter")
"""Top-level prefixes of the project bucket; the instance role is limited to these."""

EMR_SERVICE = "elasticmapreduce.amazonaws.com"
INSTANCE_POLICY = "imagepca-bucket-prefixes"
"""The nodes' role's inline policy: the bucket's prefixes (and the KMS key) it may use."""
CLEANUP_ROLE = "AWSServiceRoleForEMRCleanup"
"""The service-linked role EMR creates with an account's first cluster (so the caller of
that first ``RunJobFlow`` needs ``iam:CreateServiceLinkedRole``); ``aws setup`` creates it
ahead, as the administrator."""


def render_policy(name: str, settings: AwsSettings, policies_dir: Path | None = None) -> dict:
    """Load ``aws/<name>.json`` with placeholders filled.

    Statements whose ``Resource`` renders empty (the KMS statements without a KMS key)
    are dropped, so one template serves both encryption choices.
    """
    directory = policies_dir or find_resource("aws")
    text = (directory / f"{name}.json").read_text(encoding="utf-8")
    document = json.loads(render_text(text, settings.placeholders()))
    if "Statement" in document:
        document["Statement"] = [s for s in document["Statement"] if s.get("Resource", "*") != ""]
    return document


def instance_role_prefixes(action: str, policies_dir: Path | None = None) -> tuple[str, ...]:
    """The bucket's key prefixes (``input/``, ...) on which the nodes' role may use
    ``action`` (``s3:GetObject``, ``s3:PutObject``), as its policy template grants them."""
    directory = policies_dir or find_resource("aws")
    text = (directory / "emr-instance-role-policy.json").read_text(encoding="utf-8")
    prefixes = []
    for statement in json.loads(text)["Statement"]:
        actions, resources = statement["Action"], statement["Resource"]
        if action in ([actions] if isinstance(actions, str) else actions):
            for resource in [resources] if isinstance(resources, str) else resources:
                key = resource.partition("${BUCKET}/")[2]
                if key.endswith("/*"):
                    prefixes.append(key.removesuffix("*"))
    return tuple(prefixes)


@dataclass(frozen=True)
class AwsCall:
    """One AWS API call, runnable with boto3 or printable as an ``aws`` CLI command.

    ``ok_errors`` are error codes meaning "already done", which makes setup idempotent.
    """

    service: str
    operation: str
    params: dict[str, Any]
    ok_errors: tuple[str, ...] = ()
    cli_service: str | None = None

    def cli(self, region: str) -> str:
        """The equivalent ``aws`` CLI command (JSON for structured arguments)."""
        words = ["aws", self.cli_service or self.service, _kebab(self.operation)]
        for key, value in self.params.items():
            flag = "--" + _kebab(key)
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + flag[2:])
                continue
            if isinstance(value, dict | list):
                value = json.dumps(value, separators=(",", ":"))
            words += [flag, str(value)]
        words += ["--region", region]
        return shlex.join(words)

    def run(self, clients: Callable[[str], Any]) -> Any:
        """Call boto3; an ``ok_errors`` code counts as success and returns ``None``."""
        client = clients(self.service)
        try:
            return getattr(client, _snake(self.operation))(**self.params)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in self.ok_errors:
                return None
            raise


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def _snake(name: str) -> str:
    return _kebab(name).replace("-", "_")


def _bucket_calls(settings: AwsSettings, policy: Callable[[str], str]) -> list[AwsCall]:
    bucket = settings.bucket
    create: dict[str, Any] = {"Bucket": bucket}
    if settings.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
        create["CreateBucketConfiguration"] = {"LocationConstraint": settings.region}
    if settings.kms_key_arn:
        rule = {
            "ApplyServerSideEncryptionByDefault": {
                "SSEAlgorithm": "aws:kms",
                "KMSMasterKeyID": settings.kms_key_arn,
            },
            "BucketKeyEnabled": True,
        }
    else:
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    block = {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    ownership = {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    calls = [
        AwsCall("s3", "CreateBucket", create, ("BucketAlreadyOwnedByYou",), "s3api"),
        AwsCall(
            "s3",
            "PutPublicAccessBlock",
            {"Bucket": bucket, "PublicAccessBlockConfiguration": block},
            cli_service="s3api",
        ),
        AwsCall(
            "s3",
            "PutBucketOwnershipControls",
            {"Bucket": bucket, "OwnershipControls": ownership},
            cli_service="s3api",
        ),
        AwsCall(
            "s3",
            "PutBucketEncryption",
            {"Bucket": bucket, "ServerSideEncryptionConfiguration": {"Rules": [rule]}},
            cli_service="s3api",
        ),
    ]
    if settings.versioning:
        calls.append(
            AwsCall(
                "s3",
                "PutBucketVersioning",
                {"Bucket": bucket, "VersioningConfiguration": {"Status": "Enabled"}},
                cli_service="s3api",
            )
        )
    calls.append(
        AwsCall(
            "s3",
            "PutBucketPolicy",
            {"Bucket": bucket, "Policy": policy("bucket-policy")},
            cli_service="s3api",
        )
    )
    return calls


def _role_calls(settings: AwsSettings, policy: Callable[[str], str]) -> list[AwsCall]:
    tags = [{"Key": "project", "Value": "imagepca"}]
    service = settings.service_role
    calls = [
        AwsCall(
            "iam",
            "CreateServiceLinkedRole",
            {"AWSServiceName": EMR_SERVICE},
            # IAM answers InvalidInput "Service role name ... has been taken" when it exists.
            ("InvalidInput", "EntityAlreadyExists"),
        ),
        AwsCall(
            "iam",
            "CreateRole",
            {
                "RoleName": service,
                "AssumeRolePolicyDocument": policy("emr-service-role-trust"),
                "Description": "EMR service role for imagepca clusters",
                "Tags": tags,
            },
            ("EntityAlreadyExists",),
        ),
        # CreateRole leaves an existing role's trust policy as it was.
        AwsCall(
            "iam",
            "UpdateAssumeRolePolicy",
            {"RoleName": service, "PolicyDocument": policy("emr-service-role-trust")},
        ),
        AwsCall(
            "iam",
            "AttachRolePolicy",
            {"RoleName": service, "PolicyArn": EMR_MANAGED_SERVICE_POLICY},
        ),
        AwsCall(
            "iam",
            "PutRolePolicy",
            {
                "RoleName": service,
                "PolicyName": "pass-instance-role",
                "PolicyDocument": policy("emr-service-role-passrole-policy"),
            },
        ),
    ]
    if settings.kms_key_arn:
        # EBS encryption with a customer managed key: EMR's service role launches the
        # encrypted volumes, so it must be allowed to use the key (EMR Management Guide,
        # "Enabling EBS encryption with AWS KMS"); AmazonEMRServicePolicy_v2 does not.
        calls.append(
            AwsCall(
                "iam",
                "PutRolePolicy",
                {
                    "RoleName": service,
                    "PolicyName": "use-ebs-kms-key",
                    "PolicyDocument": policy("emr-service-role-kms-policy"),
                },
            )
        )
    calls += [
        AwsCall(
            "iam",
            "CreateRole",
            {
                "RoleName": settings.instance_role,
                "AssumeRolePolicyDocument": policy("emr-instance-role-trust"),
                "Description": "EC2 role of imagepca EMR nodes (project bucket prefixes only)",
                "Tags": tags,
            },
            ("EntityAlreadyExists",),
        ),
        AwsCall(
            "iam",
            "UpdateAssumeRolePolicy",
            {
                "RoleName": settings.instance_role,
                "PolicyDocument": policy("emr-instance-role-trust"),
            },
        ),
        AwsCall(
            "iam",
            "PutRolePolicy",
            {
                "RoleName": settings.instance_role,
                "PolicyName": INSTANCE_POLICY,
                "PolicyDocument": policy("emr-instance-role-policy"),
            },
        ),
        AwsCall(
            "iam",
            "CreateInstanceProfile",
            {"InstanceProfileName": settings.instance_profile, "Tags": tags},
            ("EntityAlreadyExists",),
        ),
        AwsCall(
            "iam",
            "AddRoleToInstanceProfile",
            {"InstanceProfileName": settings.instance_profile, "RoleName": settings.instance_role},
            ("LimitExceeded", "EntityAlreadyExists"),
        ),
        AwsCall(
            "iam",
            "CreatePolicy",
            {
                "PolicyName": settings.operator_policy,
                "PolicyDocument": policy("iam-operator-policy"),
                "Description": "Stage data and operate imagepca EMR clusters",
                "Tags": tags,
            },
            ("EntityAlreadyExists",),
        ),
    ]
    return calls


def setup_calls(settings: AwsSettings, policies_dir: Path | None = None) -> list[AwsCall]:
    """Every call ``aws setup`` makes, in order.

    Why each exists: Block Public Access and BucketOwnerEnforced rule out public or
    foreign-owned objects; default encryption covers uploads that forget to ask; the
    bucket policy refuses plain-HTTP requests; the service-linked role is the one EMR
    would otherwise create with the first cluster; the roles give EMR and the nodes only
    what the workflow needs.
    """

    def policy(name: str) -> str:
        return json.dumps(render_policy(name, settings, policies_dir), separators=(",", ":"))

    return _bucket_calls(settings, policy) + _role_calls(settings, policy)


def setup(
    settings: AwsSettings,
    *,
    dry_run: bool = False,
    replace: bool = False,
    clients: Callable[[str], Any] | None = None,
    out: TextIO | None = None,
    policies_dir: Path | None = None,
) -> list[AwsCall]:
    """Create (or bring up to date) the bucket and IAM resources; or print the CLI commands.

    Re-running is safe: "already exists" answers are accepted and the policies are put
    again, so edits to ``aws/*.json`` reach AWS; the operator policy, a managed policy,
    gets a new default version when its document changed (:func:`update_managed_policy`).

    The roles and the operator policy have one name per account: a setup for another
    bucket or region would move them there, and the clusters and operators of the first
    would lose their access. That is refused (:func:`earlier_setup`) unless ``replace``.
    """
    out = out or sys.stdout
    calls = setup_calls(settings, policies_dir)
    arn = f"arn:aws:iam::{settings.account_id}:policy/{settings.operator_policy}"
    operator = next(call for call in calls if call.operation == "CreatePolicy")
    if dry_run:
        for call in calls:
            print(call.cli(settings.region), file=out)
        update = AwsCall(
            "iam",
            "CreatePolicyVersion",
            {
                "PolicyArn": arn,
                "PolicyDocument": operator.params["PolicyDocument"],
                "SetAsDefault": True,
            },
        )
        print("# when the operator policy exists already:", file=out)
        print(f"# {update.cli(settings.region)}", file=out)
        return calls
    clients = clients or client_factory(settings.region)
    elsewhere = earlier_setup(clients("iam"), settings, policies_dir)
    if elsewhere and not replace:
        raise AwsError(
            f"this account's imagepca roles and operator policy were set up for buckets, "
            f"regions or KMS keys this setup ({settings.bucket} in {settings.region}) would "
            "take from them:\n  "
            + "\n  ".join(elsewhere)
            + "\nThe clusters and operators of that setup would lose their access. Nothing "
            "was changed. To keep it, run setup with its --bucket and --region (and your "
            "edits of aws/*.json); to move the project, add --replace"
        )
    for call in calls:
        result = call.run(clients)
        state = "exists" if result is None and call.ok_errors else "ok"
        if call is operator and result is None:
            state = update_managed_policy(clients("iam"), arn, call.params["PolicyDocument"])
        print(f"{call.service} {call.operation}: {state}", file=out)
    print(
        f"operator policy {arn} - attach it to your IAM Identity Center permission set or group",
        file=out,
    )
    return calls


_BUCKET_ARN = re.compile(r"arn:aws:s3:::([^/*\"]+)")
_EMR_REGION_ARN = re.compile(r"arn:aws:elasticmapreduce:([a-z0-9-]+):")
_KMS_KEY_ARN = re.compile(r"arn:aws:kms:[a-z0-9-]+:\d+:key/[A-Za-z0-9-]+")


def earlier_setup(iam: Any, settings: AwsSettings, policies_dir: Path | None = None) -> list[str]:
    """The buckets, regions and KMS keys an earlier setup's documents name that this one's
    (from ``aws/*.json``, rendered for ``settings``) would not: one line per document (none when
    the roles and the policy are not there yet). A grant added by editing a template stays
    in both, and is no conflict."""
    operator_arn = f"arn:aws:iam::{settings.account_id}:policy/{settings.operator_policy}"

    def instance_policy() -> Any:
        answer = iam.get_role_policy(RoleName=settings.instance_role, PolicyName=INSTANCE_POLICY)
        return answer["PolicyDocument"]

    def service_trust() -> Any:
        return iam.get_role(RoleName=settings.service_role)["Role"]["AssumeRolePolicyDocument"]

    def operator_policy() -> Any:
        version = iam.get_policy(PolicyArn=operator_arn)["Policy"]["DefaultVersionId"]
        answer = iam.get_policy_version(PolicyArn=operator_arn, VersionId=version)
        return answer["PolicyVersion"]["Document"]

    documents = {
        f"role {settings.instance_role}, policy {INSTANCE_POLICY}": (
            instance_policy,
            "emr-instance-role-policy",
        ),
        f"role {settings.service_role}, trust policy": (service_trust, "emr-service-role-trust"),
        f"operator policy {settings.operator_policy}": (operator_policy, "iam-operator-policy"),
    }
    found = []
    for name, (read, template) in documents.items():
        try:
            document = read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchEntity":
                continue
            raise
        # botocore decodes IAM's URL-encoded documents; a string is JSON text.
        text = document if isinstance(document, str) else json.dumps(document)
        new = json.dumps(render_policy(template, settings, policies_dir))
        named = [
            f"{kind} {value}"
            for kind, pattern in (("bucket", _BUCKET_ARN), ("region", _EMR_REGION_ARN),
                                  ("key", _KMS_KEY_ARN))
            for value in sorted(set(pattern.findall(text)) - set(pattern.findall(new)))
        ]  # fmt: skip
        if named:
            found.append(f"{name}: {', '.join(named)}")
    return found


MAX_POLICY_VERSIONS = 5  # IAM's limit per managed policy


def update_managed_policy(iam: Any, arn: str, document: str) -> str:
    """Make ``document`` the default version of the managed policy ``arn`` unless it
    already is: ``"exists, unchanged"`` or ``"exists, updated"``.

    IAM keeps at most five versions of a managed policy; the oldest one that is not the
    default is deleted to make room, as the IAM console does.
    """
    versions = iam.list_policy_versions(PolicyArn=arn)["Versions"]
    default = next(version for version in versions if version["IsDefaultVersion"])
    current = iam.get_policy_version(PolicyArn=arn, VersionId=default["VersionId"])
    stored = current["PolicyVersion"]["Document"]  # botocore decodes IAM's URL-encoded JSON
    if (json.loads(stored) if isinstance(stored, str) else stored) == json.loads(document):
        return "exists, unchanged"
    if len(versions) >= MAX_POLICY_VERSIONS:
        oldest = min(
            (version for version in versions if not version["IsDefaultVersion"]),
            key=lambda version: version["CreateDate"],
        )
        iam.delete_policy_version(PolicyArn=arn, VersionId=oldest["VersionId"])
    iam.create_policy_version(PolicyArn=arn, PolicyDocument=document, SetAsDefault=True)
    return "exists, updated"


def client_factory(region: str, session: boto3.session.Session | None = None):
    """Return ``service -> client``; honours ``AWS_ENDPOINT_URL`` (tests, LocalStack)."""
    session = session or boto3.session.Session(region_name=region)
    cache: dict[str, Any] = {}

    def get(service: str) -> Any:
        if service not in cache:
            cache[service] = session.client(service, region_name=region)
        return cache[service]

    return get


def caller_account_id(region: str) -> str:
    """The account of the caller's credentials (STS ``GetCallerIdentity``)."""
    return boto3.client("sts", region_name=region).get_caller_identity()["Account"]
