"""AWS account setup for imagepca: the S3 bucket, IAM roles and policies, and uploads.

Why this module exists: the EMR workflow needs a bucket that is private, encrypted and
TLS-only, two IAM roles (EMR service role, EC2 instance profile for the nodes) and an
operator policy. The policy documents live as JSON templates under ``aws/`` so they can
be reviewed and linted (parliament) as data; this module only fills their
``${PLACEHOLDERS}`` and applies them. Every AWS call is described as an :class:`AwsCall`
first, so ``--dry-run`` prints exactly the ``aws`` CLI commands that would run.

Credentials are never read or stored here: boto3 resolves them (prefer
``aws configure sso`` / ``aws sso login`` short-lived credentials).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
"""``${NAME}`` placeholders; IAM policy variables such as ``${aws:username}`` are left alone."""

BUCKET_NAME = re.compile(r"^(?!xn--)(?!.*-s3alias$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
ACCOUNT_ID = re.compile(r"^\d{12}$")
KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/[A-Za-z0-9/_-]+$")

EMR_MANAGED_SERVICE_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
"""AWS managed policy for the EMR service role.

Used instead of a hand-written one because the permissions EMR needs to launch and clean
up instances change with EMR releases and AWS maintains this policy; v2 is scoped to
resources tagged ``for-use-with-amazon-emr-managed-policies=true`` (our cluster tags, and
the subnet / security groups the user tags, see docs/emr.md).
"""

PREFIXES = ("input", "artifacts", "runs", "logs", "jupyter")
"""Top-level prefixes of the project bucket; the instance role is limited to these."""


class SetupError(RuntimeError):
    """A problem the user can fix; the message says how."""


def repo_root() -> Path:
    """The source tree root (``lib/imagepca/aws.py`` -> ``.``), where ``aws/`` lives."""
    return Path(__file__).resolve().parents[2]


def find_resource(relative: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate a shipped template: an explicit path, else the current directory, else the repo.

    Templates are data files of the repository, not of the wheel, so commands that use
    them run from a checkout; ``explicit`` lets a user keep an edited copy elsewhere.
    """
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise SetupError(f"{path} does not exist")
        return path
    for base in (Path.cwd(), repo_root()):
        candidate = base / relative
        if candidate.exists():
            return candidate
    raise SetupError(
        f"cannot find {relative}: run from the imagepca repository root or pass its path"
    )


def render_text(text: str, values: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` placeholders; an unknown name is an error, not a silent blank."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise SetupError(f"no value for placeholder ${{{name}}}")
        return str(values[name])

    return PLACEHOLDER.sub(substitute, text)


@dataclass(frozen=True)
class AwsSettings:
    """What ``aws setup`` creates, validated once at the CLI edge.

    Parameters
    ----------
    bucket, region, account_id : str
        Project bucket, its region and the AWS account that owns the roles.
    kms_key_arn : str or None
        Customer managed KMS key for default bucket encryption; ``None`` means SSE-S3.
    versioning : bool
        Turn on bucket versioning (protects staged artifacts from overwrites).
    service_role, instance_role, instance_profile, operator_policy : str
        IAM names; the defaults match ``emr_settings.example.json``.
    """

    bucket: str
    region: str
    account_id: str
    kms_key_arn: str | None = None
    versioning: bool = False
    service_role: str = "imagepca-emr-service-role"
    instance_role: str = "imagepca-emr-ec2-role"
    instance_profile: str = "imagepca-emr-ec2-profile"
    operator_policy: str = "imagepca-operator"

    def __post_init__(self) -> None:
        if not BUCKET_NAME.match(self.bucket) or ".." in self.bucket:
            raise SetupError(
                f"invalid bucket name {self.bucket!r}: 3-63 lowercase letters, digits, '.' or '-'"
            )
        if not REGION_NAME.match(self.region):
            raise SetupError(f"invalid region {self.region!r}, e.g. us-east-1")
        if not ACCOUNT_ID.match(self.account_id):
            raise SetupError(f"invalid account id {self.account_id!r}: 12 digits")
        if self.kms_key_arn is not None and not KMS_KEY_ARN.match(self.kms_key_arn):
            raise SetupError(
                f"invalid KMS key ARN {self.kms_key_arn!r}: arn:aws:kms:REGION:ACCOUNT:key/KEY_ID"
            )

    def placeholders(self) -> dict[str, str]:
        """Values for the ``${...}`` placeholders of the ``aws/`` templates."""
        return {
            "BUCKET": self.bucket,
            "REGION": self.region,
            "ACCOUNT_ID": self.account_id,
            "SERVICE_ROLE": self.service_role,
            "INSTANCE_ROLE": self.instance_role,
            "INSTANCE_PROFILE": self.instance_profile,
            "KMS_KEY_ARN": self.kms_key_arn or "",
        }


def render_policy(name: str, settings: AwsSettings, policies_dir: Path | None = None) -> dict:
    """Load ``aws/<name>.json`` with placeholders filled.

    Statements whose ``Resource`` renders empty (the KMS statement without a KMS key)
    are dropped, so one template serves both encryption choices.
    """
    directory = policies_dir or find_resource("aws")
    text = (directory / f"{name}.json").read_text(encoding="utf-8")
    document = json.loads(render_text(text, settings.placeholders()))
    if "Statement" in document:
        document["Statement"] = [s for s in document["Statement"] if s.get("Resource", "*") != ""]
    return document


# --------------------------------------------------------------------------- calls


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


def setup_calls(settings: AwsSettings, policies_dir: Path | None = None) -> list[AwsCall]:
    """Every call ``aws setup`` makes, in order.

    Why each exists: Block Public Access and BucketOwnerEnforced rule out public or
    foreign-owned objects; default encryption covers uploads that forget to ask; the
    bucket policy refuses plain-HTTP requests; the roles give EMR and the nodes only
    what the workflow needs.
    """
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

    def policy(name: str) -> str:
        return json.dumps(render_policy(name, settings, policies_dir), separators=(",", ":"))

    tags = [{"Key": "project", "Value": "imagepca"}]
    calls = [
        AwsCall("s3", "CreateBucket", create, ("BucketAlreadyOwnedByYou",), "s3api"),
        AwsCall(
            "s3",
            "PutPublicAccessBlock",
            {
                "Bucket": bucket,
                "PublicAccessBlockConfiguration": {
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            },
            cli_service="s3api",
        ),
        AwsCall(
            "s3",
            "PutBucketOwnershipControls",
            {
                "Bucket": bucket,
                "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
            },
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
    calls += [
        AwsCall(
            "s3",
            "PutBucketPolicy",
            {"Bucket": bucket, "Policy": policy("bucket-policy")},
            cli_service="s3api",
        ),
        AwsCall(
            "iam",
            "CreateRole",
            {
                "RoleName": settings.service_role,
                "AssumeRolePolicyDocument": policy("emr-service-role-trust"),
                "Description": "EMR service role for imagepca clusters",
                "Tags": tags,
            },
            ("EntityAlreadyExists",),
        ),
        AwsCall(
            "iam",
            "AttachRolePolicy",
            {"RoleName": settings.service_role, "PolicyArn": EMR_MANAGED_SERVICE_POLICY},
        ),
        AwsCall(
            "iam",
            "PutRolePolicy",
            {
                "RoleName": settings.service_role,
                "PolicyName": "pass-instance-role",
                "PolicyDocument": policy("emr-service-role-passrole-policy"),
            },
        ),
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
            "PutRolePolicy",
            {
                "RoleName": settings.instance_role,
                "PolicyName": "imagepca-bucket-prefixes",
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


def setup(
    settings: AwsSettings,
    *,
    dry_run: bool = False,
    clients: Callable[[str], Any] | None = None,
    out: TextIO | None = None,
    policies_dir: Path | None = None,
) -> list[AwsCall]:
    """Create (or bring up to date) the bucket and IAM resources; or print the CLI commands.

    Re-running is safe: "already exists" answers are accepted and the policies are put
    again, so edits to ``aws/*.json`` reach AWS.
    """
    out = out or sys.stdout
    calls = setup_calls(settings, policies_dir)
    if dry_run:
        for call in calls:
            print(call.cli(settings.region), file=out)
        return calls
    clients = clients or client_factory(settings.region)
    for call in calls:
        result = call.run(clients)
        state = "exists" if result is None and call.ok_errors else "ok"
        print(f"{call.service} {call.operation}: {state}", file=out)
    print(
        f"operator policy arn:aws:iam::{settings.account_id}:policy/{settings.operator_policy}"
        " - attach it to your IAM Identity Center permission set or group",
        file=out,
    )
    return calls


def client_factory(region: str, session: boto3.session.Session | None = None):
    """Return ``service -> client``; honours ``AWS_ENDPOINT_URL`` (tests, LocalStack)."""
    session = session or boto3.session.Session(region_name=region)
    cache: dict[str, Any] = {}

    def get(service: str) -> Any:
        if service not in cache:
            cache[service] = session.client(service, region_name=region)
        return cache[service]

    return get


# --------------------------------------------------------------------------- upload


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and key prefix (no leading slash)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise SetupError(f"expected an s3://BUCKET/PREFIX URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise SetupError(f"no bucket in {uri!r}")
    return bucket, key


@dataclass
class UploadResult:
    """What an upload did: counts let callers (and tests) check skip-existing."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


class _Progress:
    """Line-based progress on stderr: a line per file plus one every ~10% of a big file."""

    def __init__(self, label: str, size: int, out: TextIO) -> None:
        self.label, self.size, self.out = label, size, out
        self.seen = 0
        self.next_report = 0.1

    def __call__(self, amount: int) -> None:
        self.seen += amount
        if self.size >= 8 * 1024 * 1024 and self.seen / self.size >= self.next_report:
            print(f"  {self.label}: {100 * self.seen / self.size:.0f}%", file=self.out)
            self.next_report += 0.1


def iter_files(local: Path) -> Iterable[tuple[Path, str]]:
    """Files under ``local`` (or ``local`` itself) with their relative POSIX names, sorted."""
    if local.is_file():
        yield local, local.name
        return
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        yield path, path.relative_to(local).as_posix()


def upload(
    local: str | os.PathLike[str],
    s3_uri: str,
    *,
    s3_client: Any,
    transfer_config: TransferConfig | None = None,
    extra_args: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> UploadResult:
    """Upload a directory (or one file) to ``s3_uri``, skipping objects of the same size.

    This is the ``aws s3 sync`` step without needing the AWS CLI: boto3's transfer
    manager does multipart and parallel parts. Same-size skipping matches ``aws s3
    sync --size-only``: re-runs after an interruption only send what is missing.
    Keys keep the file names as they are (spaces, non-ASCII) in UTF-8.
    """
    out = out or sys.stderr
    source = Path(local)
    if not source.exists():
        raise SetupError(f"{source} does not exist")
    bucket, prefix = parse_s3_uri(s3_uri)
    if prefix and not prefix.endswith("/") and source.is_dir():
        prefix += "/"
    existing = _existing_sizes(s3_client, bucket, prefix)
    config = transfer_config or TransferConfig(
        multipart_threshold=64 * 1024 * 1024, max_concurrency=8
    )
    files = list(iter_files(source))
    result = UploadResult()
    for index, (path, relative) in enumerate(files, start=1):
        # A single file goes to PREFIX/NAME, or to PREFIX itself when it names a key.
        key = prefix + relative if source.is_dir() or not prefix or prefix.endswith("/") else prefix
        size = path.stat().st_size
        if existing.get(key) == size:
            result.skipped.append(key)
            continue
        print(f"[{index}/{len(files)}] s3://{bucket}/{key} ({size} bytes)", file=out)
        s3_client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs=dict(extra_args or {}),
            Config=config,
            Callback=_Progress(relative, size, out),
        )
        result.uploaded.append(key)
        result.bytes_uploaded += size
    print(
        f"uploaded {len(result.uploaded)} file(s), {result.bytes_uploaded} bytes; "
        f"skipped {len(result.skipped)} already present",
        file=out,
    )
    return result


def _existing_sizes(s3_client: Any, bucket: str, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = item["Size"]
    return sizes


# --------------------------------------------------------------------------- CLI


def _account_id(region: str) -> str:
    return boto3.client("sts", region_name=region).get_caller_identity()["Account"]


def _cmd_setup(args: argparse.Namespace) -> int:
    try:
        account = args.account_id
        if not account:
            if args.dry_run:
                account = "123456789012"
                print("# --account-id not given: using 123456789012 as a stand-in", file=sys.stderr)
            else:
                account = _account_id(args.region)
        settings = AwsSettings(
            bucket=args.bucket,
            region=args.region,
            account_id=account,
            kms_key_arn=args.kms_key,
            versioning=args.versioning,
        )
        setup(settings, dry_run=args.dry_run)
    except (SetupError, ClientError, BotoCoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    try:
        parse_s3_uri(args.destination)
        region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        s3 = boto3.client("s3", region_name=region)
        upload(args.source, args.destination, s3_client=s3)
    except (SetupError, ClientError, BotoCoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``aws`` command group (``setup``, ``upload``) to the imagepca CLI."""
    parser = subparsers.add_parser(
        "aws",
        help="create the S3 bucket and IAM roles, upload data",
        description="One-time AWS account setup and data upload for imagepca on EMR.",
    )
    commands = parser.add_subparsers(dest="aws_command", metavar="COMMAND")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])

    setup_parser = commands.add_parser(
        "setup",
        help="create the project bucket (private, encrypted, TLS-only) and IAM roles",
        description=(
            "Create the project bucket with Block Public Access, default encryption and a "
            "TLS-only bucket policy; the EMR service role, the EC2 instance profile limited "
            "to the bucket's input/ artifacts/ runs/ logs/ jupyter/ prefixes, and an operator "
            "policy. Idempotent. Run once with administrator credentials (e.g. an IAM "
            "Identity Center admin permission set via `aws sso login`)."
        ),
    )
    setup_parser.add_argument("--bucket", required=True, help="bucket name to create")
    setup_parser.add_argument("--region", required=True, help="AWS region, e.g. us-east-1")
    setup_parser.add_argument(
        "--account-id", help="12-digit AWS account id (default: from STS GetCallerIdentity)"
    )
    setup_parser.add_argument(
        "--kms-key", help="KMS key ARN for default bucket encryption (default: SSE-S3)"
    )
    setup_parser.add_argument("--versioning", action="store_true", help="enable bucket versioning")
    setup_parser.add_argument(
        "--dry-run", action="store_true", help="print the equivalent aws CLI commands only"
    )
    setup_parser.set_defaults(func=_cmd_setup)

    upload_parser = commands.add_parser(
        "upload",
        help="upload a local folder to S3, skipping files already there (same size)",
        description=(
            "Upload LOCAL_DIR to s3://BUCKET/PREFIX/ with boto3's transfer manager "
            "(multipart, parallel). Files already present with the same size are skipped."
        ),
    )
    upload_parser.add_argument("source", metavar="LOCAL_DIR", help="folder (or file) to upload")
    upload_parser.add_argument(
        "destination", metavar="S3_URI", help="s3://BUCKET/PREFIX/, e.g. s3://b/input/photos/"
    )
    upload_parser.add_argument("--region", help="bucket region (default: AWS_REGION / profile)")
    upload_parser.set_defaults(func=_cmd_upload)
