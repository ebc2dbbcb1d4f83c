"""`imagepca emr ...`: config rendering checked against botocore's model, and the
stage / up / run / down cycle against a moto server over real HTTP."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError, WaiterError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from botocore.validate import ParamValidator

from imagepca import features
from imagepca.aws import cluster, commands, runs, stage
from imagepca.aws import status as emr_status
from imagepca.aws.settings import AwsError, AwsSettings, EmrSettings
from imagepca.config import SPARK_SETTINGS
from imagepca.weights import WeightsError
from livy_server import LivyServer, make_test_pki
from moto_server import REGION, aws_env, moto_endpoint, set_step_states, stubbed  # noqa: F401

BUCKET = "imagepca-test-bucket"
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "bucket": BUCKET,
    "region": REGION,
    "subnet_id": "subnet-0123456789abcdef0",
    "key_name": "my-key",
    "artifacts_version": "0.1.0",
}


def settings(**changes) -> EmrSettings:
    return EmrSettings.load(None, {**SETTINGS, **changes})


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def model_errors(operation: str, params: dict) -> str:
    model = botocore.session.get_session().get_service_model("emr")
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


# --------------------------------------------------------------------------- render


def test_rendered_config_is_a_valid_run_job_flow_request():
    config = cluster.render_config(settings(security_configuration="imagepca-security"))
    assert model_errors("RunJobFlow", config) == ""
    assert "${" not in json.dumps(config)
    assert config["ReleaseLabel"].startswith("emr-7.")
    assert [a["Name"] for a in config["Applications"]] == [
        "Spark", "Livy", "JupyterHub", "JupyterEnterpriseGateway",
    ]  # fmt: skip
    groups = {g["InstanceRole"]: g for g in config["Instances"]["InstanceGroups"]}
    assert set(groups) == {"MASTER", "CORE"}  # no task nodes by default
    assert groups["CORE"]["InstanceCount"] == 2 and groups["CORE"]["InstanceType"] == "m5.2xlarge"
    assert config["Instances"]["Ec2KeyName"] == "my-key"
    assert config["SecurityConfiguration"] == "imagepca-security"
    assert config["AutoTerminationPolicy"] == {"IdleTimeout": 3600}
    assert config["LogUri"] == f"s3://{BUCKET}/logs/emr/"
    tags = {t["Key"]: t["Value"] for t in config["Tags"]}
    assert tags["for-use-with-amazon-emr-managed-policies"] == "true"

    by_class = {c["Classification"]: c for c in config["Configurations"]}
    for env in ("spark-env", "livy-env"):
        (export,) = by_class[env]["Configurations"]
        assert export["Classification"] == "export"
        assert export["Properties"]["PYSPARK_PYTHON"] == "/usr/bin/python3.11"
    spark = by_class["spark-defaults"]["Properties"]
    assert spark["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert spark["spark.sql.execution.arrow.maxRecordsPerBatch"] == "256"
    assert spark["spark.python.worker.reuse"] == "true"
    # Every session on the cluster (JupyterHub's PySpark kernel's too) gets what get_spark
    # gives the sessions it builds.
    assert {key: spark.get(key) for key in SPARK_SETTINGS} == SPARK_SETTINGS
    assert spark["spark.executor.memoryOverhead"] == "4g"
    livy_conf = by_class["livy-conf"]["Properties"]
    # A forgotten session ends after 1 h without statements; a long cell is not cut.
    assert livy_conf["livy.server.session.timeout"] == "1h"
    assert livy_conf["livy.server.session.timeout-check.skip-busy"] == "true"
    assert by_class["jupyter-s3-conf"]["Properties"] == {
        "s3.persistence.enabled": "true",
        "s3.persistence.bucket": BUCKET,
    }
    magic = by_class["jupyter-sparkmagic-conf"]["Properties"]
    assert magic["all_errors_are_fatal"] == "true"
    assert all(
        isinstance(v, str) for c in config["Configurations"] for v in c["Properties"].values()
    )

    (action,) = config["BootstrapActions"]
    script = action["ScriptBootstrapAction"]
    assert script["Path"] == f"s3://{BUCKET}/artifacts/0.1.0/bootstrap/install-python-deps.sh"
    assert script["Args"] == ["--artifacts", f"s3://{BUCKET}/artifacts/0.1.0", "--version", "0.1.0"]


def test_optional_parts_of_the_config(tmp_path):
    config = cluster.render_config(
        settings(
            key_name="", security_configuration="", offline=True, task_instance_count=3,
            tags={"team": "vision"},
        )
    )  # fmt: skip
    assert model_errors("RunJobFlow", config) == ""
    assert "Ec2KeyName" not in config["Instances"]
    assert "SecurityConfiguration" not in config
    assert config["BootstrapActions"][0]["ScriptBootstrapAction"]["Args"][-1] == "--offline"
    task = [g for g in config["Instances"]["InstanceGroups"] if g["InstanceRole"] == "TASK"]
    assert task == [
        {
            "Name": "task-spot",
            "InstanceRole": "TASK",
            "Market": "SPOT",
            "InstanceType": "m5.2xlarge",
            "InstanceCount": 3,
        }
    ]
    assert {"Key": "team", "Value": "vision"} in config["Tags"]

    # The tags the operator policy launches and operates clusters by: refused in the
    # settings, and restored over a custom template that drops or changes them.
    with pytest.raises(AwsError, match="tags may not change project: the operator policy"):
        settings(tags={"project": "vision", "for-use-with-amazon-emr-managed-policies": "true"})
    template = json.loads((ROOT / "emr_config.json").read_text())
    template["Tags"] = [{"Key": "project", "Value": "other"}]
    (tmp_path / "emr_config.json").write_text(json.dumps(template))
    config = cluster.render_config(settings(), tmp_path / "emr_config.json")
    tags = {t["Key"]: t["Value"] for t in config["Tags"]}
    assert tags == {"project": "imagepca", "for-use-with-amazon-emr-managed-policies": "true"}


def test_a_template_with_instance_fleets_gets_no_instance_groups(tmp_path):
    template = json.loads((ROOT / "emr_config.json").read_text())
    instances = template["Instances"]
    subnet = instances.pop("Ec2SubnetId")
    instances.pop("InstanceGroups")
    instances["Ec2SubnetIds"] = [subnet]
    instances["InstanceFleets"] = [
        {
            "InstanceFleetType": role,
            "TargetOnDemandCapacity": 1,
            "InstanceTypeConfigs": [{"InstanceType": "m5.xlarge"}, {"InstanceType": "m6i.xlarge"}],
        }
        for role in ("MASTER", "CORE")
    ]
    (tmp_path / "fleets.json").write_text(json.dumps(template))
    config = cluster.render_config(settings(), tmp_path / "fleets.json")
    assert model_errors("RunJobFlow", config) == ""
    assert "InstanceGroups" not in config["Instances"]
    assert config["Instances"]["Ec2SubnetIds"] == [SETTINGS["subnet_id"]]


def test_a_broken_template_is_named_with_what_is_wrong(tmp_path):
    """Not a traceback, and not a request that silently drops a setting."""
    path = tmp_path / "emr_config.json"
    template = json.loads((ROOT / "emr_config.json").read_text())
    cases = {
        '{"Name": "x",}': f"{path} is not valid JSON: Expecting property name",
        "[]": f"{path} must be a JSON object: the RunJobFlow request",
        json.dumps({k: v for k, v in template.items() if k != "ReleaseLabel"}): (
            f"{path} has no ReleaseLabel: keep the keys"
        ),
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(AwsError, match=re.escape(message)):
            cluster.render_config(settings(), path)
    template["Instances"]["InstanceGroups"][1]["InstanceCount"] = "one"
    path.write_text(json.dumps(template))
    with pytest.raises(AwsError, match=r"InstanceGroups\[1\]\.InstanceCount, value: one"):
        cluster.render_config(settings(), path)


def test_settings_are_validated_once_with_actionable_messages(tmp_path):
    with pytest.raises(AwsError) as error:
        settings(subnet_id="vpc-123", core_instance_count=0, release_label="emr-6.15.0")
    message = str(error.value)
    assert "subnet_id" in message and "core_instance_count" in message
    assert "EMR 7.x" in message
    # The name `aws setup` would refuse to create (doctor's fix would be that command).
    with pytest.raises(AwsError, match="bucket 'My_Bucket' is not a valid name: 3-63 lowercase"):
        settings(bucket="My_Bucket")
    with pytest.raises(AwsError, match="unknown settings: colour"):
        EmrSettings.load(None, {**SETTINGS, "colour": "red"})
    with pytest.raises(AwsError, match="emr_settings.example.json"):
        EmrSettings.load(tmp_path / "missing.json")


def test_example_settings_file_renders():
    example = EmrSettings.load(ROOT / "emr_settings.example.json", {"artifacts_version": "1"})
    assert model_errors("RunJobFlow", cluster.render_config(example)) == ""
    # Row 13: the example names no security configuration (optional, created separately).
    assert example.security_configuration == ""
    assert "SecurityConfiguration" not in cluster.render_config(example)
    # Row 12: idle timeout + Livy session timeout bound an unused cluster's bill.
    assert example.longest_idle_billing_seconds == 2 * 3600


def test_render_command_prints_the_request(capsys):
    argv = ["emr", "render", "--bucket", BUCKET, "--region", REGION, "--version", "0.1.0"]
    assert cli(*argv, "--subnet-id", SETTINGS["subnet_id"]) == 0
    assert json.loads(capsys.readouterr().out)["Name"] == "imagepca"


def test_security_configuration_enables_encryption_and_imdsv2():
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    definition = json.loads(cluster.render_security_configuration(key, f"s3://{BUCKET}/certs.zip"))
    encryption = definition["EncryptionConfiguration"]
    assert encryption["EnableAtRestEncryption"] and encryption["EnableInTransitEncryption"]
    at_rest = encryption["AtRestEncryptionConfiguration"]
    # No EMRFS mode: its header would override the bucket's default key (SSE-KMS with
    # `aws setup --kms-key`); every object gets the bucket's default encryption instead.
    assert "S3EncryptionConfiguration" not in at_rest
    assert at_rest["LocalDiskEncryptionConfiguration"]["AwsKmsKey"] == key
    tls = encryption["InTransitEncryptionConfiguration"]["TLSCertificateConfiguration"]
    assert tls["S3Object"] == f"s3://{BUCKET}/certs.zip"
    imds = definition["InstanceMetadataServiceConfiguration"]
    assert imds["MinimumInstanceMetadataServiceVersion"] == 2
    # Row 15: JupyterHub runs in a Docker container on the primary node and saves notebooks
    # to S3 with the instance profile: one more network hop than the host.
    assert imds["HttpPutResponseHopLimit"] == 2
    request = {"Name": "imagepca-security", "SecurityConfiguration": json.dumps(definition)}
    assert model_errors("CreateSecurityConfiguration", request) == ""


def certificates_zip(*names: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, "-----BEGIN CERTIFICATE-----\n")
    return buffer.getvalue()


@pytest.mark.usefixtures("aws_env")
def test_security_config_command_checks_the_certificates_then_creates_it(capsys):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    argv = ["emr", "security-config", "--bucket", BUCKET, "--region", REGION, "--kms-key", key]
    argv += ["--subnet-id", SETTINGS["subnet_id"]]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    certs = "artifacts/security/emr-tls-certs.zip"  # where docs/emr.md uploads it

    def refused() -> str:
        assert cli(*argv) == 1
        with pytest.raises(ClientError, match="does not exist"):  # not created
            boto3.client("emr").describe_security_configuration(Name="imagepca-security")
        return capsys.readouterr().err

    assert f"error: no certificates zip at s3://{BUCKET}/{certs}: make it" in refused()
    s3.put_object(Bucket=BUCKET, Key=certs, Body=b"-----BEGIN PRIVATE KEY-----")
    assert "is not a zip file" in refused()
    s3.put_object(Bucket=BUCKET, Key=certs, Body=certificates_zip("certs/privateKey.pem"))
    error = refused()
    assert "has no privateKey.pem or certificateChain.pem at its top level" in error
    assert "(it holds certs/privateKey.pem)" in error

    s3.put_object(
        Bucket=BUCKET, Key=certs, Body=certificates_zip("privateKey.pem", "certificateChain.pem")
    )
    assert cli(*argv) == 0
    described = boto3.client("emr").describe_security_configuration(Name="imagepca-security")
    assert "InstanceMetadataServiceConfiguration" in described["SecurityConfiguration"]
    assert f"s3://{BUCKET}/{certs}" in described["SecurityConfiguration"]
    printed = capsys.readouterr()
    assert "has no trustedCertificates.pem: its certificate must be signed by a CA" in printed.out
    assert printed.err == ""
    # A zip the nodes' instance profile may not read: created, with a warning.
    s3.put_object(Bucket=BUCKET, Key="security/certs.zip", Body=certificates_zip(
        "privateKey.pem", "certificateChain.pem", "trustedCertificates.pem"
    ))  # fmt: skip
    other = ["--certs", f"s3://{BUCKET}/security/certs.zip"]
    boto3.client("emr").delete_security_configuration(Name="imagepca-security")
    assert cli(*argv, *other) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith(f"warning: the nodes read s3://{BUCKET}/security/certs.zip")
    assert f"only s3://{BUCKET}/input/, s3://{BUCKET}/artifacts/, " in printed.err
    assert "trustedCertificates" not in printed.out


def test_a_certificates_zip_the_credentials_may_not_read_is_named_with_the_permission():
    """HeadObject's 403 has no body (botocore's message is "Forbidden"): the error says
    whose permission is missing, and which."""
    s3 = stubbed("s3")
    uri = f"s3://{BUCKET}/artifacts/security/emr-tls-certs.zip"
    with Stubber(s3) as stub:
        stub.add_client_error("head_object", "403", "Forbidden", http_status_code=403)
        with pytest.raises(AwsError) as refused:
            cluster.check_certificates_zip(s3, uri)
    assert str(refused.value).startswith(f"your credentials may not read {uri} (403 Forbidden)")
    assert "s3:GetObject" in str(refused.value)


def test_cost_estimate_uses_the_dated_price_table():
    total, lines = cluster.hourly_cost(settings(task_instance_count=1))
    assert total == pytest.approx(1 * 0.24 + 2 * 0.48 + 1 * 0.48)
    assert cluster.PRICE_TABLE_DATE in lines[-1]
    unknown, lines = cluster.hourly_cost(settings(core_instance_type="x9.huge"))
    assert unknown is None and "not in the price table" in lines[-1]


# --------------------------------------------------------------------------- stage


def fake_wheel_builder(project: Path, destination: Path) -> Path:
    wheel = destination / "imagepca-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK fake wheel")
    return wheel


def fake_model_converter(weights: Path, image_size: int) -> Path:
    model = weights.parent / f"mobilenetv2-test-{image_size}.tflite"
    model.write_bytes(b"TFL3 fake model")
    return model


@pytest.mark.usefixtures("aws_env")
def test_stage_uploads_the_artifacts_layout(tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    weights = tmp_path / "tiny.h5"
    weights.write_bytes(b"not really weights")
    uris = stage.stage(
        BUCKET, "0.1.0", weights, s3_client=s3, wheel_builder=fake_wheel_builder,
        model_converter=fake_model_converter, image_sizes=(224, 160), out=io.StringIO(),
    )  # fmt: skip
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    base = "artifacts/0.1.0/"
    expected = {
        base + "wheels/imagepca-0.1.0-py3-none-any.whl",
        base + "bootstrap/install-python-deps.sh",
        base + "bootstrap/requirements-emr.txt",
        base + f"models/{stage.WEIGHTS_FILE}",
        base + "models/tflite/mobilenetv2-test-224.tflite",
        base + "models/tflite/mobilenetv2-test-160.tflite",
    } | {
        base + folder + "/" + p.name
        for p in (ROOT / "notebooks").glob("*.ipynb")
        for folder in ("notebooks", stage.PYSPARK_NOTEBOOKS)
    }
    assert keys == expected
    # Row 7: the notebook-execution copies run in the PySpark kernel (the Studio python3
    # kernel is /emr/notebook-env, without imagepca); the rest of the notebook is unchanged.
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        staged = json.loads(
            s3.get_object(Bucket=BUCKET, Key=f"{base}{stage.PYSPARK_NOTEBOOKS}/{path.name}")[
                "Body"
            ].read()
        )
        original = json.loads(path.read_text())
        assert staged["metadata"]["kernelspec"]["name"] == "pysparkkernel"
        assert staged["metadata"]["language_info"]["name"] == "python"
        assert staged["cells"] == original["cells"]
    assert uris["weights"] == f"s3://{BUCKET}/{base}models/{stage.WEIGHTS_FILE}"
    # The driver looks for converted models beside the weights it is given.
    assert uris["tflite_models"] == features.staged_models_uri(uris["weights"])

    with pytest.raises(AwsError, match="staging version 9.9"):
        stage.stage(
            BUCKET, "9.9", weights, s3_client=s3, wheel_builder=fake_wheel_builder,
            model_converter=fake_model_converter,
        )  # fmt: skip


@pytest.mark.usefixtures("aws_env")
def test_stage_checks_the_weights_before_it_uploads_anything(tmp_path):
    """A wrong --weights file would have replaced the staged weights before its conversion
    failed."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    weights = tmp_path / "hosts.h5"
    weights.write_bytes(b"127.0.0.1 localhost\n")
    with pytest.raises(WeightsError, match="is not a readable HDF5 file.*Pass --weights"):
        stage.stage(BUCKET, "0.1.0", weights, s3_client=s3, wheel_builder=fake_wheel_builder)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


@pytest.mark.usefixtures("aws_env")
def test_restage_sends_an_edited_file_of_the_same_size(tmp_path):
    """Row 14: artifacts are compared by content, not size: a pin edited in place keeps
    its length and must still reach the bucket."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "bootstrap", project / "bootstrap")
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    weights = tmp_path / "tiny.h5"
    weights.write_bytes(b"not really weights")

    def restage() -> str:
        out = io.StringIO()
        stage.stage(
            BUCKET, "0.1.0", weights, s3_client=s3, project=project,
            wheel_builder=fake_wheel_builder, model_converter=fake_model_converter, out=out,
        )  # fmt: skip
        return out.getvalue()

    restage()
    assert "s3://" not in restage()  # nothing changed: every file skipped
    requirements = project / "bootstrap" / "requirements-emr.txt"
    before = requirements.read_text()
    after = before.replace("pandas==2.3.3", "pandas==2.3.2")
    assert after != before and len(after) == len(before)
    requirements.write_text(after)
    printed = restage()
    assert "bootstrap/requirements-emr.txt" in printed
    key = "artifacts/0.1.0/bootstrap/requirements-emr.txt"
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode() == after
    assert "bootstrap/install-python-deps.sh" not in printed  # unchanged: skipped


def test_stage_pins_the_clusters_tensorflow():
    """The staged model's name carries the converter's version: staging must know the
    cluster's, which the bootstrap's requirements pin."""
    assert stage.pinned_tensorflow(ROOT) == "2.21.0"


def test_stage_refuses_unknown_image_sizes():
    assert commands._image_sizes("224,160") == [224, 160]
    for text in ("225", "224,", "big"):
        with pytest.raises(AwsError, match="--image-sizes"):
            commands._image_sizes(text)


@pytest.mark.usefixtures("aws_env")
def test_stage_command_needs_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    argv = ["emr", "stage", "--bucket", BUCKET, "--region", REGION]
    assert cli(*argv, "--subnet-id", SETTINGS["subnet_id"]) == 1
    assert "pass --weights" in capsys.readouterr().err


# --------------------------------------------------------------------------- up/run/down


def start_cluster(**changes) -> tuple[EmrSettings, str, str]:
    chosen = settings(**changes)
    out = io.StringIO()
    info = cluster.up(chosen, emr_client=boto3.client("emr"), poll_seconds=0.05, out=out)
    return chosen, info.cluster_id, out.getvalue()


@pytest.mark.usefixtures("aws_env")
def test_up_submits_the_rendered_config_and_waits_for_waiting():
    chosen, cluster_id, printed = start_cluster()
    described = boto3.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert described["Status"]["State"] == "WAITING"
    assert {a["Name"] for a in described["Applications"]} >= {"Spark", "Livy", "JupyterHub"}
    assert described["ReleaseLabel"] == chosen.release_label
    assert {c["Classification"] for c in described["Configurations"]} >= {
        "spark-env", "livy-env", "spark-defaults", "jupyter-s3-conf",
    }  # fmt: skip
    actions = boto3.client("emr").list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
    assert actions[0]["ScriptPath"].endswith("/bootstrap/install-python-deps.sh")
    assert cluster_id in printed
    assert "-L 9443:localhost:9443" in printed and "-L 8998:localhost:8998" in printed
    assert "https://localhost:9443" in printed and "ssh -i ~/.ssh/my-key.pem" in printed
    assert "estimated cost:    $1.20/hour" in printed
    # No security configuration: plain-HTTP Livy and the history server on 18080.
    assert "Livy:              http://localhost:8998" in printed
    assert "-L 18080:localhost:18080" in printed
    # 1 h idle timeout + 1 h Livy session timeout: the bill of a forgotten session.
    assert "bills at most ~2 h" in printed


@pytest.mark.usefixtures("aws_env")
def test_up_refuses_a_security_configuration_that_does_not_exist():
    """Row 13: a named security configuration must exist before RunJobFlow."""
    with pytest.raises(AwsError, match="imagepca-security' does not exist.*security-config"):
        start_cluster(security_configuration="imagepca-security")
    assert boto3.client("emr").list_clusters()["Clusters"] == []


@pytest.mark.usefixtures("aws_env")
@pytest.mark.parametrize(
    ("release", "livy"), [("emr-7.12.0", "https://localhost:8998"), ("emr-7.3.0", "http://")]
)
def test_up_with_in_transit_encryption_prints_the_https_endpoints(release, livy):
    """Row 6: with in-transit encryption EMR 7.4+ serves Livy over HTTPS only and the
    Spark history server listens on 18480."""
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    definition = cluster.render_security_configuration(key, f"s3://{BUCKET}/certs.zip")
    boto3.client("emr").create_security_configuration(
        Name="imagepca-security", SecurityConfiguration=definition
    )
    _, _, printed = start_cluster(security_configuration="imagepca-security", release_label=release)
    assert f"Livy:              {livy}" in printed
    assert "-L 18480:localhost:18480" in printed and "https://localhost:18480" in printed
    assert ("--livy-ca-bundle" in printed) == livy.startswith("https")


def expected_command(run_id: str) -> list[str]:
    return [
        "python3.11", "-m", "imagepca", "run",
        "--notebooks", f"s3://{BUCKET}/artifacts/0.1.0/notebooks",
        "--input", f"s3://{BUCKET}/input/photos/",
        "--output", f"s3://{BUCKET}/runs/{run_id}",
        "--weights", f"s3://{BUCKET}/artifacts/0.1.0/models/{stage.WEIGHTS_FILE}",
        "--master", "yarn",
        "--k", "8",
        "--engine", "keras",
        # The settings' arrow_max_records_per_batch: notebook 01's own parameter would
        # otherwise override the cluster's spark-defaults.
        "--max-records-per-batch", "256",
    ]  # fmt: skip


def end_steps_soon(cluster_id: str, state: str) -> threading.Thread:
    """Move the cluster's steps to ``state`` once there are any (under load the command may
    take seconds to add its step), from a thread, as the cluster would."""

    def end() -> None:
        for _ in range(400):
            time.sleep(0.05)
            if set_step_states(cluster_id, state):
                return

    thread = threading.Thread(target=end, daemon=True)
    thread.start()
    return thread


@pytest.mark.usefixtures("aws_env")
def test_up_refuses_before_the_artifacts_are_staged(capsys):
    """Every node would fail its bootstrap ten minutes in, on a cluster already billed."""
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    code = cli(
        "emr", "up", "--bucket", BUCKET, "--region", REGION,
        "--subnet-id", SETTINGS["subnet_id"], "--version", "0.1.0",
    )  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: artifacts: missing in s3://{BUCKET}: ['artifacts/0.1.0/")
    assert error.endswith("fix: imagepca emr stage --version 0.1.0")
    assert boto3.client("emr").list_clusters()["Clusters"] == []


@pytest.mark.usefixtures("aws_env")
def test_run_adds_the_step_waits_and_lists_outputs(capsys):
    _, cluster_id, _ = start_cluster()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for key in ("features/part-0.parquet", "metrics.json", "_SUCCESS"):
        s3.put_object(Bucket=BUCKET, Key=f"runs/r1/{key}", Body=b"x")

    finisher = end_steps_soon(cluster_id, "COMPLETED")  # what the cluster would do
    code = cli(
        "emr", "run", "--cluster-id", cluster_id, "--run-id", "r1",
        "--bucket", BUCKET, "--region", REGION, "--subnet-id", SETTINGS["subnet_id"],
        "--version", "0.1.0", "--input", f"s3://{BUCKET}/input/photos/",
        "--k", "8", "--engine", "keras", "--poll-seconds", "0.05",
    )  # fmt: skip
    finisher.join()
    assert code == 0
    (step,) = boto3.client("emr").list_steps(ClusterId=cluster_id)["Steps"]
    assert step["Config"]["Jar"] == "command-runner.jar"
    assert step["Config"]["Args"] == expected_command("r1")
    assert step["ActionOnFailure"] == "CONTINUE"
    out = capsys.readouterr().out
    for entry in ("features/", "metrics.json", "_SUCCESS"):
        assert f"s3://{BUCKET}/runs/r1/{entry}" in out


@pytest.mark.usefixtures("aws_env")
@pytest.mark.parametrize(
    "options, message",
    [
        (["--k", "0"], "error: --k must be an integer from 1 to 1280"),
        (["--variance", "2.5"], "error: --variance must be a fraction in"),
        (["--output", f"s3://{BUCKET}/input/photos/out"], "--output must not be inside input"),
        (["--batch-size", "0"], "error: --batch-size must be an integer from 1 to 4096, got 0"),
        (["--max-rejected-fraction", "1.5"], "error: --max-rejected-fraction must be a number"),
        (["--test-fraction", "0"], "error: --test-fraction must be a fraction strictly between"),
    ],
)
def test_run_refuses_impossible_parameters_before_adding_a_step(options, message, capsys):
    """A step carries the notebooks' parameters to the cluster's `imagepca run`: checked
    here, as the other two ways of running check them, not there after a step's start."""
    _, cluster_id, _ = start_cluster()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    code = cli(
        "emr", "run", "--cluster-id", cluster_id, "--run-id", "r3", "--bucket", BUCKET,
        "--region", REGION, "--subnet-id", SETTINGS["subnet_id"], "--version", "0.1.0",
        "--input", f"s3://{BUCKET}/input/photos/", "--no-wait", *options,
    )  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err
    assert boto3.client("emr").list_steps(ClusterId=cluster_id)["Steps"] == []


@pytest.mark.usefixtures("aws_env")
def test_run_reports_a_failed_step(capsys):
    _, cluster_id, _ = start_cluster()
    options = runs.RunOptions(
        input=f"s3://{BUCKET}/input/", output=f"s3://{BUCKET}/runs/r2",
        weights=f"s3://{BUCKET}/w.h5", notebooks=f"s3://{BUCKET}/artifacts/0.1.0/notebooks",
    )  # fmt: skip
    client = boto3.client("emr")

    end_steps_soon(cluster_id, "FAILED")
    with pytest.raises(AwsError, match="ended FAILED"):
        runs.run_step(
            cluster_id, options, "r2", emr_client=client, s3_client=boto3.client("s3"),
            poll_seconds=0.05, max_attempts=400, log_bucket=BUCKET, out=io.StringIO(),
        )  # fmt: skip


@pytest.fixture
def tls_livy(tmp_path):
    """The Livy test server over HTTPS with a CA made for this test (EMR 7.4+ with
    in-transit encryption serves Livy so)."""
    pki = make_test_pki(tmp_path / "pki")
    with LivyServer(tmp_path / "livy", tls=pki, max_lifetime=120) as server:
        yield server, pki


@pytest.mark.usefixtures("aws_env")
def test_run_via_livy_over_https_with_a_ca_bundle(tls_livy, monkeypatch, capsys):
    """papermill here with the PySpark kernel; the CA bundle reaches Livy's REST calls and
    the kernel (REQUESTS_CA_BUNDLE, which sparkmagic's requests session reads)."""
    from imagepca import console, runner

    server, pki = tls_livy
    _, cluster_id, _ = start_cluster()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="runs/r3/_SUCCESS", Body=b"")
    seen = {}

    def run_notebooks(runs_, output, *, notebooks, kernel, env, execution_timeout):
        seen.update(runs=runs_, output=output, notebooks=notebooks, kernel=kernel, env=env)
        seen["execution_timeout"] = execution_timeout
        conf = json.loads((Path(env["SPARKMAGIC_CONF_DIR"]) / "config.json").read_text())
        seen["ignore_ssl_errors"] = conf["ignore_ssl_errors"]
        spec = Path(env["JUPYTER_PATH"].split(os.pathsep)[0], "kernels", kernel, "kernel.json")
        seen["kernel_env"] = json.loads(spec.read_text())["env"]
        return {}

    monkeypatch.setattr(runner, "run_notebooks", run_notebooks)
    monkeypatch.setattr(console, "summary", lambda metrics, output: "summary")
    base = [
        "emr", "run", "--cluster-id", cluster_id, "--run-id", "r3", "--via", "livy",
        "--bucket", BUCKET, "--region", REGION, "--subnet-id", SETTINGS["subnet_id"],
        "--version", "0.1.0", "--input", f"s3://{BUCKET}/input/photos/", "--k", "8",
        "--livy-url", server.url,
    ]  # fmt: skip
    assert cli(*base) == 1  # the test CA is not trusted by default
    assert "--livy-ca-bundle" in capsys.readouterr().err
    assert cli(*base, "--livy-ca-bundle", str(pki.ca), "--execution-timeout", "900") == 0
    assert seen["kernel"] == "pysparkkernel" and seen["execution_timeout"] == 900
    # The kernel's environment has the bundle (its kernelspec); this process's does not,
    # or botocore and papermill's S3 client would trust Livy's certificate alone.
    assert "REQUESTS_CA_BUNDLE" not in seen["env"]
    assert seen["kernel_env"]["REQUESTS_CA_BUNDLE"] == str(pki.ca.resolve())
    assert seen["ignore_ssl_errors"] is False
    assert seen["output"] == f"s3://{BUCKET}/runs/r3"
    assert [r.name for r in seen["runs"]] == ["01_extract_features.ipynb", "02_reduce_pca.ipynb"]
    assert seen["runs"][1].parameters["k"] == 8  # 03_classify.ipynb is not staged here
    assert all(r.parameters["master"] is None for r in seen["runs"])
    assert f"s3://{BUCKET}/runs/r3/_SUCCESS" in capsys.readouterr().out
    assert boto3.client("emr").list_steps(ClusterId=cluster_id)["Steps"] == []

    seen.clear()
    assert cli(*base, "--livy-insecure") == 0  # the loud opt-out
    assert "REQUESTS_CA_BUNDLE" not in seen["kernel_env"] and seen["ignore_ssl_errors"] is True
    assert capsys.readouterr().err.count("TLS certificate verification for Livy") == 2


@pytest.mark.usefixtures("aws_env")
def test_notebook_execution_passes_the_notebooks_service_role_the_policy_allows():
    """Row 7: never the cluster's service role; the PySpark-kernel copies are run. The
    default role is the one `aws setup` lets the operator policy pass."""
    argv = [
        "emr", "run", "--cluster-id", "j-1", "--via", "notebook-execution", "--bucket", BUCKET,
        "--region", REGION, "--subnet-id", SETTINGS["subnet_id"], "--version", "0.1.0",
    ]  # fmt: skip
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    parser = argparse.ArgumentParser(prog="imagepca")
    commands.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    policy = AwsSettings(bucket=BUCKET, region=REGION, account_id="123456789012")
    assert settings().notebook_service_role == policy.notebook_service_role
    assert policy.notebook_service_role == "EMR_Notebooks_DefaultRole"
    # emr_settings.example.json's "" means the default as well.
    assert settings(notebook_service_role="").notebook_service_role == "EMR_Notebooks_DefaultRole"

    options = commands._run_options(args, settings(), "r9")
    assert options.notebooks == f"s3://{BUCKET}/artifacts/0.1.0/{stage.PYSPARK_NOTEBOOKS}"
    (request, *_) = runs.notebook_execution_requests(
        "j-1", options, "r9", "EMR_Notebooks_DefaultRole"
    )
    assert request["NotebookS3Location"]["Key"].startswith("artifacts/0.1.0/notebooks-pyspark/")
    assert request["ServiceRole"] == "EMR_Notebooks_DefaultRole"
    with pytest.raises(AwsError, match="notebooks service role.*EMR_Notebooks_DefaultRole"):
        runs.notebook_execution_requests("j-1", options, "r9", "")


def test_run_options_flow_unchanged():
    options = runs.RunOptions(
        input="s3://b/in/", output="s3://b/runs/x", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/1/notebooks", variance=0.9, skip_classify=True,
    )  # fmt: skip
    assert runs.step_command(options)[-3:] == ["--variance", "0.9", "--skip-classify"]
    with pytest.raises(AwsError, match="s3://"):
        runs.RunOptions(input="/local", output="s3://b/o", weights="s3://b/w", notebooks="s3://b/n")


@pytest.mark.usefixtures("aws_env")
def test_run_passes_the_tuning_options_on_to_the_clusters_imagepca_run():
    """What `imagepca run` takes, `emr run` passes on (a 0 as well: it is a value); the
    options not given are left to the cluster's `imagepca run` defaults."""
    _, cluster_id, _ = start_cluster()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    code = cli(
        "emr", "run", "--cluster-id", cluster_id, "--run-id", "r4", "--bucket", BUCKET,
        "--region", REGION, "--subnet-id", SETTINGS["subnet_id"], "--version", "0.1.0",
        "--input", f"s3://{BUCKET}/input/photos/", "--output", f"s3://{BUCKET}/runs/r1",
        "--no-wait", "--reuse-features", "--k", "8", "--max-rejected-fraction", "0",
        "--image-size", "160", "--fast-decode", "--projection-points", "800",
        "--k-values", "2,10", "--seed", "0", "--execution-timeout", "3600",
    )  # fmt: skip
    assert code == 0
    (step,) = boto3.client("emr").list_steps(ClusterId=cluster_id)["Steps"]
    args = step["Config"]["Args"]
    tail = args[args.index("--max-records-per-batch") + 2 :]
    assert tail == [
        "--image-size", "160", "--fast-decode", "--max-rejected-fraction", "0.0",
        "--reuse-features", "--projection-points", "800", "--seed", "0", "--k-values", "2,10",
        "--execution-timeout", "3600",
    ]  # fmt: skip
    # The step's command line is `imagepca run`'s: it parses back to the same options.
    from imagepca.cli import build_parser

    parsed = build_parser().parse_args(args[3:])
    assert (parsed.seed, parsed.k_values, parsed.max_rejected_fraction) == (0, [2, 10], 0.0)
    options = runs.RunOptions(
        input=f"s3://{BUCKET}/input/photos/", output=f"s3://{BUCKET}/runs/r1",
        weights=f"s3://{BUCKET}/w.h5", notebooks=f"s3://{BUCKET}/n",
        tuning={"reuse_features": True, "max_rejected_fraction": 0.0, "projection_points": 800,
                "k_values": [10, 2]},
    )  # fmt: skip
    extract, reduce, classify = (run.parameters for run in runs.notebook_runs(options))
    assert extract["reuse_features"] is True and extract["max_rejected_fraction"] == 0.0
    assert reduce["projection_points"] == 800 and "projection_points" not in extract
    assert classify["k_values"] == [2, 10] and classify["seed"] == 42


def test_run_options_carry_a_manifest_and_incremental():
    listed = runs.RunOptions(
        input=None, manifest="s3://b/inventory/manifest.json", output="s3://b/runs/x",
        weights="s3://b/w.h5", notebooks="s3://b/artifacts/1/notebooks", incremental=True,
    )  # fmt: skip
    command = runs.step_command(listed)
    assert "--input" not in command and command[-1] == "--incremental"
    assert command[command.index("--manifest") + 1] == "s3://b/inventory/manifest.json"
    extract = runs.notebook_runs(listed)[0].parameters
    assert extract["manifest"] == "s3://b/inventory/manifest.json" and extract["input"] is None
    assert extract["incremental"] is True
    batch = runs.RunOptions(**{**vars(listed), "max_records_per_batch": 64})
    assert runs.notebook_runs(batch)[0].parameters["max_records_per_batch"] == 64
    assert runs.step_command(batch)[-2:] == ["--max-records-per-batch", "64"]
    with pytest.raises(AwsError, match="not both"):
        runs.RunOptions(
            input="s3://b/in/", manifest="s3://b/m.csv", output="s3://b/o", weights="s3://b/w",
            notebooks="s3://b/n",
        )  # fmt: skip


@pytest.mark.usefixtures("aws_env")
def test_run_refuses_options_it_would_ignore(capsys):
    common = [
        "--bucket", BUCKET, "--region", REGION, "--subnet-id", SETTINGS["subnet_id"],
        "--version", "0.1.0",
    ]  # fmt: skip
    refused = {
        ("--cluster-id", "j-1", "--incremental"): "--incremental featurizes what changed",
        ("--cluster-id", "j-1", "--reuse-features"): "--reuse-features keeps the features of",
        ("--cluster-id", "j-1", "--execution-timeout", "0"): "--execution-timeout 0: give a",
        ("--cluster-id", "j-1", "--via", "notebook-execution", "--execution-timeout", "60"): (
            "--execution-timeout applies to --via step and livy"
        ),
        ("--cluster-id", "j-1", "--via", "livy", "--no-wait"): "--no-wait applies to --via step",
        ("--cluster-id", "j-1", "--livy-url", "http://localhost:8998"): (
            "--livy-url applies to --via livy only; this run is --via step"
        ),
        ("--via", "livy", "--notebook-service-role", "r"): (
            "--notebook-service-role applies to --via notebook-execution only"
        ),
        ("--via", "notebook-execution"): "--via notebook-execution needs --cluster-id",
        ("--via", "step"): "--via step needs --cluster-id",
    }
    for argv, message in refused.items():
        assert cli("emr", "run", *argv, *common) == 1
        assert message in capsys.readouterr().err
    # A parameter refused exits 2, as with `imagepca run`.
    assert cli("emr", "run", "--cluster-id", "j-1", "--skip-classify", "--seed", "3", *common) == 2
    assert "--seed set notebook 03, which --skip-classify leaves out" in capsys.readouterr().err


def test_run_warns_of_locations_the_nodes_role_cannot_reach():
    def options(**changes) -> runs.RunOptions:
        values = {
            "input": f"s3://{BUCKET}/input/", "output": f"s3://{BUCKET}/runs/r1",
            "weights": f"s3://{BUCKET}/artifacts/0.1.0/models/w.h5",
            "notebooks": f"s3://{BUCKET}/artifacts/0.1.0/notebooks",
        }  # fmt: skip
        return runs.RunOptions(**{**values, **changes})

    assert runs.outside_instance_role(options(), BUCKET) == []
    # An earlier run's outputs are readable: runs/ is read-write.
    assert runs.outside_instance_role(options(input=f"s3://{BUCKET}/runs/r0/x/"), BUCKET) == []
    warnings = runs.outside_instance_role(
        options(
            input=None, manifest="s3://inventory-bucket/b/config/2026/manifest.json",
            output=f"s3://{BUCKET}/results/r1", weights=f"s3://{BUCKET}/models/w.h5",
        ),
        BUCKET,
    )  # fmt: skip
    assert [w.split()[0] for w in warnings] == ["--manifest", "--weights", "--output"]
    assert all("aws/emr-instance-role-policy.json" in w for w in warnings)


@pytest.mark.usefixtures("aws_env")
def test_down_needs_only_a_region(tmp_path, monkeypatch, capsys):
    """The command that stops the billing works from a settings file without a subnet, or
    from AWS_REGION alone."""
    _, cluster_id, _ = start_cluster()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emr_settings.json").write_text(json.dumps({"region": REGION}))
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert cli("emr", "down", "--cluster-id", cluster_id, "--poll-seconds", "0.05") == 0
    assert f"{cluster_id} terminated" in capsys.readouterr().out
    (tmp_path / "emr_settings.json").unlink()
    monkeypatch.setenv("AWS_REGION", REGION)
    assert cli("emr", "down", "--cluster-id", cluster_id, "--poll-seconds", "0.05") == 0


@pytest.mark.usefixtures("aws_env")
def test_down_terminates(capsys):
    _, cluster_id, _ = start_cluster()
    argv = ["emr", "down", "--cluster-id", cluster_id, "--region", REGION]
    assert cli(*argv, "--poll-seconds", "0.05") == 0
    state = boto3.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
    assert state["State"] == "TERMINATED"
    assert f"{cluster_id} terminated" in capsys.readouterr().out


@pytest.mark.usefixtures("aws_env")
def test_status_shows_the_cluster_and_whether_each_runs_output_is_complete(capsys):
    """After `emr run --no-wait`: the cluster's state and billing, and per run its step,
    its output and whether that output is complete; a failed step's logs."""
    _, cluster_id, _ = start_cluster()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    argv = ["emr", "status", "--cluster-id", cluster_id, "--region", REGION]
    assert cli(*argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{cluster_id} (") and ": WAITING\n" in printed
    assert f"stop it with `imagepca emr down --cluster-id {cluster_id}`" in printed
    assert "no steps" in printed

    start = [
        "emr", "run", "--cluster-id", cluster_id, "--bucket", BUCKET, "--region", REGION,
        "--subnet-id", SETTINGS["subnet_id"], "--version", "0.1.0",
        "--input", f"s3://{BUCKET}/input/photos/", "--no-wait",
    ]  # fmt: skip
    assert cli(*start, "--run-id", "r1") == 0
    assert cli(*start, "--run-id", "r2") == 0
    assert set_step_states(cluster_id) == 2  # both COMPLETED; only r1's output is complete
    s3.put_object(Bucket=BUCKET, Key="runs/r1/_SUCCESS", Body=b"")
    capsys.readouterr()
    assert cli(*argv) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = {line.split()[3]: line for line in lines if "imagepca run r" in line}
    assert steps["r1:"].endswith(f"s3://{BUCKET}/runs/r1: complete")
    assert steps["r2:"].endswith(f"s3://{BUCKET}/runs/r2: no _SUCCESS, not complete")

    set_step_states(cluster_id, "FAILED")
    assert cli(*argv, "--bucket", BUCKET) == 0
    failed = [line for line in capsys.readouterr().out.splitlines() if ": FAILED" in line]
    assert len(failed) == 2
    assert all(f"; logs: s3://{BUCKET}/logs/emr/{cluster_id}/steps/" in line for line in failed)
    boto3.client("emr").terminate_job_flows(JobFlowIds=[cluster_id])
    assert cli(*argv) == 0
    assert "billed since" not in capsys.readouterr().out


def test_status_says_older_steps_are_more_than_the_first_page_holds(capsys):
    """EMR lists a cluster's steps 50 to a page: past the first, `emr status` cannot say how
    many older steps there are, and says there are more than that page's."""
    emr = stubbed("emr")
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    cluster = {"Id": "j-1", "Name": "c", "Status": {"State": "TERMINATED"}}
    steps = [
        {"Id": f"s-{i}", "Name": f"step {i}", "Status": {"State": "CANCELLED", "Timeline": {
            "CreationDateTime": now}}}
        for i in range(50)
    ]  # fmt: skip
    for marker, said in (("next-page", "more than 40"), (None, "40")):
        with Stubber(emr) as stub:
            stub.add_response("describe_cluster", {"Cluster": cluster}, {"ClusterId": "j-1"})
            page = {"Steps": steps, **({"Marker": marker} if marker else {})}
            stub.add_response("list_steps", page, {"ClusterId": "j-1"})
            state = emr_status.cluster_status("j-1", emr_client=emr, s3_client=stubbed("s3"))
            stub.assert_no_pending_responses()
        assert state == "TERMINATED"
        printed = capsys.readouterr().out.splitlines()
        assert printed[-1] == f"  ... and {said} older steps (aws emr list-steps)"
        assert sum(line.startswith("  s-") for line in printed) == emr_status.MAX_STEPS


# --------------------------------------------------------------------------- notebook execution


def test_notebook_execution_requests_validate_and_run_in_order():
    options = runs.RunOptions(
        input="s3://b/input/", output="s3://b/runs/r3", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/0.1.0/notebooks", k=4, skip_classify=True,
    )  # fmt: skip
    requests = runs.notebook_execution_requests(
        "j-CLUSTER", options, "r3", "EMR_Notebooks_DefaultRole", security_group="sg-0abc"
    )
    assert [r["NotebookS3Location"]["Key"] for r in requests] == [
        "artifacts/0.1.0/notebooks/01_extract_features.ipynb",
        "artifacts/0.1.0/notebooks/02_reduce_pca.ipynb",
    ]
    for request in requests:
        assert model_errors("StartNotebookExecution", request) == ""
        assert request["ExecutionEngine"] == {
            "Id": "j-CLUSTER", "Type": "EMR", "MasterInstanceSecurityGroupId": "sg-0abc",
        }  # fmt: skip
        assert request["OutputNotebookS3Location"] == {"Bucket": "b", "Key": "runs/r3/notebooks/"}
    extract = json.loads(requests[0]["NotebookParams"])
    assert extract["input"] == "s3://b/input/" and extract["master"] == "yarn"
    assert json.loads(requests[1]["NotebookParams"])["k"] == 4

    emr, s3 = stubbed("emr"), stubbed("s3")
    with Stubber(emr) as stub, Stubber(s3) as s3_stub:
        expect_executions(stub, requests, ("STARTING", "RUNNING", "FINISHED"))
        expect_extraction(s3_stub, "runs/r3", STARTED + dt.timedelta(minutes=5))
        s3_stub.add_response("head_object", {}, {"Bucket": "b", "Key": "runs/r3/_SUCCESS"})
        ids = run_executions(requests, "s3://b/runs/r3", emr, s3)
        stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()
    assert ids == ["ex-0", "ex-1"]


def run_executions(requests, output, emr, s3, **options):
    """``run_notebook_executions`` on stubbed clients, without waiting between polls."""
    options = {"poll_seconds": 0, "sleep": lambda _s: None, "out": io.StringIO(), **options}
    return runs.run_notebook_executions(requests, output, emr_client=emr, s3_client=s3, **options)


STARTED = dt.datetime(2026, 11, 29, 18, 0, tzinfo=dt.UTC)  # every stubbed execution's start


def expect_executions(stub: Stubber, requests: list[dict], states=("RUNNING", "FINISHED")):
    """Each request started once, then described until its last state."""
    for number, request in enumerate(requests):
        execution = f"ex-{number}"
        stub.add_response("start_notebook_execution", {"NotebookExecutionId": execution}, request)
        for status in states:
            description = {"NotebookExecutionId": execution, "Status": status}
            stub.add_response(
                "describe_notebook_execution",
                {"NotebookExecution": {**description, "StartTime": STARTED}},
                {"NotebookExecutionId": execution},
            )


def expect_extraction(s3_stub: Stubber, output_key: str, created_at: dt.datetime) -> None:
    """Notebook 01's features/_extraction.json, read after its execution."""
    s3_stub.add_response(
        "get_object",
        metrics_body({"created_at": created_at.isoformat(timespec="seconds")}),
        {"Bucket": "b", "Key": f"{output_key}/features/_extraction.json"},
    )


def metrics_body(metrics: dict) -> dict:
    data = json.dumps(metrics).encode()
    return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}


def classify_requests() -> list[dict]:
    options = runs.RunOptions(
        input="s3://b/input/", output="s3://b/runs/r4", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/0.1.0/notebooks-pyspark",
    )  # fmt: skip
    requests = runs.notebook_execution_requests("j-1", options, "r4", "EMR_Notebooks_DefaultRole")
    assert requests[-1]["NotebookS3Location"]["Key"].endswith("/03_classify.ipynb")
    return requests


def test_notebook_03_is_not_started_when_classification_was_skipped():
    """Unlabeled or single-label data: notebook 02 records why in metrics.json and
    notebook 03 would raise, so, as `imagepca run` does, it is not started."""
    requests = classify_requests()
    emr, s3 = stubbed("emr"), stubbed("s3")
    out = io.StringIO()
    with Stubber(emr) as stub, Stubber(s3) as s3_stub:
        expect_executions(stub, requests[:2])  # no start_notebook_execution for 03
        expect_extraction(s3_stub, "runs/r4", STARTED + dt.timedelta(minutes=5))
        s3_stub.add_response(
            "get_object",
            metrics_body({"classification": {"skipped": "1 label: need at least 2"}}),
            {"Bucket": "b", "Key": "runs/r4/metrics.json"},
        )
        s3_stub.add_response("head_object", {}, {"Bucket": "b", "Key": "runs/r4/_SUCCESS"})
        ids = run_executions(requests, "s3://b/runs/r4/", emr, s3, out=out)
        stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()
    assert ids == ["ex-0", "ex-1"]
    assert "03_classify.ipynb not run: classification skipped (1 label: need at least 2)" in (
        out.getvalue()
    )


def test_finished_notebooks_without_success_marker_are_a_failed_run():
    """A PySpark cell can fail while the execution still ends FINISHED: the run is done
    only when _SUCCESS exists, and the error says where the executed notebooks are."""
    requests = classify_requests()
    emr, s3 = stubbed("emr"), stubbed("s3")
    with Stubber(emr) as stub, Stubber(s3) as s3_stub:
        expect_executions(stub, requests)  # 03 runs: classification was not skipped
        expect_extraction(s3_stub, "runs/r4", STARTED + dt.timedelta(minutes=5))
        s3_stub.add_response(
            "get_object",
            metrics_body({"classification": {"accuracy": 0.9}}),
            {"Bucket": "b", "Key": "runs/r4/metrics.json"},
        )
        s3_stub.add_client_error(
            "head_object", "404", http_status_code=404,
            expected_params={"Bucket": "b", "Key": "runs/r4/_SUCCESS"},
        )  # fmt: skip
        with pytest.raises(AwsError) as error:
            run_executions(requests, "s3://b/runs/r4", emr, s3)
        stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()
    message = str(error.value)
    assert (
        "ex-0, ex-1, ex-2 FINISHED" in message and "s3://b/runs/r4/_SUCCESS is missing" in message
    )
    assert "executed notebooks in s3://b/runs/r4/notebooks/" in message


def test_notebook_01_that_wrote_no_features_of_its_own_stops_the_run():
    """Notebook 01's cell failed inside a FINISHED execution, and features/ holds an
    earlier run's: notebook 02 would fit those and write a fresh _SUCCESS. Not started."""
    requests = classify_requests()
    emr, s3 = stubbed("emr"), stubbed("s3")
    with Stubber(emr) as stub, Stubber(s3) as s3_stub:
        expect_executions(stub, requests[:1])  # 02 is never started
        expect_extraction(s3_stub, "runs/r4", STARTED - dt.timedelta(hours=3))
        with pytest.raises(AwsError, match="features/_extraction.json of this run is missing"):
            run_executions(requests, "s3://b/runs/r4", emr, s3)
        stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()


def test_notebook_execution_that_outlasts_the_polling_is_stopped():
    requests = classify_requests()[:1]
    emr = stubbed("emr")
    with Stubber(emr) as stub:
        expect_executions(stub, requests, ("RUNNING", "RUNNING"))
        stub.add_response("stop_notebook_execution", {}, {"NotebookExecutionId": "ex-0"})
        with pytest.raises(AwsError, match="ex-0 still running after 2 polls: stopped it"):
            run_executions(requests, "s3://b/runs/r4", emr, None, max_attempts=2)
        stub.assert_no_pending_responses()


def test_step_run_stops_polling_on_an_interrupted_step():
    """botocore's step_complete waiter does not stop on INTERRUPTED; the poll does, with
    EMR's reason and the step's logs."""
    options = runs.RunOptions(
        input="s3://b/input/", output="s3://b/runs/r5", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/0.1.0/notebooks",
    )  # fmt: skip
    emr = stubbed("emr")
    sleeps = []
    step = {"ClusterId": "j-1", "StepId": "s-1"}
    with Stubber(emr) as stub:
        stub.add_response(
            "add_job_flow_steps", {"StepIds": ["s-1"]}, runs.step_request("j-1", options, "r5")
        )
        for state in ("PENDING", "RUNNING", "INTERRUPTED"):
            status = {"State": state}
            if state == "INTERRUPTED":
                status["FailureDetails"] = {"Reason": "Spot capacity", "Message": "node lost"}
            stub.add_response("describe_step", {"Step": {"Id": "s-1", "Status": status}}, step)
        with pytest.raises(AwsError) as error:
            runs.run_step(
                "j-1", options, "r5", emr_client=emr, s3_client=None, poll_seconds=7,
                max_attempts=240, log_bucket="b", sleep=sleeps.append, out=io.StringIO(),
            )  # fmt: skip
        stub.assert_no_pending_responses()
    assert sleeps == [7, 7]  # Delay between polls, none after the last
    assert str(error.value) == (
        "step s-1 ended INTERRUPTED: Spot capacity node lost logs: s3://b/logs/emr/j-1/steps/s-1/"
    )


def test_a_step_still_running_when_the_wait_ends_says_how_to_follow_or_stop_it():
    options = runs.RunOptions(
        input="s3://b/input/", output="s3://b/runs/r6", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/0.1.0/notebooks",
    )  # fmt: skip
    emr = stubbed("emr")
    step = {"ClusterId": "j-1", "StepId": "s-1"}
    with Stubber(emr) as stub:
        stub.add_response(
            "add_job_flow_steps", {"StepIds": ["s-1"]}, runs.step_request("j-1", options, "r6")
        )
        for _ in range(2):
            running = {"Step": {"Id": "s-1", "Status": {"State": "RUNNING"}}}
            stub.add_response("describe_step", running, step)
        with pytest.raises(AwsError) as error:
            runs.run_step(
                "j-1", options, "r6", emr_client=emr, s3_client=None, poll_seconds=0,
                max_attempts=2, log_bucket="b", sleep=lambda _: None, out=io.StringIO(),
            )  # fmt: skip
    message = str(error.value)
    assert message.startswith("step s-1 still RUNNING after 2 checks; it goes on, on the cluster")
    assert "aws emr cancel-steps --cluster-id j-1 --step-ids s-1" in message
    assert message.endswith("--max-attempts; logs: s3://b/logs/emr/j-1/steps/s-1/")


def test_down_accepts_a_cluster_that_ended_with_errors():
    """After a failed bootstrap `emr up` says to run `emr down`: the cluster ends
    TERMINATED_WITH_ERRORS, on which botocore's waiter fails, yet it is terminated."""
    emr = stubbed("emr")
    failed = {
        "State": "TERMINATED_WITH_ERRORS",
        "StateChangeReason": {"Code": "BOOTSTRAP_FAILURE", "Message": "bootstrap action 1"},
    }
    described = {"Cluster": {"Id": "j-1", "Name": "imagepca", "Status": failed}}
    out = io.StringIO()
    with Stubber(emr) as stub:
        stub.add_response("terminate_job_flows", {}, {"JobFlowIds": ["j-1"]})
        stub.add_response("describe_cluster", described, {"ClusterId": "j-1"})  # the waiter
        stub.add_response("describe_cluster", described, {"ClusterId": "j-1"})  # the reason
        cluster.down("j-1", emr_client=emr, poll_seconds=0, out=out)
        stub.assert_no_pending_responses()
    assert "j-1 terminated with errors: BOOTSTRAP_FAILURE bootstrap action 1" in out.getvalue()

    # Still terminating when the waiter gives up: that is not done.
    terminating = {"Cluster": {"Id": "j-1", "Name": "imagepca", "Status": {"State": "TERMINATING"}}}
    with Stubber(emr) as stub:
        stub.add_response("terminate_job_flows", {}, {"JobFlowIds": ["j-1"]})
        for _ in range(3):
            stub.add_response("describe_cluster", terminating, {"ClusterId": "j-1"})
        with pytest.raises(WaiterError):
            cluster.down("j-1", emr_client=emr, poll_seconds=0, max_attempts=2, out=out)
        stub.assert_no_pending_responses()


def test_invalid_notebook_execution_request_is_caught_before_sending():
    with pytest.raises(AwsError, match="ServiceRole"):
        cluster.validate_request("StartNotebookExecution", {"ExecutionEngine": {"Id": "j-1"}})


def test_help_for_every_emr_command(capsys):
    for command in (
        "render", "security-config", "stage", "wheelhouse", "doctor", "up", "run", "down",
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli("emr", command, "--help")
        assert exit_info.value.code == 0
    assert "--via" in capsys.readouterr().out


def test_every_command_says_what_it_does():
    """Each command's ``--help`` has a description below its usage, not only options."""
    import argparse

    from imagepca.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, name: str):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            yield name, parser
        for group in groups:
            for command, child in group.choices.items():
                yield from leaves(child, f"{name} {command}")

    commands = dict(leaves(build_parser(), "imagepca"))
    assert {"imagepca run", "imagepca emr render", "imagepca emr down"} <= commands.keys()
    assert [name for name, parser in commands.items() if not parser.description] == []


def test_aws_package_reads_as_the_deployment_steps():
    """The shape of lib/imagepca/aws/: small modules, none importing the CLI, no cycle."""
    import ast

    package = ROOT / "lib" / "imagepca" / "aws"
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 500, f"{path.name} is {len(text.splitlines())} lines"
        names = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
                names |= {("." * node.level) + a.name for a in node.names if not node.module}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        assert not {n for n in names if n.endswith("cli") or n == "imagepca.cli"}, path.name
        imports[path.stem] = {n[1:] for n in names if n.startswith(".") and n != "."}

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(
            d == target or (d not in seen and reaches(d, target, seen | {d}))
            for d in imports.get(start, ())
        )

    assert not [m for m in imports if reaches(m, m)]
    assert set(imports) >= {"settings", "account", "stage", "cluster", "runs", "commands"}
