"""``emr doctor``: what can be checked before a cluster exists, with the fix for each finding.

Why this module exists: a first ``emr up`` on a new account fails slowly and far from the
cause (a subnet without the EMR tag fails minutes in; a missing KMS grant fails an upload;
artifacts staged from another checkout fail the bootstrap). Every check here is a
read-only call with the caller's credentials; a call the caller may not make is reported
as "cannot check", not as a failure of the thing checked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from botocore.exceptions import ClientError

from imagepca.weights import file_sha256

from .account import CLEANUP_ROLE, EMR_MANAGED_SERVICE_POLICY, EMR_SERVICE
from .cluster import render_config
from .settings import EMR_TAG, AwsError, EmrSettings, repo_root
from .stage import (
    BOOTSTRAP_FILES,
    PYSPARK_NOTEBOOKS,
    SHA256_KEY,
    WEIGHTS_FILE,
    wheel_architectures,
)

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """One check's result; ``fix`` says what to do when it is not ``ok``."""

    level: Level
    check: str
    detail: str
    fix: str = ""


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def _denied(error: ClientError) -> bool:
    return _code(error) in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation")


def _cannot(check: str, error: ClientError) -> Finding:
    return Finding("warn", check, f"cannot check: {_code(error)}", "ask an admin to run doctor")


def _tagged(tags: list[dict] | None) -> bool:
    return any(t.get("Key") == EMR_TAG and t.get("Value") == "true" for t in tags or [])


def check_bucket(settings: EmrSettings, clients: Callable[[str], Any]) -> Iterator[Finding]:
    """Bucket exists; its default encryption, and a KMS key the caller can use."""
    s3, bucket = clients("s3"), settings.bucket
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as error:
        yield Finding(
            "fail", "bucket", f"s3://{bucket}: {_code(error)}",
            f"imagepca aws setup --bucket {bucket} --region {settings.region}",
        )  # fmt: skip
        return
    yield Finding("ok", "bucket", f"s3://{bucket} exists")
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    except ClientError as error:
        yield _cannot("bucket encryption", error)
        return
    default = rules["Rules"][0]["ApplyServerSideEncryptionByDefault"]
    if default["SSEAlgorithm"] != "aws:kms":
        yield Finding("ok", "bucket encryption", default["SSEAlgorithm"])
        return
    key = default.get("KMSMasterKeyID", "")
    if _aws_managed_s3_key(key):
        # Its key policy lets every principal of the account use it through S3: there is
        # nothing to grant, and no key of ours to describe.
        yield Finding("ok", "bucket encryption", "aws:kms with the AWS managed key aws/s3")
        return
    yield from check_kms_key(key, clients("kms"))


def _aws_managed_s3_key(key: str) -> bool:
    """No key id (S3 then uses ``aws/s3``), or that key named by alias or alias ARN."""
    return not key or key in ("aws/s3", "alias/aws/s3") or key.endswith(":alias/aws/s3")


def check_kms_key(key: str, kms: Any) -> Iterator[Finding]:
    """The bucket's KMS key is enabled and the caller may encrypt and decrypt with it
    (what ``aws upload`` and ``emr stage`` need on an SSE-KMS bucket)."""
    fix = (
        "imagepca aws setup --kms-key KEY_ARN (updates the policies) or make the caller a key user"
    )
    try:
        state = kms.describe_key(KeyId=key)["KeyMetadata"]
    except ClientError as error:
        yield Finding("fail", "KMS key", f"{key}: {_code(error)}", fix)
        return
    if not state.get("Enabled", False):
        yield Finding("fail", "KMS key", f"{key} is {state.get('KeyState')}", "enable the key")
        return
    try:
        blob = kms.generate_data_key(KeyId=key, KeySpec="AES_256")["CiphertextBlob"]
        kms.decrypt(CiphertextBlob=blob, KeyId=key)
    except ClientError as error:
        yield Finding("fail", "KMS key", f"cannot use {key}: {_code(error)}", fix)
        return
    yield Finding("ok", "KMS key", f"{key}: enabled, GenerateDataKey and Decrypt allowed")


def check_roles(settings: EmrSettings, clients: Callable[[str], Any]) -> Iterator[Finding]:
    """Service role (with AWS's managed policy), instance profile (with a role), cleanup SLR."""
    iam = clients("iam")
    fix = "run `imagepca aws setup` as an administrator"
    try:
        attached = iam.list_attached_role_policies(RoleName=settings.service_role)
        arns = [p["PolicyArn"] for p in attached["AttachedPolicies"]]
        if EMR_MANAGED_SERVICE_POLICY in arns:
            yield Finding("ok", "service role", settings.service_role)
        else:
            yield Finding(
                "fail",
                "service role",
                f"{settings.service_role} lacks AmazonEMRServicePolicy_v2",
                fix,
            )
    except ClientError as error:
        if _denied(error):
            yield _cannot("service role", error)
        else:
            yield Finding("fail", "service role", f"{settings.service_role}: {_code(error)}", fix)
    try:
        profile = iam.get_instance_profile(InstanceProfileName=settings.instance_profile)
        roles = [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]]
        level: Level = "ok" if roles else "fail"
        yield Finding(level, "instance profile", f"{settings.instance_profile}: roles {roles}", fix)
    except ClientError as error:
        if _denied(error):
            yield _cannot("instance profile", error)
        else:
            yield Finding(
                "fail", "instance profile", f"{settings.instance_profile}: {_code(error)}", fix
            )
    try:
        iam.get_role(RoleName=CLEANUP_ROLE)
        yield Finding("ok", "cleanup role", CLEANUP_ROLE)
    except ClientError as error:
        if _denied(error):
            yield _cannot("cleanup role", error)
        else:
            yield Finding(
                "warn", "cleanup role", f"{CLEANUP_ROLE} missing: the first cluster creates it, "
                "which needs iam:CreateServiceLinkedRole",
                "aws iam create-service-linked-role --aws-service-name " + EMR_SERVICE,
            )  # fmt: skip


def check_network(settings: EmrSettings, clients: Callable[[str], Any]) -> Iterator[Finding]:
    """Subnet, its VPC and existing ``ElasticMapReduce-*`` groups carry the EMR tag, which
    AmazonEMRServicePolicy_v2 requires to launch into them and create default groups."""
    ec2 = clients("ec2")
    try:
        (subnet,) = ec2.describe_subnets(SubnetIds=[settings.subnet_id])["Subnets"]
    except ClientError as error:
        if _denied(error):
            yield _cannot("subnet", error)
            return
        yield Finding(
            "fail", "subnet", f"{settings.subnet_id}: {_code(error)}",
            f"set subnet_id to a subnet of {settings.region} (aws ec2 describe-subnets)",
        )  # fmt: skip
        return
    tag = f"aws ec2 create-tags --tags Key={EMR_TAG},Value=true --resources"
    vpc = subnet["VpcId"]
    yield _tag_finding("subnet", settings.subnet_id, subnet.get("Tags"), tag)
    try:
        vpc_tags = ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0].get("Tags")
    except ClientError as error:
        if not _denied(error):
            raise
        yield _cannot("VPC tag", error)
    else:
        yield _tag_finding("VPC", vpc, vpc_tags, tag)
    try:
        groups = ec2.describe_security_groups(
            Filters=[
                {"Name": "vpc-id", "Values": [vpc]},
                {"Name": "group-name", "Values": ["ElasticMapReduce-*"]},
            ]
        )["SecurityGroups"]
    except ClientError as error:
        if not _denied(error):
            raise
        yield _cannot("security group tag", error)
        groups = []
    for group in groups:
        if not _tagged(group.get("Tags")):
            yield Finding(
                "fail", "security group tag", f"{group['GroupName']} ({group['GroupId']}) lacks "
                f"{EMR_TAG}=true", f"{tag} {group['GroupId']}",
            )  # fmt: skip
    if settings.key_name:
        try:
            ec2.describe_key_pairs(KeyNames=[settings.key_name])
            yield Finding("ok", "key pair", settings.key_name)
        except ClientError as error:
            yield Finding(
                "fail", "key pair", f"{settings.key_name}: {_code(error)}",
                "aws ec2 create-key-pair, or set key_name to an existing one (or \"\")",
            )  # fmt: skip


def _tag_finding(kind: str, resource: str, tags: list[dict] | None, tag: str) -> Finding:
    if _tagged(tags):
        return Finding("ok", f"{kind} tag", f"{resource} has {EMR_TAG}=true")
    return Finding("fail", f"{kind} tag", f"{resource} lacks {EMR_TAG}=true", f"{tag} {resource}")


def check_security_configuration(settings: EmrSettings, emr: Any) -> Iterator[Finding]:
    name = settings.security_configuration
    if not name:
        yield Finding(
            "ok", "security configuration", "none named (no at-rest/in-transit encryption)"
        )
        return
    try:
        described = emr.describe_security_configuration(Name=name)
    except ClientError as error:
        yield Finding(
            "fail", "security configuration", f"{name}: {_code(error)}",
            'imagepca emr security-config --kms-key KEY_ARN, or set "security_configuration": ""',
        )  # fmt: skip
        return
    definition = json.loads(described["SecurityConfiguration"])
    in_transit = definition.get("EncryptionConfiguration", {}).get("EnableInTransitEncryption")
    note = (
        "; in transit: Livy https://localhost:8998 (EMR 7.4+), history :18480" if in_transit else ""
    )
    yield Finding("ok", "security configuration", f"{name}{note}")


def check_artifacts(
    settings: EmrSettings, s3: Any, project: Path | None = None, *, compare: bool = True
) -> Iterator[Finding]:
    """Staged artifacts exist for the version, and (``compare``) match this checkout's
    files."""
    project = project or repo_root()
    base, version = f"artifacts/{settings.version}", settings.version
    fix = f"imagepca emr stage --version {version}"
    local = {f"{base}/bootstrap/{name}": project / "bootstrap" / name for name in BOOTSTRAP_FILES}
    for notebook in sorted((project / "notebooks").glob("*.ipynb")):
        local[f"{base}/notebooks/{notebook.name}"] = notebook
    listed = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"{base}/")
    keys = {item["Key"] for item in listed.get("Contents", [])}
    wanted = [*local, f"{base}/models/{WEIGHTS_FILE}"]
    wanted += [
        f"{base}/{PYSPARK_NOTEBOOKS}/{p.name}" for p in (project / "notebooks").glob("*.ipynb")
    ]
    missing = [key for key in wanted if key not in keys]
    if not any(k.startswith(f"{base}/wheels/imagepca-{version}-") for k in keys):
        missing.append(f"{base}/wheels/imagepca-{version}-*.whl")
    if missing:
        yield Finding("fail", "artifacts", f"missing in s3://{settings.bucket}: {missing}", fix)
        return
    if not compare:
        yield Finding("ok", "artifacts", f"staged in s3://{settings.bucket}/{base}/")
        return
    stale = []
    for key, path in local.items():
        head = s3.head_object(Bucket=settings.bucket, Key=key)
        if head.get("Metadata", {}).get(SHA256_KEY) != file_sha256(path):
            stale.append(key)
    if stale:
        yield Finding("fail", "artifacts", f"differ from this checkout: {stale}", fix)
    else:
        yield Finding("ok", "artifacts", f"s3://{settings.bucket}/{base}/ matches this checkout")


# EC2's name for an instance type's architecture -> the wheels' (``uname -m`` on the node).
NODE_ARCH = {"x86_64": "x86_64", "arm64": "aarch64"}


def instance_types(config: Mapping[str, Any]) -> list[str]:
    """The instance types a ``RunJobFlow`` request starts: its groups' or its fleets'."""
    instances = config.get("Instances", {})
    types = {group["InstanceType"] for group in instances.get("InstanceGroups", [])}
    for fleet in instances.get("InstanceFleets", []):
        types.update(item["InstanceType"] for item in fleet.get("InstanceTypeConfigs", []))
    return sorted(types)


def check_offline_wheels(
    settings: EmrSettings, clients: Callable[[str], Any], config: Mapping[str, Any]
) -> Iterator[Finding]:
    """With ``"offline": true``, the staged wheels are for every node's architecture.

    The bootstrap installs with ``pip --no-index`` from ``wheels/``: a Graviton node given
    x86_64 wheels fails there, ten minutes into ``emr up``, with a pip error in its logs.
    ``config`` is the request ``emr up`` sends (a custom template may name other types).
    """
    if not settings.offline:
        return
    check = "offline wheels"
    prefix = f"artifacts/{settings.version}/wheels/"
    pages = (
        clients("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=settings.bucket, Prefix=prefix)
    )
    names = [item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])]
    staged = wheel_architectures(names)
    types = instance_types(config)
    try:
        described = clients("ec2").describe_instance_types(InstanceTypes=types)
    except ClientError as error:
        if _denied(error):
            yield _cannot(check, error)
        else:
            yield Finding("fail", check, f"{types}: {_code(error)}",
                          f"use instance types EC2 offers in {settings.region}")  # fmt: skip
        return
    # A type may list several (i386 and x86_64): it is fine when wheels for one are staged.
    runs_on = {
        item["InstanceType"]: [
            NODE_ARCH[arch] for arch in item["ProcessorInfo"]["SupportedArchitectures"]
            if arch in NODE_ARCH
        ]
        for item in described["InstanceTypes"]
    }  # fmt: skip
    missing = {
        name: arches[0] for name, arches in sorted(runs_on.items())
        if arches and not staged.intersection(arches)
    }  # fmt: skip
    if not missing:
        yield Finding("ok", check, f"{', '.join(sorted(staged))} wheels for {types}")
        return
    have = ", ".join(sorted(staged)) or "no platform"
    nodes = ", ".join(f"{name} ({arch})" for name, arch in missing.items())
    downloads = " and ".join(
        f"imagepca emr wheelhouse --arch {arch} DIR" for arch in sorted(set(missing.values()))
    )
    yield Finding(
        "fail", check, f"s3://{settings.bucket}/{prefix} holds {have} wheels; {nodes} nodes "
        "cannot install them offline",
        f"{downloads}, then imagepca emr stage --version {settings.version} --wheelhouse DIR "
        "(or instance types of the staged architecture)",
    )  # fmt: skip


def require(findings: Iterable[Finding], out: TextIO | None = None) -> None:
    """Raise on the first failed finding, with its fix: for commands that must not go on.
    A check that could not be made is printed as a warning."""
    for finding in findings:
        if finding.level == "fail":
            raise AwsError(f"{finding.check}: {finding.detail}; fix: {finding.fix}")
        if finding.level == "warn":
            print(f"warning: {finding.check}: {finding.detail}", file=out or sys.stderr)


def run_checks(
    settings: EmrSettings, *, clients: Callable[[str], Any], project: Path | None = None
) -> list[Finding]:
    """Every check, in the order the deployment needs them."""
    findings = list(check_bucket(settings, clients))
    findings += check_roles(settings, clients)
    findings += check_network(settings, clients)
    findings += check_security_configuration(settings, clients("emr"))
    if findings[0].level == "ok":  # the bucket exists
        findings += check_artifacts(settings, clients("s3"), project)
        findings += check_offline_wheels(settings, clients, render_config(settings))
    return findings


def report(findings: list[Finding], out: TextIO | None = None) -> int:
    """Print one line per finding (and its fix); 1 when any check failed."""
    out = out or sys.stdout
    for finding in findings:
        print(f"[{finding.level.upper():4}] {finding.check}: {finding.detail}", file=out)
        if finding.level != "ok" and finding.fix:
            print(f"       fix: {finding.fix}", file=out)
    failed = sum(f.level == "fail" for f in findings)
    print(f"{len(findings)} checks, {failed} failed", file=out)
    return 1 if failed else 0
