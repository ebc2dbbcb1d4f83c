"""Settings of the AWS side, validated once: what ``aws setup`` creates and what a cluster is.

Why this module exists: every later step (account setup, staging, the cluster, the runs)
reads the same few names (bucket, region, roles, artifacts version). They are typed
dataclasses checked here, at the edge, so a typo in ``emr_settings.json`` fails with the
key's name and the fix before any AWS call, not as a half-created cluster. The helpers
for the ``aws/`` templates and ``s3://`` URIs live here too: every module needs them and
none of them needs anything else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
"""``${NAME}`` placeholders; IAM policy variables such as ``${aws:username}`` are left alone."""

BUCKET_NAME = re.compile(r"^(?!xn--)(?!.*-s3alias$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
BUCKET_NAME_RULE = "3-63 lowercase letters, digits, '.' or '-'"


def valid_bucket_name(name: str) -> bool:
    """S3's rules for a new bucket's name, as ``aws setup`` checks them."""
    return bool(BUCKET_NAME.match(name)) and ".." not in name


REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
ACCOUNT_ID = re.compile(r"^\d{12}$")
KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")
"""A key ARN, never an alias ARN: as the ``Resource`` of a policy, KMS matches key
operations against the key's ARN only, so an alias there grants nothing."""
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
MEMORY = re.compile(r"^\d+[kmgt]$")
DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")

# Tags every cluster carries: the operator policy lets only clusters so tagged be launched
# and operated, and EMR's managed service policy needs the second on what it launches.
EMR_TAG = "for-use-with-amazon-emr-managed-policies"
CLUSTER_TAGS = {"project": "imagepca", EMR_TAG: "true"}
NOTEBOOK_SERVICE_ROLE = "EMR_Notebooks_DefaultRole"
"""The EMR notebooks service role ``emr run --via notebook-execution`` passes, and the one
the operator policy may pass: the default of both settings, so the two agree unless
someone changes one of them."""

DEFAULT_RELEASE_LABEL = "emr-7.12.0"
"""EMR 7.x: Python 3.11 packages from emr-7.1.0; 7.12 ships Livy 0.8 and JupyterHub 1.5."""

HTTPS_LIVY_FROM = (7, 4)
"""From emr-7.4.0, Livy serves HTTPS only when in-transit encryption is on (Release Guide,
"Enabling HTTPS with Apache Livy")."""


class AwsError(RuntimeError):
    """A problem the user can fix; the message says how."""


# The names the two former modules used; one class, so one ``except`` catches both.
SetupError = AwsError
EmrError = AwsError


def repo_root() -> Path:
    """The source tree root (``lib/imagepca/aws/settings.py`` -> ``.``), where ``aws/`` lives."""
    return Path(__file__).resolve().parents[3]


def find_resource(relative: str, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate a shipped template: an explicit path, else the current directory, else the repo.

    Templates are data files of the repository, not of the wheel, so commands that use
    them run from a checkout; ``explicit`` lets a user keep an edited copy elsewhere.
    """
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise AwsError(f"{path} does not exist")
        return path
    for base in (Path.cwd(), repo_root()):
        candidate = base / relative
        if candidate.exists():
            return candidate
    raise AwsError(
        f"cannot find {relative}: run from the imagepca repository root or pass its path"
    )


def render_text(text: str, values: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` placeholders; an unknown name is an error, not a silent blank."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise AwsError(f"no value for placeholder ${{{name}}}")
        return str(values[name])

    return PLACEHOLDER.sub(substitute, text)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into bucket and key prefix (no leading slash)."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise AwsError(f"expected an s3://BUCKET/PREFIX URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise AwsError(f"no bucket in {uri!r}")
    return bucket, key


def package_version() -> str:
    """imagepca's version: installed metadata, else ``pyproject.toml`` of the checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagepca")
    except PackageNotFoundError:
        import tomllib

        pyproject = repo_root() / "pyproject.toml"
        if pyproject.exists():
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        raise AwsError("cannot tell imagepca's version: pass --version") from None


def duration_seconds(text: str) -> int:
    """Seconds in a Livy duration (``90s``, ``30m``, ``1h``); Livy reads the same suffixes."""
    match = DURATION.match(text)
    if not match:
        raise AwsError(f"not a duration like 30m or 1h: {text!r}")
    number, unit = int(match.group(1)), match.group(2)
    return {"ms": number // 1000, "s": number, "m": 60 * number, "h": 3600 * number}.get(
        unit, 86400 * number
    )


@dataclass(frozen=True)
class AwsSettings:
    """What ``aws setup`` creates, validated once at the CLI edge.

    Parameters
    ----------
    bucket, region, account_id : str
        Project bucket, its region and the AWS account that owns the roles.
    kms_key_arn : str or None
        Customer managed KMS key for default bucket encryption and the cluster's EBS
        volumes (the EMR service role and the operator get permission to use it);
        ``None`` means SSE-S3.
    versioning : bool
        Turn on bucket versioning (protects staged artifacts from overwrites).
    service_role, instance_role, instance_profile, operator_policy : str
        IAM names; the defaults match ``emr_settings.example.json``.
    notebook_service_role : str
        EMR notebooks service role the operator may pass to ``StartNotebookExecution``
        (``emr run --via notebook-execution``); not created here (EMR Studio creates it).
    """

    bucket: str
    region: str
    account_id: str
    kms_key_arn: str | None = None
    versioning: bool = False
    service_role: str = "imagepca-emr-service-role"
    instance_role: str = "imagepca-emr-ec2-role"
    instance_profile: str = "imagepca-emr-ec2-profile"
    notebook_service_role: str = NOTEBOOK_SERVICE_ROLE
    operator_policy: str = "imagepca-operator"

    def __post_init__(self) -> None:
        if not valid_bucket_name(self.bucket):
            raise AwsError(f"invalid bucket name {self.bucket!r}: {BUCKET_NAME_RULE}")
        if not REGION_NAME.match(self.region):
            raise AwsError(f"invalid region {self.region!r}, e.g. us-east-1")
        if not ACCOUNT_ID.match(self.account_id):
            raise AwsError(f"invalid account id {self.account_id!r}: 12 digits")
        if self.kms_key_arn is not None and not KMS_KEY_ARN.match(self.kms_key_arn):
            raise AwsError(
                f"invalid KMS key ARN {self.kms_key_arn!r}: pass the key's ARN, "
                "arn:aws:kms:REGION:ACCOUNT:key/KEY_ID, not an alias (a policy naming an "
                "alias grants no use of the key); `aws kms describe-key --key-id alias/NAME "
                "--query KeyMetadata.Arn` prints it"
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
            "NOTEBOOK_SERVICE_ROLE": self.notebook_service_role,
            "KMS_KEY_ARN": self.kms_key_arn or "",
        }


@dataclass(frozen=True)
class EmrSettings:
    """Cluster settings, read from ``emr_settings.json`` and CLI options, validated once.

    Field names are the settings file's keys; see ``emr_settings.example.json``. Two of
    them bound the bill of a forgotten cluster: EMR terminates it ``idle_timeout_seconds``
    after it became idle, and it is idle only once no YARN application runs, so a Livy
    session left open holds it until ``livy_session_timeout`` ends that session.
    """

    bucket: str
    region: str
    subnet_id: str
    key_name: str = ""
    release_label: str = DEFAULT_RELEASE_LABEL
    cluster_name: str = "imagepca"
    primary_instance_type: str = "m5.xlarge"
    core_instance_type: str = "m5.2xlarge"
    core_instance_count: int = 2
    task_instance_type: str = "m5.2xlarge"
    task_instance_count: int = 0
    task_market: str = "SPOT"
    service_role: str = "imagepca-emr-service-role"
    instance_profile: str = "imagepca-emr-ec2-profile"
    notebook_service_role: str = NOTEBOOK_SERVICE_ROLE
    security_configuration: str = ""
    artifacts_version: str = ""
    offline: bool = False
    idle_timeout_seconds: int = 3600
    livy_session_timeout: str = "1h"
    executor_memory: str = "6g"
    executor_memory_overhead: str = "4g"
    executor_cores: int = 2
    arrow_max_records_per_batch: int = 256
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not self.bucket or "/" in self.bucket or self.bucket.startswith("s3:"):
            problems.append(f"bucket must be a bucket name (no s3://), got {self.bucket!r}")
        elif not valid_bucket_name(self.bucket):
            problems.append(f"bucket {self.bucket!r} is not a valid name: {BUCKET_NAME_RULE}")
        if not REGION_NAME.match(self.region):
            problems.append(f"region must look like us-east-1, got {self.region!r}")
        if not re.match(r"^subnet-[0-9a-f]{8,17}$", self.subnet_id):
            problems.append(
                f"subnet_id must be a subnet id (subnet-...), got {self.subnet_id!r}; "
                "tag it and its VPC for-use-with-amazon-emr-managed-policies=true"
            )
        if not re.match(r"^emr-7\.\d+\.\d+$", self.release_label):
            problems.append(f"release_label must be an EMR 7.x label, got {self.release_label!r}")
        elif self.release_minor < 1:
            problems.append("release_label must be emr-7.1.0 or later (Python 3.11)")
        for name in ("primary_instance_type", "core_instance_type", "task_instance_type"):
            if not INSTANCE_TYPE.match(getattr(self, name)):
                problems.append(f"{name} must be an EC2 instance type, got {getattr(self, name)!r}")
        for name, low, high in (
            ("core_instance_count", 1, 256),
            ("task_instance_count", 0, 256),
            ("idle_timeout_seconds", 60, 7 * 24 * 3600),
            ("executor_cores", 1, 64),
            ("arrow_max_records_per_batch", 1, 100_000),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                problems.append(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if self.task_market not in ("SPOT", "ON_DEMAND"):
            problems.append(f"task_market must be SPOT or ON_DEMAND, got {self.task_market!r}")
        for name in ("executor_memory", "executor_memory_overhead"):
            if not MEMORY.match(getattr(self, name)):
                problems.append(f"{name} must look like 6g or 4096m, got {getattr(self, name)!r}")
        if not isinstance(self.livy_session_timeout, str) or not DURATION.match(
            self.livy_session_timeout
        ):
            problems.append(
                f"livy_session_timeout must look like 30m or 1h, got {self.livy_session_timeout!r}"
            )
        if self.artifacts_version and not VERSION_PATTERN.match(self.artifacts_version):
            problems.append(f"artifacts_version is not a version: {self.artifacts_version!r}")
        if not isinstance(self.offline, bool):
            problems.append(f"offline must be true or false, got {self.offline!r}")
        if not isinstance(self.tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()
        ):
            problems.append("tags must be an object of string keys and values")
        else:
            changed = [k for k, v in CLUSTER_TAGS.items() if self.tags.get(k, v) != v]
            if changed:
                problems.append(
                    f"tags may not change {', '.join(changed)}: the operator policy only "
                    f"launches and operates clusters tagged {CLUSTER_TAGS}; use other keys"
                )
        if problems:
            raise AwsError("invalid EMR settings:\n  - " + "\n  - ".join(problems))
        if not self.notebook_service_role:  # the example file's "": the policy's default
            object.__setattr__(self, "notebook_service_role", NOTEBOOK_SERVICE_ROLE)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
    ) -> EmrSettings:
        """Settings from a JSON file (optional) updated with non-``None`` overrides."""
        data = cls.load_raw(path) if path is not None else {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AwsError(f"unknown settings: {', '.join(unknown)} (known: {sorted(known)})")
        missing = [name for name in ("bucket", "region", "subnet_id") if not data.get(name)]
        if missing:
            raise AwsError(f"missing settings: {', '.join(missing)} (settings file or options)")
        return cls(**data)

    @staticmethod
    def load_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The settings file's JSON object, not validated (a command may need one key)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AwsError(
                f"settings file {path} not found: copy emr_settings.example.json "
                "to emr_settings.json and edit it, or pass --settings"
            ) from None
        except json.JSONDecodeError as error:
            raise AwsError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise AwsError(f"{path} must hold a JSON object of settings")
        return data

    @property
    def release_minor(self) -> int:
        """``12`` for ``emr-7.12.0``."""
        return int(self.release_label.split(".")[1])

    @property
    def version(self) -> str:
        """Artifacts version: the settings' value, else the package version."""
        return self.artifacts_version or package_version()

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/artifacts/{self.version}"

    @property
    def longest_idle_billing_seconds(self) -> int:
        """How long a cluster nobody uses can bill: a forgotten Livy session keeps a YARN
        application (so the cluster is not idle) until Livy times it out, then EMR waits
        ``idle_timeout_seconds``."""
        return duration_seconds(self.livy_session_timeout) + self.idle_timeout_seconds

    def placeholders(self) -> dict[str, Any]:
        """Typed values for ``emr_config.json``; ``None`` removes the key or list item."""
        return {
            "BUCKET": self.bucket,
            "REGION": self.region,
            "CLUSTER_NAME": self.cluster_name,
            "RELEASE_LABEL": self.release_label,
            "SUBNET_ID": self.subnet_id,
            "KEY_NAME": self.key_name or None,
            "PRIMARY_INSTANCE_TYPE": self.primary_instance_type,
            "CORE_INSTANCE_TYPE": self.core_instance_type,
            "CORE_INSTANCE_COUNT": self.core_instance_count,
            "TASK_INSTANCE_TYPE": self.task_instance_type,
            "TASK_INSTANCE_COUNT": self.task_instance_count,
            "TASK_MARKET": self.task_market,
            "SERVICE_ROLE": self.service_role,
            "INSTANCE_PROFILE": self.instance_profile,
            "SECURITY_CONFIGURATION": self.security_configuration or None,
            "ARTIFACTS_VERSION": self.version,
            "OFFLINE_FLAG": "--offline" if self.offline else None,
            "IDLE_TIMEOUT_SECONDS": self.idle_timeout_seconds,
            "LIVY_SESSION_TIMEOUT": self.livy_session_timeout,
            "EXECUTOR_MEMORY": self.executor_memory,
            "EXECUTOR_MEMORY_OVERHEAD": self.executor_memory_overhead,
            "EXECUTOR_CORES": str(self.executor_cores),
            "ARROW_MAX_RECORDS_PER_BATCH": str(self.arrow_max_records_per_batch),
        }
