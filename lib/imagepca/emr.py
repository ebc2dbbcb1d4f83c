"""Run imagepca on AWS EMR: render the cluster config, stage artifacts, start, run, stop.

Why this module exists: the EMR cluster is described as data (``emr_config.json``, a
boto3 ``run_job_flow`` request with ``${PLACEHOLDERS}``) so it can be reviewed and checked
against botocore's service model without an AWS account. This module fills the
placeholders from a small settings file (``emr_settings.json``), uploads what the
bootstrap action needs to ``s3://BUCKET/artifacts/VERSION/``, and drives the cluster
with boto3 waiters (their polling interval is a parameter so tests run fast).

Two ways to run the notebooks headlessly:

* an EMR step (``command-runner.jar``) running ``python3.11 -m imagepca run ...`` on the
  primary node, which executes the notebooks with papermill (``--master yarn``);
* ``StartNotebookExecution`` for EMR Studio users (``--via notebook-execution``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import boto3
import botocore.session
from botocore.exceptions import BotoCoreError, ClientError, WaiterError
from botocore.validate import ParamValidator

from imagepca.aws import (
    PLACEHOLDER,
    SetupError,
    find_resource,
    parse_s3_uri,
    render_text,
    repo_root,
    upload,
)
from imagepca.config import IMAGE_SIZES, KERAS_WEIGHTS_FILE

WEIGHTS_FILE = KERAS_WEIGHTS_FILE
BOOTSTRAP_FILES = ("install-python-deps.sh", "requirements-emr.txt")
DEFAULT_RELEASE_LABEL = "emr-7.12.0"
"""EMR 7.x: Python 3.11 packages from emr-7.1.0; 7.12 ships Livy 0.8 and JupyterHub 1.5."""

PRICE_TABLE_DATE = "2024-06"
PRICE_TABLE_REGION = "us-east-1"
PRICES_PER_HOUR: dict[str, tuple[float, float]] = {
    # instance type: (EC2 On-Demand USD/h, EMR uplift USD/h), Linux, us-east-1.
    "m5.xlarge": (0.192, 0.048),
    "m5.2xlarge": (0.384, 0.096),
    "m5.4xlarge": (0.768, 0.192),
    "m6i.xlarge": (0.192, 0.048),
    "m6i.2xlarge": (0.384, 0.096),
    "m6i.4xlarge": (0.768, 0.192),
    "m7g.xlarge": (0.1632, 0.0408),
    "m7g.2xlarge": (0.3264, 0.0816),
    "c5.2xlarge": (0.34, 0.085),
    "c6i.2xlarge": (0.34, 0.085),
    "r5.xlarge": (0.252, 0.063),
    "r5.2xlarge": (0.504, 0.126),
}
"""A small price table for the ``emr up`` estimate. Assumption, not a quote: On-Demand
list prices for us-east-1 as recorded on PRICE_TABLE_DATE; other regions, EBS volumes,
S3 requests, data transfer and Spot discounts are not included. Check
https://aws.amazon.com/emr/pricing/ before relying on it."""

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
MEMORY = re.compile(r"^\d+[kmgt]$")


class EmrError(RuntimeError):
    """A problem the user can act on; the message says what to do."""


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
        raise EmrError("cannot tell imagepca's version: pass --version") from None


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EmrSettings:
    """Cluster settings, read from ``emr_settings.json`` and CLI options, validated once.

    Field names are the settings file's keys; see ``emr_settings.example.json``.
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
    security_configuration: str = ""
    artifacts_version: str = ""
    offline: bool = False
    idle_timeout_seconds: int = 3600
    livy_session_timeout: str = "4h"
    executor_memory: str = "6g"
    executor_memory_overhead: str = "4g"
    executor_cores: int = 2
    arrow_max_records_per_batch: int = 256
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not self.bucket or "/" in self.bucket or self.bucket.startswith("s3:"):
            problems.append(f"bucket must be a bucket name (no s3://), got {self.bucket!r}")
        if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", self.region):
            problems.append(f"region must look like us-east-1, got {self.region!r}")
        if not re.match(r"^subnet-[0-9a-f]{8,17}$", self.subnet_id):
            problems.append(
                f"subnet_id must be a subnet id (subnet-...), got {self.subnet_id!r}; "
                "tag it for-use-with-amazon-emr-managed-policies=true"
            )
        if not re.match(r"^emr-7\.\d+\.\d+$", self.release_label):
            problems.append(f"release_label must be an EMR 7.x label, got {self.release_label!r}")
        else:
            minor = int(self.release_label.split(".")[1])
            if minor < 1:
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
        if self.artifacts_version and not VERSION_PATTERN.match(self.artifacts_version):
            problems.append(f"artifacts_version is not a version: {self.artifacts_version!r}")
        if not isinstance(self.offline, bool):
            problems.append(f"offline must be true or false, got {self.offline!r}")
        if not isinstance(self.tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()
        ):
            problems.append("tags must be an object of string keys and values")
        if problems:
            raise EmrError("invalid EMR settings:\n  - " + "\n  - ".join(problems))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None
    ) -> EmrSettings:
        """Settings from a JSON file (optional) updated with non-``None`` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise EmrError(
                    f"settings file {path} not found: copy emr_settings.example.json "
                    "to emr_settings.json and edit it, or pass --settings"
                ) from None
            except json.JSONDecodeError as error:
                raise EmrError(f"{path} is not valid JSON: {error}") from None
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EmrError(f"unknown settings: {', '.join(unknown)} (known: {sorted(known)})")
        missing = [name for name in ("bucket", "region", "subnet_id") if not data.get(name)]
        if missing:
            raise EmrError(f"missing settings: {', '.join(missing)} (settings file or options)")
        return cls(**data)

    @property
    def version(self) -> str:
        """Artifacts version: the settings' value, else the package version."""
        return self.artifacts_version or package_version()

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/artifacts/{self.version}"

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


_DROP = object()


def _fill(node: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        filled = {key: _fill(value, values) for key, value in node.items()}
        return {key: value for key, value in filled.items() if value is not _DROP}
    if isinstance(node, list):
        return [item for item in (_fill(value, values) for value in node) if item is not _DROP]
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        if whole:
            name = whole.group(1)
            if name not in values:
                raise EmrError(f"no value for placeholder ${{{name}}}")
            return _DROP if values[name] is None else values[name]
        return render_text(node, {k: "" if v is None else str(v) for k, v in values.items()})
    return node


def render_config(settings: EmrSettings, template: str | os.PathLike[str] | None = None) -> dict:
    """The ``run_job_flow`` request: ``emr_config.json`` with the settings filled in.

    A placeholder that is a whole JSON string takes the setting's type (counts become
    integers) and disappears when the setting is empty (no key pair, no security
    configuration, no offline flag); the task group disappears when it has 0 nodes.
    """
    path = find_resource("emr_config.json", template)
    config = _fill(json.loads(path.read_text(encoding="utf-8")), settings.placeholders())
    groups = config.get("Instances", {}).get("InstanceGroups", [])
    config["Instances"]["InstanceGroups"] = [g for g in groups if g.get("InstanceCount", 1) > 0]
    tags = {t["Key"]: t["Value"] for t in config.get("Tags", [])}
    tags.update(settings.tags)
    config["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    validate_request("RunJobFlow", config)
    return config


def validate_request(operation: str, params: Mapping[str, Any]) -> None:
    """Check a request against botocore's EMR model (what boto3 would check before sending).

    Run before every submit so a bad settings file fails here, with the model's message,
    not after a half-created cluster.
    """
    model = botocore.session.get_session().get_service_model("emr")
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(dict(params), shape)
    if report.has_errors():
        raise EmrError(f"invalid {operation} request:\n{report.generate_report()}")


def render_security_configuration(
    kms_key_arn: str, certificates_zip: str, template: str | os.PathLike[str] | None = None
) -> str:
    """``aws/emr-security-configuration.json`` filled in, as the JSON string EMR expects."""
    if not kms_key_arn.startswith("arn:"):
        raise EmrError("a KMS key ARN is required for local-disk encryption (--kms-key)")
    parse_s3_uri(certificates_zip)
    path = find_resource("aws/emr-security-configuration.json", template)
    text = render_text(
        path.read_text(encoding="utf-8"),
        {"KMS_KEY_ARN": kms_key_arn, "TLS_CERTIFICATES_ZIP": certificates_zip},
    )
    return json.dumps(json.loads(text), separators=(",", ":"))


# --------------------------------------------------------------------------- stage


def build_wheel(project: Path, destination: Path) -> Path:
    """``pip wheel --no-deps . -w DIR``: the project's own wheel, dependencies come from pins."""
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(project), "-w", str(destination)],
        check=True,
    )
    wheels = sorted(destination.glob("imagepca-*.whl"))
    if not wheels:
        raise EmrError(f"pip wheel produced no imagepca wheel in {destination}")
    return wheels[-1]


def default_weights() -> Path | None:
    """The Keras cache copy of the MobileNetV2 weights, if present."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    candidate = home / "models" / WEIGHTS_FILE
    return candidate if candidate.exists() else None


def pinned_tensorflow(project: Path) -> str | None:
    """The TensorFlow version the bootstrap installs on x86_64 nodes."""
    text = (project / "bootstrap" / "requirements-emr.txt").read_text()
    match = re.search(r"^tensorflow==([\w.]+);\s*platform_machine == \"x86_64\"", text, re.M)
    return match.group(1) if match else None


def stage(
    bucket: str,
    version: str,
    weights: Path,
    *,
    s3_client: Any,
    project: Path | None = None,
    wheel_builder: Callable[[Path, Path], Path] = build_wheel,
    model_converter: Callable[[Path, int], Path] | None = None,
    image_sizes: Sequence[int] = (224,),
    wheelhouse: Path | None = None,
    out: TextIO | None = None,
) -> dict[str, str]:
    """Upload everything a cluster needs to ``s3://BUCKET/artifacts/VERSION/``.

    Layout: ``wheels/`` (imagepca wheel, plus ``wheelhouse`` wheels for offline
    installs), ``bootstrap/`` (script and pinned requirements), ``notebooks/``,
    ``models/<weights file>`` and ``models/tflite/`` (the tflite engine's model converted
    here for each of ``image_sizes``, so the cluster's driver fetches it instead of
    converting). Unchanged files are skipped, so re-staging is cheap.
    """
    # Here, not at import: the model code pulls in pandas and PySpark, which `emr up`,
    # `run` and `down` do not need.
    from imagepca.features import staged_models_uri, tflite_model_path

    model_converter = model_converter or tflite_model_path
    out = out or sys.stderr
    if not VERSION_PATTERN.match(version):
        raise EmrError(f"invalid version {version!r}")
    weights = Path(weights)
    if not weights.is_file():
        raise EmrError(f"weights file {weights} not found (pass --weights FILE)")
    project = project or repo_root()
    base = f"s3://{bucket}/artifacts/{version}"
    with tempfile.TemporaryDirectory(prefix="imagepca-stage-") as tmp:
        wheel = wheel_builder(project, Path(tmp))
        if not wheel.name.startswith(f"imagepca-{version}-"):
            raise EmrError(
                f"built {wheel.name} but staging version {version}: stage the package's own "
                "version or bump it in pyproject.toml"
            )
        upload(wheel, f"{base}/wheels/", s3_client=s3_client, out=out)
    if wheelhouse:
        upload(wheelhouse, f"{base}/wheels/", s3_client=s3_client, out=out)
    for name in BOOTSTRAP_FILES:
        upload(project / "bootstrap" / name, f"{base}/bootstrap/", s3_client=s3_client, out=out)
    notebooks = project / "notebooks"
    for notebook in sorted(notebooks.glob("*.ipynb")):
        upload(notebook, f"{base}/notebooks/", s3_client=s3_client, out=out)
    upload(weights, f"{base}/models/{WEIGHTS_FILE}", s3_client=s3_client, out=out)
    models = staged_models_uri(f"{base}/models/{WEIGHTS_FILE}")
    for size in image_sizes:
        model = model_converter(weights, size)
        upload(model, f"{models}/{model.name}", s3_client=s3_client, out=out)
    local_tf, cluster_tf = metadata.version("tensorflow"), pinned_tensorflow(project)
    if cluster_tf and local_tf != cluster_tf:
        print(
            f"note: the TFLite model was converted with TensorFlow {local_tf}, the cluster "
            f"installs {cluster_tf}: its driver will not use the staged model and converts "
            "once per node instead (seconds). Stage from an environment with "
            f"tensorflow=={cluster_tf} to avoid that.",
            file=out,
        )
    return {
        "artifacts": base,
        "bootstrap": f"{base}/bootstrap/install-python-deps.sh",
        "notebooks": f"{base}/notebooks",
        "weights": f"{base}/models/{WEIGHTS_FILE}",
        "tflite_models": models,
    }


# --------------------------------------------------------------------------- up / down


@dataclass(frozen=True)
class ClusterInfo:
    """Where to reach a running cluster."""

    cluster_id: str
    state: str
    primary_dns: str

    def tunnel_command(self, key_file: str = "~/.ssh/KEYPAIR.pem") -> str:
        """One SSH tunnel for JupyterHub (9443), Livy (8998), Spark history (18080), YARN."""
        forwards = " ".join(f"-L {p}:localhost:{p}" for p in (9443, 8998, 18080, 8088, 20888))
        return f"ssh -i {key_file} -N {forwards} hadoop@{self.primary_dns}"


def hourly_cost(settings: EmrSettings) -> tuple[float | None, list[str]]:
    """Estimated USD per hour (EC2 + EMR uplift) for all nodes, and lines explaining it."""
    groups = [
        ("primary", settings.primary_instance_type, 1),
        ("core", settings.core_instance_type, settings.core_instance_count),
    ]
    if settings.task_instance_count:
        groups.append(("task", settings.task_instance_type, settings.task_instance_count))
    total = 0.0
    lines = []
    for role, instance_type, count in groups:
        price = PRICES_PER_HOUR.get(instance_type)
        if price is None:
            lines.append(f"  {role}: {count} x {instance_type}: not in the price table")
            return None, lines
        cost = count * (price[0] + price[1])
        total += cost
        lines.append(
            f"  {role}: {count} x {instance_type} x ({price[0]} EC2 + {price[1]} EMR) = "
            f"${cost:.3f}/h"
        )
    lines.append(
        f"  assumption: {PRICE_TABLE_REGION} On-Demand list prices recorded {PRICE_TABLE_DATE}; "
        "excludes EBS, S3, data transfer; Spot task nodes usually cost less"
    )
    return total, lines


def up(
    settings: EmrSettings,
    *,
    emr_client: Any,
    config: Mapping[str, Any] | None = None,
    poll_seconds: float = 30,
    max_attempts: int = 120,
    key_file: str | None = None,
    out: TextIO | None = None,
) -> ClusterInfo:
    """Submit the rendered config, wait until the cluster is ready, print how to reach it."""
    out = out or sys.stdout
    request = dict(config) if config is not None else render_config(settings)
    validate_request("RunJobFlow", request)
    cluster_id = emr_client.run_job_flow(**request)["JobFlowId"]
    print(
        f"cluster {cluster_id} submitted; waiting for WAITING (bootstrap installs "
        "TensorFlow, ~10-15 min)",
        file=out,
    )
    try:
        emr_client.get_waiter("cluster_running").wait(
            ClusterId=cluster_id,
            WaiterConfig={"Delay": poll_seconds, "MaxAttempts": max_attempts},
        )
    except WaiterError as error:
        reason = _state_reason(emr_client, cluster_id)
        raise EmrError(
            f"cluster {cluster_id} did not start: {reason}. Bootstrap logs: "
            f"s3://{settings.bucket}/logs/emr/{cluster_id}/node/*/bootstrap-actions/"
        ) from error
    cluster = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    info = ClusterInfo(
        cluster_id, cluster["Status"]["State"], cluster.get("MasterPublicDnsName", "")
    )
    key = key_file or (f"~/.ssh/{settings.key_name}.pem" if settings.key_name else "KEY.pem")
    print(f"cluster id:        {info.cluster_id} ({info.state})", file=out)
    print(f"primary node:      {info.primary_dns}", file=out)
    print(f"SSH tunnel:        {info.tunnel_command(key)}", file=out)
    print("JupyterHub:        https://localhost:9443 (through the tunnel)", file=out)
    print("Livy:              http://localhost:8998", file=out)
    print("Spark history UI:  http://localhost:18080   YARN: http://localhost:8088", file=out)
    total, lines = hourly_cost(settings)
    estimate = f"${total:.2f}/hour" if total is not None else "unknown"
    print(f"estimated cost:    {estimate}", file=out)
    for line in lines:
        print(line, file=out)
    print(f"stop it with:      imagepca emr down --cluster-id {cluster_id}", file=out)
    return info


def _state_reason(emr_client: Any, cluster_id: str) -> str:
    try:
        status = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
    except ClientError as error:
        return str(error)
    reason = status.get("StateChangeReason", {})
    return f"{status.get('State')} {reason.get('Code', '')} {reason.get('Message', '')}".strip()


def down(
    cluster_id: str,
    *,
    emr_client: Any,
    wait: bool = True,
    poll_seconds: float = 30,
    max_attempts: int = 60,
    out: TextIO | None = None,
) -> None:
    """Terminate the cluster (billing stops when it is TERMINATED)."""
    out = out or sys.stdout
    emr_client.terminate_job_flows(JobFlowIds=[cluster_id])
    print(f"terminating {cluster_id}", file=out)
    if wait:
        emr_client.get_waiter("cluster_terminated").wait(
            ClusterId=cluster_id,
            WaiterConfig={"Delay": poll_seconds, "MaxAttempts": max_attempts},
        )
        print(f"{cluster_id} terminated", file=out)


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class RunOptions:
    """One headless run; options flow to ``imagepca run`` unchanged."""

    input: str
    output: str
    weights: str
    notebooks: str
    k: int | None = None
    variance: float | None = None
    engine: str | None = None
    skip_classify: bool = False

    def __post_init__(self) -> None:
        for name in ("input", "output", "weights", "notebooks"):
            value = getattr(self, name)
            if not value.startswith("s3://"):
                raise EmrError(f"{name} must be an s3:// URI on EMR, got {value!r}")
        if self.k is not None and self.variance is not None:
            raise EmrError("give --k or --variance, not both")


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus 4 random hex digits."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _run_locations(options: RunOptions) -> list[str]:
    """``imagepca run`` options naming where the run reads and writes."""
    return [
        "--notebooks", options.notebooks,
        "--input", options.input,
        "--output", options.output,
        "--weights", options.weights,
    ]  # fmt: skip


def _run_choices(options: RunOptions, *, skip_classify: bool) -> list[str]:
    """``imagepca run`` options for what the user chose (k, variance, engine, notebook 03)."""
    command = []
    if options.k is not None:
        command += ["--k", str(options.k)]
    if options.variance is not None:
        command += ["--variance", str(options.variance)]
    if options.engine:
        command += ["--engine", options.engine]
    if skip_classify:
        command.append("--skip-classify")
    return command


def step_command(options: RunOptions) -> list[str]:
    """The command the EMR step runs on the primary node."""
    return [
        "python3.11", "-m", "imagepca", "run",
        *_run_locations(options),
        "--master", "yarn",
        *_run_choices(options, skip_classify=options.skip_classify),
    ]  # fmt: skip


def step_request(cluster_id: str, options: RunOptions, run_id: str) -> dict[str, Any]:
    """``AddJobFlowSteps`` request for one run (``CONTINUE``: a failed run keeps the cluster)."""
    return {
        "JobFlowId": cluster_id,
        "Steps": [
            {
                "Name": f"imagepca run {run_id}",
                "ActionOnFailure": "CONTINUE",
                "HadoopJarStep": {"Jar": "command-runner.jar", "Args": step_command(options)},
            }
        ],
    }


def run_step(
    cluster_id: str,
    options: RunOptions,
    run_id: str,
    *,
    emr_client: Any,
    s3_client: Any,
    wait: bool = True,
    poll_seconds: float = 30,
    max_attempts: int = 240,
    log_bucket: str | None = None,
    out: TextIO | None = None,
) -> str:
    """Add the step, wait for it, then list the run's outputs; returns the step id."""
    out = out or sys.stdout
    request = step_request(cluster_id, options, run_id)
    validate_request("AddJobFlowSteps", request)
    step_id = emr_client.add_job_flow_steps(**request)["StepIds"][0]
    print(f"step {step_id} on {cluster_id}: {' '.join(step_command(options))}", file=out)
    if not wait:
        return step_id
    try:
        emr_client.get_waiter("step_complete").wait(
            ClusterId=cluster_id,
            StepId=step_id,
            WaiterConfig={"Delay": poll_seconds, "MaxAttempts": max_attempts},
        )
    except WaiterError as error:
        step = emr_client.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
        details = step["Status"].get("FailureDetails", {})
        logs = details.get("LogFile") or (
            f"s3://{log_bucket}/logs/emr/{cluster_id}/steps/{step_id}/" if log_bucket else ""
        )
        raise EmrError(
            f"step {step_id} ended {step['Status']['State']}: "
            f"{details.get('Reason', '')} {details.get('Message', '')} logs: {logs}".strip()
        ) from error
    print(f"step {step_id} completed; outputs:", file=out)
    list_outputs(options.output, s3_client=s3_client, out=out)
    return step_id


def list_outputs(output_uri: str, *, s3_client: Any, out: TextIO | None = None) -> list[str]:
    """Print and return the top-level entries of a run's output (folders end with /)."""
    out = out or sys.stdout
    bucket, prefix = parse_s3_uri(output_uri.rstrip("/") + "/")
    entries = []
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        entries += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", [])]
        entries += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    for entry in sorted(entries):
        print(f"  s3://{bucket}/{prefix}{entry}", file=out)
    return sorted(entries)


def notebook_params(options: RunOptions) -> list[tuple[str, dict[str, Any]]]:
    """Notebook file names with the parameters injected into their ``parameters`` cells.

    Built by :func:`imagepca.runner.plan`, the same function ``imagepca run`` uses, so a
    notebook execution gets exactly the parameters a step run would.
    """
    from imagepca import runner
    from imagepca.config import ExtractParams, ReduceParams

    extract = {"input": options.input, "output": options.output, "weights": options.weights}
    if options.engine:
        extract["engine"] = options.engine
    reduce: dict[str, Any] = {"output": options.output}
    if options.k is not None:
        reduce["k"] = options.k
    if options.variance is not None:
        reduce["variance"] = options.variance
    runs = runner.plan(
        ExtractParams(**extract),
        ReduceParams(**reduce),
        master="yarn",
        classify=not options.skip_classify,
    )
    return [(run.name, run.parameters) for run in runs]


def notebook_execution_requests(
    cluster_id: str,
    options: RunOptions,
    run_id: str,
    service_role: str,
    *,
    security_group: str | None = None,
) -> list[dict[str, Any]]:
    """``StartNotebookExecution`` requests, one per notebook, in run order."""
    notebooks_bucket, notebooks_prefix = parse_s3_uri(options.notebooks.rstrip("/") + "/")
    output_bucket, output_prefix = parse_s3_uri(options.output.rstrip("/") + "/")
    requests = []
    for name, params in notebook_params(options):
        engine: dict[str, Any] = {"Id": cluster_id, "Type": "EMR"}
        if security_group:
            engine["MasterInstanceSecurityGroupId"] = security_group
        request = {
            "NotebookExecutionName": f"imagepca-{run_id}-{name.split('_')[0]}",
            "NotebookS3Location": {"Bucket": notebooks_bucket, "Key": notebooks_prefix + name},
            "ExecutionEngine": engine,
            "NotebookParams": json.dumps(params),
            "OutputNotebookS3Location": {
                "Bucket": output_bucket,
                "Key": f"{output_prefix}notebooks/",
            },
            "OutputNotebookFormat": "HTML",
            "ServiceRole": service_role,
            "Tags": [{"Key": "project", "Value": "imagepca"}, {"Key": "run", "Value": run_id}],
        }
        validate_request("StartNotebookExecution", request)
        requests.append(request)
    return requests


def run_notebook_executions(
    requests: Sequence[Mapping[str, Any]],
    *,
    emr_client: Any,
    poll_seconds: float = 30,
    max_attempts: int = 240,
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
) -> list[str]:
    """Start each notebook after the previous one finished; stop at the first failure.

    botocore has no waiter for notebook executions, hence the polling loop.
    """
    out = out or sys.stdout
    ids = []
    for request in requests:
        execution_id = emr_client.start_notebook_execution(**request)["NotebookExecutionId"]
        ids.append(execution_id)
        print(
            f"notebook execution {execution_id}: {request['NotebookS3Location']['Key']}", file=out
        )
        for _ in range(max_attempts):
            status = emr_client.describe_notebook_execution(NotebookExecutionId=execution_id)[
                "NotebookExecution"
            ]
            state = status["Status"]
            if state == "FINISHED":
                break
            if state in ("FAILED", "STOPPED", "FAILING", "STOPPING"):
                raise EmrError(
                    f"notebook execution {execution_id} {state}: "
                    f"{status.get('LastStateChangeReason', '')}"
                )
            sleep(poll_seconds)
        else:
            raise EmrError(f"notebook execution {execution_id} still running; gave up waiting")
    return ids


# --------------------------------------------------------------------------- CLI


def _settings_from_args(args: argparse.Namespace) -> EmrSettings:
    path = args.settings
    if path is None and Path("emr_settings.json").exists():
        path = "emr_settings.json"
    overrides = {
        "bucket": args.bucket,
        "region": args.region,
        "subnet_id": args.subnet_id,
        "key_name": args.key_name,
        "artifacts_version": args.version,
        "core_instance_count": args.core_count,
        "core_instance_type": args.core_type,
        "primary_instance_type": args.primary_type,
        "task_instance_count": args.task_count,
    }
    return EmrSettings.load(path, overrides)


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override emr_settings.json)")
    group.add_argument("--settings", help="settings JSON (default: ./emr_settings.json)")
    group.add_argument("--bucket")
    group.add_argument("--region")
    group.add_argument("--subnet-id")
    group.add_argument("--key-name", help="EC2 key pair for SSH")
    group.add_argument("--version", help="artifacts version (default: the package version)")
    group.add_argument("--primary-type", help="primary node instance type")
    group.add_argument("--core-type", help="core node instance type")
    group.add_argument("--core-count", type=int, help="number of core nodes")
    group.add_argument("--task-count", type=int, help="number of task nodes (Spot by default)")


def _add_wait_options(parser: argparse.ArgumentParser, default_attempts: int) -> None:
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="status polling interval (default 30)"
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=default_attempts,
        help=f"polls before giving up (default {default_attempts})",
    )


def _emr_client(region: str) -> Any:
    return boto3.client("emr", region_name=region)


def _s3_client(region: str) -> Any:
    return boto3.client("s3", region_name=region)


def _guard(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (EmrError, SetupError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except (ClientError, BotoCoreError) as error:
            print(f"error: AWS said: {error}", file=sys.stderr)
            return 1

    return wrapped


def _cmd_render(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    print(json.dumps(render_config(settings, args.config), indent=2))
    return 0


def _cmd_security_config(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    certs = args.certs or f"s3://{settings.bucket}/artifacts/security/emr-tls-certs.zip"
    definition = render_security_configuration(args.kms_key, certs)
    name = settings.security_configuration or "imagepca-security"
    if args.dry_run:
        import shlex

        print(shlex.join([
            "aws", "emr", "create-security-configuration", "--name", name,
            "--security-configuration", definition, "--region", settings.region,
        ]))  # fmt: skip
        return 0
    _emr_client(settings.region).create_security_configuration(
        Name=name, SecurityConfiguration=definition
    )
    print(
        f'security configuration {name} created; set "security_configuration": '
        f'"{name}" in emr_settings.json'
    )
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    weights = Path(args.weights) if args.weights else default_weights()
    if weights is None:
        raise EmrError(
            f"no --weights given and {WEIGHTS_FILE} is not in the Keras cache "
            "(~/.keras/models/); pass --weights PATH"
        )
    uris = stage(
        settings.bucket,
        settings.version,
        weights,
        s3_client=_s3_client(settings.region),
        image_sizes=_image_sizes(args.image_sizes),
        wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
    )
    for name, uri in uris.items():
        print(f"{name}: {uri}")
    return 0


def _image_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size not in IMAGE_SIZES for size in sizes):
        raise EmrError(
            f"--image-sizes must be a comma-separated list of sizes from {IMAGE_SIZES}, "
            f"got {text!r}"
        )
    return sizes


def _cmd_up(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    config = render_config(settings, args.config)
    up(
        settings,
        emr_client=_emr_client(settings.region),
        config=config,
        poll_seconds=args.poll_seconds,
        max_attempts=args.max_attempts,
        key_file=args.key_file,
    )
    return 0


def _run_options(args: argparse.Namespace, settings: EmrSettings, run_id: str) -> RunOptions:
    base = settings.artifacts_uri
    return RunOptions(
        input=args.input or f"s3://{settings.bucket}/input/",
        output=args.output or f"s3://{settings.bucket}/runs/{run_id}",
        weights=args.weights or f"{base}/models/{WEIGHTS_FILE}",
        notebooks=f"{base}/notebooks",
        k=args.k,
        variance=args.variance,
        engine=args.engine,
        skip_classify=args.skip_classify,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    run_id = args.run_id or new_run_id()
    options = _run_options(args, settings, run_id)
    emr = _emr_client(settings.region)
    print(f"run id: {run_id}")
    if args.via == "notebook-execution":
        if not options.skip_classify and not _s3_exists(
            _s3_client(settings.region), f"{options.notebooks}/03_classify.ipynb"
        ):
            options = RunOptions(**{**vars(options), "skip_classify": True})
        requests = notebook_execution_requests(
            args.cluster_id, options, run_id,
            args.notebook_service_role or settings.service_role,
            security_group=args.master_security_group,
        )  # fmt: skip
        run_notebook_executions(
            requests, emr_client=emr, poll_seconds=args.poll_seconds,
            max_attempts=args.max_attempts,
        )  # fmt: skip
        list_outputs(options.output, s3_client=_s3_client(settings.region))
        return 0
    if args.via == "livy":
        return _run_via_livy(args, options, settings)
    run_step(
        args.cluster_id, options, run_id,
        emr_client=emr, s3_client=_s3_client(settings.region), wait=not args.no_wait,
        poll_seconds=args.poll_seconds, max_attempts=args.max_attempts,
        log_bucket=settings.bucket,
    )  # fmt: skip
    return 0


def _run_via_livy(args: argparse.Namespace, options: RunOptions, settings: EmrSettings) -> int:
    """papermill here, cells on the cluster: the PySpark kernel through Livy (SSH tunnel)."""
    from .cli import main as imagepca_main

    skip_classify = options.skip_classify or not _s3_exists(
        _s3_client(settings.region), f"{options.notebooks}/03_classify.ipynb"
    )
    command = [
        "run", "--kernel", "pysparkkernel", "--livy-url", args.livy_url,
        *_run_locations(options),
        *_run_choices(options, skip_classify=skip_classify),
    ]  # fmt: skip
    status = imagepca_main(command)
    if status == 0:
        list_outputs(options.output, s3_client=_s3_client(settings.region))
    return status


def _s3_exists(s3_client: Any, uri: str) -> bool:
    bucket, key = parse_s3_uri(uri)
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def _cmd_down(args: argparse.Namespace) -> int:
    region = args.region
    if region is None:
        region = _settings_from_args(args).region
    down(
        args.cluster_id, emr_client=_emr_client(region), wait=not args.no_wait,
        poll_seconds=args.poll_seconds, max_attempts=args.max_attempts,
    )  # fmt: skip
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``emr`` command group to the imagepca CLI."""
    parser = subparsers.add_parser(
        "emr",
        help="stage artifacts, start an EMR cluster, run the notebooks on it, stop it",
        description="Run imagepca on AWS EMR 7.x (see docs/emr.md).",
    )
    commands = parser.add_subparsers(dest="emr_command", metavar="COMMAND")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])

    render = commands.add_parser(
        "render", help="print the run_job_flow request built from emr_config.json + settings"
    )
    _add_settings_options(render)
    render.add_argument("--config", help="cluster template (default: ./emr_config.json)")
    render.set_defaults(func=_guard(_cmd_render))

    security = commands.add_parser(
        "security-config",
        help="create the EMR security configuration (encryption at rest/in transit, IMDSv2)",
        description=(
            "Create the security configuration from aws/emr-security-configuration.json: "
            "S3 SSE-S3 and KMS local-disk/EBS encryption at rest, TLS in transit from a PEM "
            "certificate zip in S3, IMDSv2 required on all nodes."
        ),
    )
    _add_settings_options(security)
    security.add_argument("--kms-key", required=True, help="KMS key ARN for local disks")
    security.add_argument(
        "--certs", help="s3:// zip of PEM certificates (default: artifacts/security/...)"
    )
    security.add_argument("--dry-run", action="store_true", help="print the aws CLI command")
    security.set_defaults(func=_guard(_cmd_security_config))

    stage_parser = commands.add_parser(
        "stage",
        help="build the wheel and upload it, bootstrap, notebooks, weights to S3",
        description=(
            "Build imagepca's wheel (pip wheel --no-deps) and upload it with the bootstrap "
            "script, pinned requirements, notebooks and MobileNetV2 weights to "
            "s3://BUCKET/artifacts/VERSION/."
        ),
    )
    _add_settings_options(stage_parser)
    stage_parser.add_argument("--weights", help=f"local {WEIGHTS_FILE} (default: Keras cache)")
    stage_parser.add_argument(
        "--wheelhouse", help="folder of dependency wheels to stage too (offline bootstrap)"
    )
    stage_parser.add_argument(
        "--image-sizes",
        default="224",
        help="input sizes to stage a converted TFLite model for, comma-separated (default 224)",
    )
    stage_parser.set_defaults(func=_guard(_cmd_stage))

    up_parser = commands.add_parser(
        "up", help="start the cluster and wait until it is ready",
        description="Render emr_config.json, submit it, wait for WAITING, print addresses.",
    )  # fmt: skip
    _add_settings_options(up_parser)
    up_parser.add_argument("--config", help="cluster template (default: ./emr_config.json)")
    up_parser.add_argument("--key-file", help="private key path shown in the SSH command")
    _add_wait_options(up_parser, 120)
    up_parser.set_defaults(func=_guard(_cmd_up))

    run_parser = commands.add_parser(
        "run", help="run the notebooks headlessly on a cluster and list the outputs",
        description=(
            "Run both notebooks on the cluster: as an EMR step running "
            "`python3.11 -m imagepca run ... --master yarn` (default), or as EMR Studio "
            "notebook executions (--via notebook-execution)."
        ),
    )  # fmt: skip
    _add_settings_options(run_parser)
    run_parser.add_argument("--cluster-id", required=True)
    run_parser.add_argument("--input", help="s3:// input (default: s3://BUCKET/input/)")
    run_parser.add_argument("--output", help="s3:// output (default: s3://BUCKET/runs/RUN_ID)")
    run_parser.add_argument("--run-id", help="run id (default: UTC time + random suffix)")
    run_parser.add_argument("--weights", help="s3:// weights (default: the staged weights)")
    choice = run_parser.add_mutually_exclusive_group()
    choice.add_argument("--k", type=int, help="number of PCA components")
    choice.add_argument("--variance", type=float, help="explained-variance threshold")
    run_parser.add_argument("--engine", choices=("keras", "tflite"))
    run_parser.add_argument("--skip-classify", action="store_true")
    run_parser.add_argument(
        "--via",
        choices=("step", "notebook-execution", "livy"),
        default="step",
        help="step: papermill on the primary node (EMR step); notebook-execution: EMR "
        "StartNotebookExecution; livy: papermill here with the PySpark kernel over Livy",
    )
    run_parser.add_argument(
        "--livy-url",
        default="http://localhost:8998",
        help="Livy URL for --via livy (default: the SSH tunnel that `emr up` prints)",
    )
    run_parser.add_argument("--notebook-service-role", help="service role for notebook runs")
    run_parser.add_argument("--master-security-group", help="notebook-execution engine SG")
    run_parser.add_argument("--no-wait", action="store_true", help="submit and return")
    _add_wait_options(run_parser, 240)
    run_parser.set_defaults(func=_guard(_cmd_run))

    down_parser = commands.add_parser("down", help="terminate the cluster")
    _add_settings_options(down_parser)
    down_parser.add_argument("--cluster-id", required=True)
    down_parser.add_argument("--no-wait", action="store_true")
    _add_wait_options(down_parser, 60)
    down_parser.set_defaults(func=_guard(_cmd_down))


__all__ = [
    "ClusterInfo",
    "EmrError",
    "EmrSettings",
    "RunOptions",
    "add_commands",
    "down",
    "hourly_cost",
    "list_outputs",
    "notebook_execution_requests",
    "render_config",
    "run_notebook_executions",
    "run_step",
    "stage",
    "step_command",
    "up",
    "validate_request",
]
