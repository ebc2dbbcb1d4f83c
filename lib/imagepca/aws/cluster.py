"""Step 3: the cluster's life cycle (``emr render``, ``security-config``, ``up``, ``down``).

Why this module exists: the EMR cluster is described as data (``emr_config.json``, a boto3
``run_job_flow`` request with ``${PLACEHOLDERS}``) so it can be reviewed and checked
against botocore's service model without an AWS account. This module fills it from the
settings, submits it, waits with boto3's waiters (their polling interval is a parameter so
tests run fast) and prints how to reach the cluster: which depends on its security
configuration, since with in-transit encryption EMR 7.4+ serves Livy over HTTPS only and
moves the Spark history server to port 18480.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import botocore.session
from botocore.exceptions import ClientError, WaiterError
from botocore.validate import ParamValidator

from .settings import (
    CLUSTER_TAGS,
    HTTPS_LIVY_FROM,
    PLACEHOLDER,
    AwsError,
    EmrSettings,
    find_resource,
    parse_s3_uri,
    render_text,
)

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
                raise AwsError(f"no value for placeholder ${{{name}}}")
            return _DROP if values[name] is None else values[name]
        return render_text(node, {k: "" if v is None else str(v) for k, v in values.items()})
    return node


REQUIRED_TEMPLATE_KEYS = ("Name", "ReleaseLabel", "Instances", "JobFlowRole", "ServiceRole")


def render_config(settings: EmrSettings, template: str | os.PathLike[str] | None = None) -> dict:
    """The ``run_job_flow`` request: ``emr_config.json`` with the settings filled in.

    A placeholder that is a whole JSON string takes the setting's type (counts become
    integers) and disappears when the setting is empty (no key pair, no security
    configuration, no offline flag); the task group disappears when it has 0 nodes.
    """
    path = find_resource("emr_config.json", template)
    try:
        template_request = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AwsError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(template_request, dict):
        raise AwsError(f"{path} must be a JSON object: the RunJobFlow request")
    # What `emr up` sets from the settings; a template without them would drop them silently.
    missing = [key for key in REQUIRED_TEMPLATE_KEYS if key not in template_request]
    if missing:
        raise AwsError(
            f"{path} has no {', '.join(missing)}: keep the keys of the project's "
            "emr_config.json (their ${...} placeholders take the settings' values)"
        )
    config = _fill(template_request, settings.placeholders())
    instances = config.get("Instances", {})
    if "InstanceGroups" in instances:  # a template may use instance fleets instead
        # A count that is not a number is left for validate_request to name.
        instances["InstanceGroups"] = [
            group
            for group in instances["InstanceGroups"]
            if not isinstance(group.get("InstanceCount"), int) or group["InstanceCount"] > 0
        ]
    tags = {t["Key"]: t["Value"] for t in config.get("Tags", [])}
    tags.update({**settings.tags, **CLUSTER_TAGS})  # whatever a custom template says
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
        raise AwsError(f"invalid {operation} request:\n{report.generate_report()}")


def render_security_configuration(
    kms_key_arn: str, certificates_zip: str, template: str | os.PathLike[str] | None = None
) -> str:
    """``aws/emr-security-configuration.json`` filled in, as the JSON string EMR expects."""
    if not kms_key_arn.startswith("arn:"):
        raise AwsError("a KMS key ARN is required for local-disk encryption (--kms-key)")
    parse_s3_uri(certificates_zip)
    path = find_resource("aws/emr-security-configuration.json", template)
    text = render_text(
        path.read_text(encoding="utf-8"),
        {"KMS_KEY_ARN": kms_key_arn, "TLS_CERTIFICATES_ZIP": certificates_zip},
    )
    return json.dumps(json.loads(text), separators=(",", ":"))


# EMR's PEM certificate provider reads these names, exactly, at the zip's top level; a
# trustedCertificates.pem is needed too unless a CA Java trusts signed the certificate
# (docs: "Providing certificates for encrypting data in transit").
REQUIRED_CERTIFICATES = ("privateKey.pem", "certificateChain.pem")
TRUSTED_CERTIFICATES = "trustedCertificates.pem"
MAX_CERTIFICATES_ZIP_BYTES = 1 << 20  # PEM files are kilobytes


def check_certificates_zip(s3_client: Any, uri: str) -> list[str]:
    """The names in the certificates zip at ``uri``, once it is seen to hold what EMR needs.

    A security configuration names the zip without EMR reading it: a missing or wrong zip
    would fail only the cluster that uses it, at start-up.
    """
    bucket, key = parse_s3_uri(uri)
    how = "make it as docs/emr.md (section 6) shows, or pass --certs"
    try:
        size = s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise AwsError(f"no certificates zip at {uri}: {how}") from None
        if code in ("403", "AccessDenied"):  # HeadObject's error has no body: "403 Forbidden"
            raise AwsError(
                f"your credentials may not read {uri} (403 Forbidden), which this check of its "
                "certificates needs: allow them s3:GetObject on it (the cluster's instance "
                "role needs it too). Without s3:ListBucket on the bucket, S3 also answers 403 "
                "for a key that does not exist: check the --certs key"
            ) from None
        raise
    if size > MAX_CERTIFICATES_ZIP_BYTES:
        raise AwsError(f"{uri} ({size:,} bytes) is not a zip of PEM certificates: {how}")
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    except zipfile.BadZipFile:
        raise AwsError(f"{uri} is not a zip file: {how}") from None
    missing = [name for name in REQUIRED_CERTIFICATES if name not in names]
    if missing:
        raise AwsError(
            f"{uri} has no {' or '.join(missing)} at its top level (it holds "
            f"{', '.join(names) or 'nothing'}): EMR reads PEM files named exactly "
            f"{', '.join(REQUIRED_CERTIFICATES)} and, for a certificate no CA Java trusts "
            f"signed, {TRUSTED_CERTIFICATES}: {how}"
        )
    return names


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Endpoints:
    """How the cluster's web endpoints answer, which its security configuration decides."""

    in_transit_encryption: bool = False
    https_livy: bool = False

    @property
    def livy_url(self) -> str:
        return f"{'https' if self.https_livy else 'http'}://localhost:8998"

    @property
    def history_port(self) -> int:
        """Spark history server: 18080, or 18480 over TLS with in-transit encryption."""
        return 18480 if self.in_transit_encryption else 18080


def endpoints(settings: EmrSettings, emr_client: Any) -> Endpoints:
    """The endpoints a cluster from ``settings`` will have; checks the named security
    configuration exists (``RunJobFlow`` would fail on it only after validation)."""
    name = settings.security_configuration
    if not name:
        return Endpoints()
    try:
        described = emr_client.describe_security_configuration(Name=name)
    except ClientError as error:
        raise AwsError(
            f"security configuration {name!r} does not exist in {settings.region} "
            f"({error.response.get('Error', {}).get('Code')}): create it with `imagepca emr "
            'security-config --kms-key KEY_ARN`, or set "security_configuration": "" in '
            "emr_settings.json to start a cluster without one"
        ) from None
    definition = json.loads(described["SecurityConfiguration"])
    encryption = definition.get("EncryptionConfiguration", {})
    in_transit = bool(encryption.get("EnableInTransitEncryption"))
    release = (7, settings.release_minor)
    return Endpoints(in_transit, https_livy=in_transit and release >= HTTPS_LIVY_FROM)


@dataclass(frozen=True)
class ClusterInfo:
    """Where to reach a running cluster."""

    cluster_id: str
    state: str
    primary_dns: str
    endpoints: Endpoints = Endpoints()

    def tunnel_command(self, key_file: str = "~/.ssh/KEYPAIR.pem") -> str:
        """One SSH tunnel for JupyterHub (9443), Livy (8998), Spark history, YARN (8088)."""
        ports = (9443, 8998, self.endpoints.history_port, 8088, 20888)
        forwards = " ".join(f"-L {p}:localhost:{p}" for p in ports)
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


def idle_billing_text(settings: EmrSettings) -> str:
    """What auto-termination promises, including the forgotten-Livy-session case."""
    idle_h = settings.idle_timeout_seconds / 3600
    worst_h = settings.longest_idle_billing_seconds / 3600
    return (
        f"terminates itself {idle_h:g} h after it becomes idle (no YARN application, "
        f"no step); a Livy/JupyterHub session left open keeps it busy until Livy ends the "
        f"session ({settings.livy_session_timeout} without statements), so an unused "
        f"cluster bills at most ~{worst_h:g} h"
    )


# --------------------------------------------------------------------------- up / down


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
    reach = endpoints(settings, emr_client)
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
        raise AwsError(
            f"cluster {cluster_id} did not start: {reason}. Bootstrap logs: "
            f"s3://{settings.bucket}/logs/emr/{cluster_id}/node/*/bootstrap-actions/ "
            f"(stop billing: imagepca emr down --cluster-id {cluster_id})"
        ) from error
    cluster = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    info = ClusterInfo(
        cluster_id, cluster["Status"]["State"], cluster.get("MasterPublicDnsName", ""), reach
    )
    key = key_file or (f"~/.ssh/{settings.key_name}.pem" if settings.key_name else "KEY.pem")
    history = reach.history_port
    print(f"cluster id:        {info.cluster_id} ({info.state})", file=out)
    print(f"primary node:      {info.primary_dns}", file=out)
    print(f"SSH tunnel:        {info.tunnel_command(key)}", file=out)
    print("JupyterHub:        https://localhost:9443 (through the tunnel)", file=out)
    print(f"Livy:              {reach.livy_url}", file=out)
    if reach.https_livy:
        print(
            "                   HTTPS with your in-transit certificate: pass "
            "--livy-ca-bundle CERT.pem (docs/livy.md)",
            file=out,
        )
    scheme = "https" if reach.in_transit_encryption else "http"
    print(
        f"Spark history UI:  {scheme}://localhost:{history}   YARN: http://localhost:8088",
        file=out,
    )
    total, lines = hourly_cost(settings)
    estimate = f"${total:.2f}/hour" if total is not None else "unknown"
    print(f"estimated cost:    {estimate}", file=out)
    for line in lines:
        print(line, file=out)
    print(f"auto-termination:  {idle_billing_text(settings)}", file=out)
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
    """Terminate the cluster (billing stops when it is TERMINATED).

    A cluster that failed (a bootstrap action, say: ``up`` then says to run ``down``) ends
    ``TERMINATED_WITH_ERRORS``, on which botocore's waiter fails; it is terminated all the
    same, so that counts as done, with EMR's reason printed.
    """
    out = out or sys.stdout
    emr_client.terminate_job_flows(JobFlowIds=[cluster_id])
    print(f"terminating {cluster_id}", file=out)
    if not wait:
        return
    try:
        emr_client.get_waiter("cluster_terminated").wait(
            ClusterId=cluster_id,
            WaiterConfig={"Delay": poll_seconds, "MaxAttempts": max_attempts},
        )
    except WaiterError:
        status = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
        if status["State"] != "TERMINATED_WITH_ERRORS":
            raise
        reason = status.get("StateChangeReason", {})
        print(
            f"{cluster_id} terminated with errors: "
            f"{reason.get('Code', '')} {reason.get('Message', '')}".strip(),
            file=out,
        )
        return
    print(f"{cluster_id} terminated", file=out)
