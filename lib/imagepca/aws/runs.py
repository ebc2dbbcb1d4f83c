"""Step 4: run the notebooks on a cluster, three ways (``emr run --via ...``).

Why this module exists: the same run (input, output, weights, k or variance, engine) can
reach a cluster three ways, each with its own failure modes, and all three must pass the
same parameters (built by :func:`imagepca.runner.plan`, as ``imagepca run`` does):

* ``step`` (default): an EMR step (``command-runner.jar``) runs ``python3.11 -m imagepca
  run ... --master yarn`` on the primary node; papermill executes the notebooks there.
* ``notebook-execution``: EMR Studio's ``StartNotebookExecution``, with the
  ``notebooks-pyspark/`` copies (PySpark kernel: the Studio ``python3`` kernel is EMR's
  own environment, without imagepca) and an EMR notebooks service role, never the
  cluster's.
* ``livy``: papermill on this machine, cells in sparkmagic's PySpark kernel through Livy
  (an SSH tunnel; HTTPS when the cluster has in-transit encryption).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from botocore.exceptions import ClientError

from imagepca.run_options import option_arguments

from . import account
from .cluster import validate_request
from .settings import NOTEBOOK_SERVICE_ROLE, AwsError, parse_s3_uri


@dataclass(frozen=True)
class RunOptions:
    """One headless run; options flow to ``imagepca run`` unchanged."""

    input: str | None
    output: str
    weights: str
    notebooks: str
    k: int | None = None
    variance: float | None = None
    engine: str | None = None
    skip_classify: bool = False
    manifest: str | None = None  # instead of input: a list of image URIs (issue 16)
    incremental: bool = False
    # Notebook 01's Arrow batch (the settings' arrow_max_records_per_batch): its own
    # parameter overrides the cluster's spark-defaults for the featurization job.
    max_records_per_batch: int | None = None
    # `imagepca run`'s tuning options the user gave (imagepca.run_options.TUNING_OPTIONS:
    # name -> value), passed on as they are; the others keep `imagepca run`'s defaults.
    tuning: dict[str, Any] = field(default_factory=dict)
    execution_timeout: int | None = None  # seconds one cell may run (step and livy)

    def __post_init__(self) -> None:
        if (self.input is None) == (self.manifest is None):
            raise AwsError("give an input folder or a manifest, not both")
        for name in ("input", "manifest", "output", "weights", "notebooks"):
            value = getattr(self, name)
            if value is not None and not value.startswith("s3://"):
                raise AwsError(f"{name} must be an s3:// URI on EMR, got {value!r}")
        if self.k is not None and self.variance is not None:
            raise AwsError("give --k or --variance, not both")


def outside_instance_role(options: RunOptions, bucket: str) -> list[str]:
    """The run's locations the project's instance role cannot reach, each with what to do
    (the prefixes come from aws/emr-instance-role-policy.json).

    Warnings, not errors: a role extended by hand may well reach them.
    """
    reads = account.instance_role_prefixes("s3:GetObject")
    writes = account.instance_role_prefixes("s3:PutObject")

    def outside(uri: str | None, prefixes: tuple[str, ...]) -> bool:
        if uri is None:
            return False
        uri_bucket, key = parse_s3_uri(uri)
        return uri_bucket != bucket or not key.startswith(prefixes)

    def names(prefixes: tuple[str, ...]) -> str:
        return ", ".join(f"s3://{bucket}/{prefix}" for prefix in prefixes)

    role = "the nodes' role (aws/emr-instance-role-policy.json)"
    warnings = [
        f"{name} {uri} is outside {names(reads)}: {role} cannot read it, and the run would "
        "stop on AccessDenied; copy it there (`imagepca aws upload`) or grant the role "
        "s3:GetObject on it"
        for name, uri in (
            ("--input", options.input),
            ("--manifest", options.manifest),
            ("--weights", options.weights),
        )  # fmt: skip
        if outside(uri, reads)
    ]
    if outside(options.output, writes):
        warnings.append(
            f"--output {options.output} is outside {names(writes)}: {role} cannot write "
            f"it; use s3://{bucket}/runs/NAME or grant the role s3:PutObject there"
        )
    return warnings


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus 4 random hex digits."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def s3_exists(s3_client: Any, uri: str) -> bool:
    bucket, key = parse_s3_uri(uri)
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


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


def notebook_runs(options: RunOptions, *, master: str | None = "yarn") -> list:
    """The :class:`imagepca.runner.NotebookRun` list of a run, as ``imagepca run`` plans it."""
    from imagepca import runner
    from imagepca.config import ClassifyParams, ExtractParams, ReduceParams, field_names

    extract = {
        "input": options.input,
        "manifest": options.manifest,
        "output": options.output,
        "weights": options.weights,
        "incremental": options.incremental,
    }
    if options.engine:
        extract["engine"] = options.engine
    if options.max_records_per_batch is not None:
        extract["max_records_per_batch"] = options.max_records_per_batch
    reduce: dict[str, Any] = {"output": options.output}
    if options.k is not None:
        reduce["k"] = options.k
    if options.variance is not None:
        reduce["variance"] = options.variance
    classify: dict[str, Any] = {"output": options.output}
    for params, values in (
        (ExtractParams, extract),
        (ReduceParams, reduce),
        (ClassifyParams, classify),
    ):
        taken = field_names(params)
        values.update((name, value) for name, value in options.tuning.items() if name in taken)
    return runner.plan(
        ExtractParams(**extract),
        ReduceParams(**reduce),
        master=master,
        classify=not options.skip_classify,
        classify_parameters=ClassifyParams(**classify).as_dict(),
    )


# --------------------------------------------------------------------------- EMR step


def _run_arguments(options: RunOptions) -> list[str]:
    """``imagepca run`` options of the run: locations, then the user's choices."""
    source = ["--input", options.input] if options.input else ["--manifest", options.manifest]
    command = [
        "--notebooks", options.notebooks,
        *source,
        "--output", options.output,
        "--weights", options.weights,
        "--master", "yarn",
    ]  # fmt: skip
    if options.k is not None:
        command += ["--k", str(options.k)]
    if options.variance is not None:
        command += ["--variance", str(options.variance)]
    if options.engine:
        command += ["--engine", options.engine]
    if options.skip_classify:
        command.append("--skip-classify")
    if options.incremental:
        command.append("--incremental")
    if options.max_records_per_batch is not None:
        command += ["--max-records-per-batch", str(options.max_records_per_batch)]
    command += option_arguments(options.tuning)
    if options.execution_timeout is not None:
        command += ["--execution-timeout", str(options.execution_timeout)]
    return command


def step_command(options: RunOptions) -> list[str]:
    """The command the EMR step runs on the primary node."""
    return ["python3.11", "-m", "imagepca", "run", *_run_arguments(options)]


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


STEP_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "INTERRUPTED")
"""Step states that do not change any more (EMR API reference, ``StepStatus``)."""
CLOCK_SKEW = dt.timedelta(seconds=60)
"""How far the cluster's clock (``features/_extraction.json``'s ``created_at``) may lag
EMR's (a notebook execution's ``StartTime``)."""


def step_logs(cluster_id: str, step_id: str, details: dict, log_bucket: str | None) -> str:
    """Where a step's logs are: EMR's ``FailureDetails.LogFile``, else the cluster's log
    folder in ``log_bucket`` (``emr up``'s ``LogUri``), else "" (unknown)."""
    return details.get("LogFile") or (
        f"s3://{log_bucket}/logs/emr/{cluster_id}/steps/{step_id}/" if log_bucket else ""
    )


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
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
) -> str:
    """Add the step, wait for it, then list the run's outputs; returns the step id.

    The step is polled here rather than with botocore's ``step_complete`` waiter, which
    does not stop on ``INTERRUPTED`` and would wait out every attempt.
    """
    out = out or sys.stdout
    request = step_request(cluster_id, options, run_id)
    validate_request("AddJobFlowSteps", request)
    step_id = emr_client.add_job_flow_steps(**request)["StepIds"][0]
    print(f"step {step_id} on {cluster_id}: {' '.join(step_command(options))}", file=out)
    if not wait:
        return step_id
    for attempt in range(1, max(max_attempts, 1) + 1):
        step = emr_client.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
        state = step["Status"]["State"]
        if state in STEP_ENDED or attempt == max_attempts:
            break
        sleep(poll_seconds)
    if state != "COMPLETED":
        details = step["Status"].get("FailureDetails", {})
        logs = step_logs(cluster_id, step_id, details, log_bucket)
        if state not in STEP_ENDED:
            raise AwsError(
                f"step {step_id} still {state} after {max_attempts} checks; it goes on, on "
                f"the cluster (and is billed): follow it with `aws emr describe-step "
                f"--cluster-id {cluster_id} --step-id {step_id}`, stop it with `aws emr "
                f"cancel-steps --cluster-id {cluster_id} --step-ids {step_id}`, or wait longer "
                f"with --max-attempts; logs: {logs}"
            )
        raise AwsError(
            f"step {step_id} ended {state}: "
            f"{details.get('Reason', '')} {details.get('Message', '')} logs: {logs}".strip()
        )
    print(f"step {step_id} completed; outputs:", file=out)
    list_outputs(options.output, s3_client=s3_client, out=out)
    return step_id


# --------------------------------------------------------------------------- EMR Studio


def notebook_execution_requests(
    cluster_id: str,
    options: RunOptions,
    run_id: str,
    service_role: str,
    *,
    security_group: str | None = None,
) -> list[dict[str, Any]]:
    """``StartNotebookExecution`` requests, one per notebook, in run order.

    ``options.notebooks`` should be the staged ``notebooks-pyspark/`` copies and
    ``service_role`` an EMR notebooks service role (``EMR_Notebooks_DefaultRole`` or one
    like it), which EMR assumes to run the notebook; the cluster's service role lacks its
    permissions. The operator policy lets the caller pass only the notebooks role it was
    rendered with (``AwsSettings.notebook_service_role``, the same default).
    """
    if not service_role:
        raise AwsError(
            "--via notebook-execution needs an EMR notebooks service role: pass "
            f"--notebook-service-role (e.g. {NOTEBOOK_SERVICE_ROLE}, created with an EMR "
            'Studio) or set "notebook_service_role" in emr_settings.json'
        )
    notebooks_bucket, notebooks_prefix = parse_s3_uri(options.notebooks.rstrip("/") + "/")
    output_bucket, output_prefix = parse_s3_uri(options.output.rstrip("/") + "/")
    requests = []
    for run in notebook_runs(options):
        engine: dict[str, Any] = {"Id": cluster_id, "Type": "EMR"}
        if security_group:
            engine["MasterInstanceSecurityGroupId"] = security_group
        request = {
            "NotebookExecutionName": f"imagepca-{run_id}-{run.name.split('_')[0]}",
            "NotebookS3Location": {"Bucket": notebooks_bucket, "Key": notebooks_prefix + run.name},
            "ExecutionEngine": engine,
            "NotebookParams": json.dumps(run.parameters),
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
    output: str,
    *,
    emr_client: Any,
    s3_client: Any,
    poll_seconds: float = 30,
    max_attempts: int = 240,
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
) -> list[str]:
    """Start each notebook after the previous one finished; stop at the first failure.

    botocore has no waiter for notebook executions, hence the polling loop; one that
    gives up stops its execution, so it does not go on holding the cluster. ``FINISHED``
    only says the notebook reached its end: a PySpark cell can fail without failing the
    execution, so the run counts as done only when ``OUTPUT/_SUCCESS`` exists (written
    last by notebooks 02 and 03), and notebook 02 starts only when notebook 01 wrote
    ``features/_extraction.json`` during its execution (else 02 could fit an earlier run's
    features and complete the output). As ``imagepca run`` does, ``03_classify`` is not started
    when ``metrics.json`` says classification was skipped (fewer than 2 labels: it would
    raise). Returns the ids of the executions started.
    """
    from imagepca.storage import (
        CLASSIFY_NOTEBOOK,
        EXTRACT_NOTEBOOK,
        EXTRACTION_FILE,
        METRICS_FILE,
        SUCCESS_MARKER,
    )

    out = out or sys.stdout
    output = output.rstrip("/")
    ids: list[str] = []
    for request in requests:
        name = request["NotebookS3Location"]["Key"].rsplit("/", 1)[-1]
        if name == CLASSIFY_NOTEBOOK:
            metrics = _read_json(s3_client, f"{output}/{METRICS_FILE}")
            if metrics is None:
                raise _incomplete(output, METRICS_FILE, ids)
            skipped = metrics.get("classification", {}).get("skipped")
            if skipped is not None:
                print(f"{name} not run: classification skipped ({skipped})", file=out)
                continue
        execution_id = emr_client.start_notebook_execution(**request)["NotebookExecutionId"]
        ids.append(execution_id)
        print(
            f"notebook execution {execution_id}: {request['NotebookS3Location']['Key']}", file=out
        )
        status = _wait_for_notebook(emr_client, execution_id, poll_seconds, max_attempts, sleep)
        if name == EXTRACT_NOTEBOOK:
            extraction = _read_json(s3_client, f"{output}/features/{EXTRACTION_FILE}")
            written = extraction and dt.datetime.fromisoformat(extraction["created_at"])
            started = status.get("StartTime")
            if not written or (started and written < started - CLOCK_SKEW):
                raise _incomplete(output, f"features/{EXTRACTION_FILE} of this run", ids)
    if not s3_exists(s3_client, f"{output}/{SUCCESS_MARKER}"):
        raise _incomplete(output, SUCCESS_MARKER, ids)
    return ids


def _wait_for_notebook(
    emr_client: Any,
    execution_id: str,
    poll_seconds: float,
    max_attempts: int,
    sleep: Callable[[float], None],
) -> dict:
    """The execution's description once it has ``FINISHED``."""
    for _ in range(max_attempts):
        status = emr_client.describe_notebook_execution(NotebookExecutionId=execution_id)[
            "NotebookExecution"
        ]
        state = status["Status"]
        if state == "FINISHED":
            return status
        if state in ("FAILED", "STOPPED", "FAILING", "STOPPING"):
            raise AwsError(
                f"notebook execution {execution_id} {state}: "
                f"{status.get('LastStateChangeReason', '')}"
            )
        sleep(poll_seconds)
    emr_client.stop_notebook_execution(NotebookExecutionId=execution_id)
    raise AwsError(
        f"notebook execution {execution_id} still running after {max_attempts} polls: "
        "stopped it; raise --max-attempts or --poll-seconds for a longer run"
    )


def _read_json(s3_client: Any, uri: str) -> dict | None:
    """An S3 object's JSON, or ``None`` when there is no such object."""
    bucket, key = parse_s3_uri(uri)
    try:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)


def _incomplete(output: str, missing: str, ids: Sequence[str]) -> AwsError:
    return AwsError(
        f"notebook executions {', '.join(ids)} FINISHED but {output}/{missing} is missing: "
        f"a cell failed without failing the execution; read the executed notebooks in "
        f"{output}/notebooks/"
    )


# --------------------------------------------------------------------------- Livy


def run_via_livy(
    options: RunOptions,
    livy_url: str,
    *,
    ca_bundle: str | None = None,
    insecure: bool = False,
    out: TextIO | None = None,
) -> dict:
    """papermill here, cells on the cluster's driver through Livy; returns the metrics.

    The notebooks are read from S3 by papermill on this machine, their cells run in the
    Livy session, so input and output are the cluster's ``s3://`` paths.
    """
    from imagepca import console, livy, runner

    out = out or sys.stdout
    runs = notebook_runs(options, master=None)
    with livy.kernel_environment(
        livy.KERNEL_NAME, livy_url=livy_url, ca_bundle=ca_bundle, insecure=insecure
    ) as env:
        metrics = runner.run_notebooks(
            runs,
            options.output,
            notebooks=options.notebooks,
            kernel=livy.KERNEL_NAME,
            env=env,
            execution_timeout=options.execution_timeout,
        )
    print(console.summary(metrics, options.output), file=out)
    return metrics
