"""``imagepca aws ...``: the one-time account setup and data uploads (argparse wiring)."""

from __future__ import annotations

import argparse
import sys

from . import account, stage
from .command_support import client as _client
from .command_support import command_group, default_region
from .command_support import guard as _guard
from .settings import NOTEBOOK_SERVICE_ROLE, AwsSettings


def _cmd_setup(args: argparse.Namespace) -> int:
    account_id = args.account_id
    if not account_id:
        if args.dry_run:
            account_id = "123456789012"
            print("# --account-id not given: using 123456789012 as a stand-in", file=sys.stderr)
        else:
            account_id = account.caller_account_id(args.region)
    settings = AwsSettings(
        bucket=args.bucket, region=args.region, account_id=account_id,
        kms_key_arn=args.kms_key, versioning=args.versioning,
        notebook_service_role=args.notebook_service_role,
    )  # fmt: skip
    account.setup(settings, dry_run=args.dry_run, replace=args.replace)
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from .settings import parse_s3_uri

    parse_s3_uri(args.destination)
    region = args.region or default_region()
    stage.upload(args.source, args.destination, s3_client=_client("s3", region))
    return 0


def add_aws(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "aws",
        help="create the S3 bucket and IAM roles, upload data",
        description="One-time AWS account setup and data upload for imagepca on EMR.",
    )

    setup = commands.add_parser(
        "setup",
        help="create the project bucket (private, encrypted, TLS-only) and IAM roles",
        description=(
            "Create the project bucket with Block Public Access, default encryption and a "
            "TLS-only bucket policy; the EMR cleanup service-linked role, the EMR service "
            "role, the EC2 instance profile limited to the bucket's input/ artifacts/ runs/ "
            "logs/ jupyter/ prefixes, and an operator policy. Idempotent; refuses to move a "
            "setup made for another bucket or region unless --replace. Run once with "
            "administrator credentials (e.g. an IAM Identity Center admin permission set "
            "via `aws sso login`)."
        ),
    )
    setup.add_argument("--bucket", required=True, help="bucket name to create")
    setup.add_argument("--region", required=True, help="AWS region, e.g. us-east-1")
    setup.add_argument(
        "--account-id", help="12-digit AWS account id (default: from STS GetCallerIdentity)"
    )
    setup.add_argument(
        "--kms-key",
        help="KMS key ARN for the bucket's default encryption and the cluster's EBS volumes "
        "(default: SSE-S3); the roles and the operator policy may use it",
    )
    setup.add_argument("--versioning", action="store_true", help="enable bucket versioning")
    setup.add_argument(
        "--notebook-service-role",
        default=NOTEBOOK_SERVICE_ROLE,
        help="the EMR notebooks role the operator policy may pass (`emr run --via "
        f"notebook-execution`; default {NOTEBOOK_SERVICE_ROLE}); re-running setup with "
        "another one updates the policy",
    )
    setup.add_argument(
        "--replace",
        action="store_true",
        help="move roles and policy set up for another bucket or region to this one (whose "
        "clusters and operators then lose their access); without it setup refuses",
    )
    setup.add_argument(
        "--dry-run", action="store_true", help="print the equivalent aws CLI commands only"
    )
    setup.set_defaults(func=_guard(_cmd_setup))

    upload = commands.add_parser(
        "upload",
        help="upload a local folder to S3, skipping files already there (same size)",
        description=(
            "Upload LOCAL_DIR to s3://BUCKET/PREFIX/ with boto3's transfer manager "
            "(multipart, parallel). Files already present with the same size are skipped."
        ),
    )
    upload.add_argument("source", metavar="LOCAL_DIR", help="folder (or file) to upload")
    upload.add_argument(
        "destination", metavar="S3_URI", help="s3://BUCKET/PREFIX/, e.g. s3://b/input/photos/"
    )
    upload.add_argument("--region", help="bucket region (default: AWS_REGION / profile)")
    upload.set_defaults(func=_guard(_cmd_upload))
