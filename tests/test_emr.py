"""`imagepca emr ...`: config rendering checked against botocore's model, and the
stage / up / run / down cycle against a moto server over real HTTP."""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber
from botocore.validate import ParamValidator

from imagepca import emr, features
from moto_server import REGION, aws_env, moto_endpoint, set_step_states  # noqa: F401

BUCKET = "imagepca-test-bucket"
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "bucket": BUCKET,
    "region": REGION,
    "subnet_id": "subnet-0123456789abcdef0",
    "key_name": "my-key",
    "artifacts_version": "0.1.0",
    "security_configuration": "imagepca-security",
}


def settings(**changes) -> emr.EmrSettings:
    return emr.EmrSettings.load(None, {**SETTINGS, **changes})


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagepca")
    emr.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def model_errors(operation: str, params: dict) -> str:
    model = botocore.session.get_session().get_service_model("emr")
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


# --------------------------------------------------------------------------- render


def test_rendered_config_is_a_valid_run_job_flow_request():
    config = emr.render_config(settings())
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
    assert spark["spark.executor.memoryOverhead"] == "4g"
    assert by_class["livy-conf"]["Properties"]["livy.server.session.timeout"] == "4h"
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


def test_optional_parts_of_the_config():
    config = emr.render_config(
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


def test_settings_are_validated_once_with_actionable_messages(tmp_path):
    with pytest.raises(emr.EmrError) as error:
        settings(subnet_id="vpc-123", core_instance_count=0, release_label="emr-6.15.0")
    message = str(error.value)
    assert "subnet_id" in message and "core_instance_count" in message
    assert "EMR 7.x" in message
    with pytest.raises(emr.EmrError, match="unknown settings: colour"):
        emr.EmrSettings.load(None, {**SETTINGS, "colour": "red"})
    with pytest.raises(emr.EmrError, match="emr_settings.example.json"):
        emr.EmrSettings.load(tmp_path / "missing.json")


def test_example_settings_file_renders():
    example = emr.EmrSettings.load(ROOT / "emr_settings.example.json", {"artifacts_version": "1"})
    assert model_errors("RunJobFlow", emr.render_config(example)) == ""


def test_render_command_prints_the_request(capsys):
    argv = ["emr", "render", "--bucket", BUCKET, "--region", REGION, "--version", "0.1.0"]
    assert cli(*argv, "--subnet-id", SETTINGS["subnet_id"]) == 0
    assert json.loads(capsys.readouterr().out)["Name"] == "imagepca"


def test_security_configuration_enables_encryption_and_imdsv2():
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    definition = json.loads(emr.render_security_configuration(key, f"s3://{BUCKET}/certs.zip"))
    encryption = definition["EncryptionConfiguration"]
    assert encryption["EnableAtRestEncryption"] and encryption["EnableInTransitEncryption"]
    at_rest = encryption["AtRestEncryptionConfiguration"]
    assert at_rest["S3EncryptionConfiguration"]["EncryptionMode"] == "SSE-S3"
    assert at_rest["LocalDiskEncryptionConfiguration"]["AwsKmsKey"] == key
    tls = encryption["InTransitEncryptionConfiguration"]["TLSCertificateConfiguration"]
    assert tls["S3Object"] == f"s3://{BUCKET}/certs.zip"
    assert (
        definition["InstanceMetadataServiceConfiguration"]["MinimumInstanceMetadataServiceVersion"]
        == 2
    )
    request = {"Name": "imagepca-security", "SecurityConfiguration": json.dumps(definition)}
    assert model_errors("CreateSecurityConfiguration", request) == ""


@pytest.mark.usefixtures("aws_env")
def test_security_config_command_creates_it():
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    argv = ["emr", "security-config", "--bucket", BUCKET, "--region", REGION]
    assert cli(*argv, "--subnet-id", SETTINGS["subnet_id"], "--kms-key", key) == 0
    described = boto3.client("emr").describe_security_configuration(Name="imagepca-security")
    assert "InstanceMetadataServiceConfiguration" in described["SecurityConfiguration"]


def test_cost_estimate_uses_the_dated_price_table():
    total, lines = emr.hourly_cost(settings(task_instance_count=1))
    assert total == pytest.approx(1 * 0.24 + 2 * 0.48 + 1 * 0.48)
    assert emr.PRICE_TABLE_DATE in lines[-1]
    unknown, lines = emr.hourly_cost(settings(core_instance_type="x9.huge"))
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
    uris = emr.stage(
        BUCKET, "0.1.0", weights, s3_client=s3, wheel_builder=fake_wheel_builder,
        model_converter=fake_model_converter, image_sizes=(224, 160), out=io.StringIO(),
    )  # fmt: skip
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    base = "artifacts/0.1.0/"
    expected = {
        base + "wheels/imagepca-0.1.0-py3-none-any.whl",
        base + "bootstrap/install-python-deps.sh",
        base + "bootstrap/requirements-emr.txt",
        base + f"models/{emr.WEIGHTS_FILE}",
        base + "models/tflite/mobilenetv2-test-224.tflite",
        base + "models/tflite/mobilenetv2-test-160.tflite",
    } | {base + "notebooks/" + p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert keys == expected
    assert uris["weights"] == f"s3://{BUCKET}/{base}models/{emr.WEIGHTS_FILE}"
    # The driver looks for converted models beside the weights it is given.
    assert uris["tflite_models"] == features.staged_models_uri(uris["weights"])

    with pytest.raises(emr.EmrError, match="staging version 9.9"):
        emr.stage(BUCKET, "9.9", weights, s3_client=s3, wheel_builder=fake_wheel_builder)


def test_stage_pins_the_clusters_tensorflow():
    """The staged model's name carries the converter's version: staging must know the
    cluster's, which the bootstrap's requirements pin."""
    assert emr.pinned_tensorflow(ROOT) == "2.21.0"


def test_stage_refuses_unknown_image_sizes():
    assert emr._image_sizes("224,160") == [224, 160]
    for text in ("225", "224,", "big"):
        with pytest.raises(emr.EmrError, match="--image-sizes"):
            emr._image_sizes(text)


@pytest.mark.usefixtures("aws_env")
def test_stage_command_needs_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    argv = ["emr", "stage", "--bucket", BUCKET, "--region", REGION]
    assert cli(*argv, "--subnet-id", SETTINGS["subnet_id"]) == 1
    assert "pass --weights" in capsys.readouterr().err


# --------------------------------------------------------------------------- up/run/down


def start_cluster(**changes) -> tuple[emr.EmrSettings, str, str]:
    chosen = settings(**changes)
    out = io.StringIO()
    info = emr.up(chosen, emr_client=boto3.client("emr"), poll_seconds=0.05, out=out)
    return chosen, info.cluster_id, out.getvalue()


@pytest.mark.usefixtures("aws_env")
def test_up_submits_the_rendered_config_and_waits_for_waiting():
    chosen, cluster_id, printed = start_cluster()
    cluster = boto3.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert cluster["Status"]["State"] == "WAITING"
    assert {a["Name"] for a in cluster["Applications"]} >= {"Spark", "Livy", "JupyterHub"}
    assert cluster["ReleaseLabel"] == chosen.release_label
    assert {c["Classification"] for c in cluster["Configurations"]} >= {
        "spark-env", "livy-env", "spark-defaults", "jupyter-s3-conf",
    }  # fmt: skip
    actions = boto3.client("emr").list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
    assert actions[0]["ScriptPath"].endswith("/bootstrap/install-python-deps.sh")
    assert cluster_id in printed
    assert "-L 9443:localhost:9443" in printed and "-L 8998:localhost:8998" in printed
    assert "https://localhost:9443" in printed and "ssh -i ~/.ssh/my-key.pem" in printed
    assert "estimated cost:    $1.20/hour" in printed


def expected_command(run_id: str) -> list[str]:
    return [
        "python3.11", "-m", "imagepca", "run",
        "--notebooks", f"s3://{BUCKET}/artifacts/0.1.0/notebooks",
        "--input", f"s3://{BUCKET}/input/photos/",
        "--output", f"s3://{BUCKET}/runs/{run_id}",
        "--weights", f"s3://{BUCKET}/artifacts/0.1.0/models/{emr.WEIGHTS_FILE}",
        "--master", "yarn",
        "--k", "8",
        "--engine", "keras",
    ]  # fmt: skip


@pytest.mark.usefixtures("aws_env")
def test_run_adds_the_step_waits_and_lists_outputs(capsys):
    _, cluster_id, _ = start_cluster()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for key in ("features/part-0.parquet", "metrics.json", "_SUCCESS"):
        s3.put_object(Bucket=BUCKET, Key=f"runs/r1/{key}", Body=b"x")

    def finish_step_soon() -> None:  # what the cluster would do
        for _ in range(100):
            time.sleep(0.05)
            if set_step_states(cluster_id, "COMPLETED"):
                return

    finisher = threading.Thread(target=finish_step_soon)
    finisher.start()
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
def test_run_reports_a_failed_step(capsys):
    _, cluster_id, _ = start_cluster()
    options = emr.RunOptions(
        input=f"s3://{BUCKET}/input/", output=f"s3://{BUCKET}/runs/r2",
        weights=f"s3://{BUCKET}/w.h5", notebooks=f"s3://{BUCKET}/artifacts/0.1.0/notebooks",
    )  # fmt: skip
    client = boto3.client("emr")

    def fail_step_soon() -> None:  # retried: under load the step may not exist yet
        for _ in range(400):
            time.sleep(0.05)
            if set_step_states(cluster_id, "FAILED"):
                return

    threading.Thread(target=fail_step_soon, daemon=True).start()
    with pytest.raises(emr.EmrError, match="ended FAILED"):
        emr.run_step(
            cluster_id, options, "r2", emr_client=client, s3_client=boto3.client("s3"),
            poll_seconds=0.05, max_attempts=400, log_bucket=BUCKET, out=io.StringIO(),
        )  # fmt: skip


@pytest.mark.usefixtures("aws_env")
def test_run_via_livy_runs_papermill_here_with_the_pyspark_kernel(monkeypatch, capsys):
    import imagepca.cli

    _, cluster_id, _ = start_cluster()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="runs/r3/_SUCCESS", Body=b"")
    seen = []
    monkeypatch.setattr(imagepca.cli, "main", lambda argv: seen.append(argv) or 0)
    code = cli(
        "emr", "run", "--cluster-id", cluster_id, "--run-id", "r3", "--via", "livy",
        "--bucket", BUCKET, "--region", REGION, "--subnet-id", SETTINGS["subnet_id"],
        "--version", "0.1.0", "--input", f"s3://{BUCKET}/input/photos/", "--k", "8",
    )  # fmt: skip
    assert code == 0
    (argv,) = seen
    assert argv[:5] == ["run", "--kernel", "pysparkkernel", "--livy-url", "http://localhost:8998"]
    assert argv[argv.index("--output") + 1] == f"s3://{BUCKET}/runs/r3"
    assert argv[argv.index("--k") + 1] == "8"
    assert argv[-1] == "--skip-classify"  # 03_classify.ipynb is not staged in this bucket
    assert f"s3://{BUCKET}/runs/r3/_SUCCESS" in capsys.readouterr().out
    assert boto3.client("emr").list_steps(ClusterId=cluster_id)["Steps"] == []


def test_run_options_flow_unchanged():
    options = emr.RunOptions(
        input="s3://b/in/", output="s3://b/runs/x", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/1/notebooks", variance=0.9, skip_classify=True,
    )  # fmt: skip
    assert emr.step_command(options)[-3:] == ["--variance", "0.9", "--skip-classify"]
    with pytest.raises(emr.EmrError, match="s3://"):
        emr.RunOptions(input="/local", output="s3://b/o", weights="s3://b/w", notebooks="s3://b/n")


@pytest.mark.usefixtures("aws_env")
def test_down_terminates(capsys):
    _, cluster_id, _ = start_cluster()
    argv = ["emr", "down", "--cluster-id", cluster_id, "--region", REGION]
    assert cli(*argv, "--poll-seconds", "0.05") == 0
    state = boto3.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
    assert state["State"] == "TERMINATED"
    assert f"{cluster_id} terminated" in capsys.readouterr().out


# --------------------------------------------------------------------------- notebook execution


def test_notebook_execution_requests_validate_and_run_in_order():
    options = emr.RunOptions(
        input="s3://b/input/", output="s3://b/runs/r3", weights="s3://b/w.h5",
        notebooks="s3://b/artifacts/0.1.0/notebooks", k=4, skip_classify=True,
    )  # fmt: skip
    requests = emr.notebook_execution_requests(
        "j-CLUSTER", options, "r3", "imagepca-emr-service-role", security_group="sg-0abc"
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

    client = boto3.client(
        "emr", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    with Stubber(client) as stub:
        for number, request in enumerate(requests):
            execution = f"ex-{number}"
            stub.add_response(
                "start_notebook_execution", {"NotebookExecutionId": execution}, request
            )
            for status in ("STARTING", "RUNNING", "FINISHED"):
                stub.add_response(
                    "describe_notebook_execution",
                    {"NotebookExecution": {"NotebookExecutionId": execution, "Status": status}},
                    {"NotebookExecutionId": execution},
                )
        ids = emr.run_notebook_executions(
            requests, emr_client=client, poll_seconds=0, sleep=lambda _s: None,
            out=io.StringIO(),
        )  # fmt: skip
        stub.assert_no_pending_responses()
    assert ids == ["ex-0", "ex-1"]


def test_invalid_notebook_execution_request_is_caught_before_sending():
    with pytest.raises(emr.EmrError, match="ServiceRole"):
        emr.validate_request("StartNotebookExecution", {"ExecutionEngine": {"Id": "j-1"}})


def test_help_for_every_emr_command(capsys):
    for command in ("render", "security-config", "stage", "up", "run", "down"):
        with pytest.raises(SystemExit) as exit_info:
            cli("emr", command, "--help")
        assert exit_info.value.code == 0
    assert "--via" in capsys.readouterr().out
