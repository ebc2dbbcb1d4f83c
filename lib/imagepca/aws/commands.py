"""``imagepca emr ...``, and the ``aws`` and ``emr`` groups added to the CLI: argparse wiring.

Each command reads its options, builds the settings (validated once) and calls one
function of the step modules; errors the user can fix end as one ``error:`` line and exit
status 1 (:mod:`.command_support`). The ``aws`` group lives in :mod:`.aws_commands`. The
top-level CLI imports this module; nothing here imports the CLI.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from imagepca.config import IMAGE_SIZES, option_flag
from imagepca.run_options import (
    add_tuning_options,
    execution_timeout_problem,
    refuse_unused_classifier_options,
    tuning_values,
)

from . import account, cluster, doctor, runs, stage, status
from .aws_commands import add_aws
from .command_support import client as _client
from .command_support import command_group
from .command_support import guard as _guard
from .command_support import region_only as _region
from .command_support import settings_path as _settings_path
from .settings import NOTEBOOK_SERVICE_ROLE, AwsError, EmrSettings, parse_s3_uri

# --------------------------------------------------------------------------- emr


def _settings(args: argparse.Namespace) -> EmrSettings:
    path = _settings_path(args)
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
        "--max-attempts", type=int, default=default_attempts,
        help=f"polls before giving up (default {default_attempts})",
    )  # fmt: skip


def _cmd_render(args: argparse.Namespace) -> int:
    print(json.dumps(cluster.render_config(_settings(args), args.config), indent=2))
    return 0


def _cmd_security_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    certs = args.certs or f"s3://{settings.bucket}/artifacts/security/emr-tls-certs.zip"
    definition = cluster.render_security_configuration(args.kms_key, certs)
    name = settings.security_configuration or "imagepca-security"
    if args.dry_run:
        print(shlex.join([
            "aws", "emr", "create-security-configuration", "--name", name,
            "--security-configuration", definition, "--region", settings.region,
        ]))  # fmt: skip
        return 0
    names = cluster.check_certificates_zip(_client("s3", settings.region), certs)
    bucket, key = parse_s3_uri(certs)
    readable = account.instance_role_prefixes("s3:GetObject")
    if bucket != settings.bucket or not key.startswith(readable):
        print(
            f"warning: the nodes read {certs} with their instance profile, which `aws setup` "
            f"lets read only {', '.join(f's3://{settings.bucket}/{p}' for p in readable)}: "
            "unless you granted more, clusters with this configuration fail to start",
            file=sys.stderr,
        )
    _client("emr", settings.region).create_security_configuration(
        Name=name, SecurityConfiguration=definition
    )
    trusted = ""
    if cluster.TRUSTED_CERTIFICATES not in names:
        trusted = (
            f" {certs} has no {cluster.TRUSTED_CERTIFICATES}: its certificate must be signed "
            "by a CA Java trusts."
        )
    print(
        f'security configuration {name} created; set "security_configuration": '
        f'"{name}" in emr_settings.json. It turns on in-transit encryption: Livy is then '
        f"HTTPS only (EMR 7.4+), see docs/livy.md.{trusted}"
    )
    return 0


def _image_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size not in IMAGE_SIZES for size in sizes):
        raise AwsError(
            f"--image-sizes must be a comma-separated list of sizes from {IMAGE_SIZES}, "
            f"got {text!r}"
        )
    return sizes


def _cmd_stage(args: argparse.Namespace) -> int:
    settings = _settings(args)
    weights = Path(args.weights) if args.weights else stage.default_weights()
    if weights is None:
        raise AwsError(
            f"no --weights given and {stage.WEIGHTS_FILE} is not in the Keras cache "
            "(~/.keras/models/); pass --weights PATH"
        )
    uris = stage.stage(
        settings.bucket,
        settings.version,
        weights,
        s3_client=_client("s3", settings.region),
        image_sizes=_image_sizes(args.image_sizes),
        wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
    )
    for name, uri in uris.items():
        print(f"{name}: {uri}")
    return 0


def _cmd_wheelhouse(args: argparse.Namespace) -> int:
    stage.download_wheelhouse(args.arch, Path(args.destination))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    findings = doctor.run_checks(settings, clients=account.client_factory(settings.region))
    return doctor.report(findings)


def _cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    config = cluster.render_config(settings, args.config)
    # Artifacts not staged, or wheels of another architecture, would fail the bootstrap ten
    # minutes in, on a cluster already billed.
    clients = account.client_factory(settings.region)
    doctor.require(doctor.check_artifacts(settings, clients("s3"), compare=False))
    doctor.require(doctor.check_offline_wheels(settings, clients, config))
    cluster.up(
        settings,
        emr_client=_client("emr", settings.region),
        config=config,
        poll_seconds=args.poll_seconds,
        max_attempts=args.max_attempts,
        key_file=args.key_file,
    )
    return 0


def _check_run_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations ``emr run`` would otherwise quietly ignore."""
    refuse_unused_classifier_options(args)
    if args.via != "livy" and not args.cluster_id:
        raise AwsError(f"--via {args.via} needs --cluster-id (the id `emr up` printed)")
    for name, via in (
        ("livy_url", "livy"),
        ("livy_ca_bundle", "livy"),
        ("livy_insecure", "livy"),
        ("notebook_service_role", "notebook-execution"),
        ("master_security_group", "notebook-execution"),
    ):
        if getattr(args, name) and args.via != via:
            raise AwsError(
                f"{option_flag(name)} applies to --via {via} only; this run is --via {args.via}"
            )
    if args.no_wait and args.via != "step":
        raise AwsError(
            f"--no-wait applies to --via step only: --via {args.via} runs the notebooks one "
            "after the other and must wait for each"
        )
    for name, does in (
        ("incremental", "featurizes what changed since the features of an earlier run"),
        ("reuse_features", "keeps the features of an earlier run"),
    ):
        if getattr(args, name) and not (args.output or args.run_id):
            raise AwsError(
                f"{option_flag(name)} {does}: give that run's --output "
                "s3://BUCKET/runs/RUN_ID (or its --run-id); a new output has none, so every "
                "image would be featurized"
            )
    problem = execution_timeout_problem(args.execution_timeout)
    if problem:
        raise AwsError(problem)
    if args.execution_timeout is not None and args.via == "notebook-execution":
        raise AwsError(
            "--execution-timeout applies to --via step and livy: EMR notebook executions "
            "have no time limit per cell (--max-attempts bounds the wait)"
        )


def _run_options(args: argparse.Namespace, settings: EmrSettings, run_id: str) -> runs.RunOptions:
    _check_run_arguments(args)
    base = settings.artifacts_uri
    folder = stage.PYSPARK_NOTEBOOKS if args.via == "notebook-execution" else "notebooks"
    options = runs.RunOptions(
        input=None if args.manifest else (args.input or f"s3://{settings.bucket}/input/"),
        manifest=args.manifest,
        incremental=args.incremental,
        output=args.output or f"s3://{settings.bucket}/runs/{run_id}",
        weights=args.weights or f"{base}/models/{stage.WEIGHTS_FILE}",
        notebooks=f"{base}/{folder}",
        k=args.k,
        variance=args.variance,
        engine=args.engine,
        skip_classify=args.skip_classify,
        max_records_per_batch=settings.arrow_max_records_per_batch,
        tuning=tuning_values(args),
        execution_timeout=args.execution_timeout,
    )
    # The notebooks' parameters, checked here as `imagepca run` checks them: a step would
    # carry an impossible one to the cluster, to fail there.
    runs.notebook_runs(options, master=None)
    for warning in runs.outside_instance_role(options, settings.bucket):
        print(f"warning: {warning}", file=sys.stderr)
    # A step runs the `imagepca run` staged beside the notebooks, which knows what they hold.
    if options.skip_classify or args.via == "step":
        return options
    # Artifacts staged before notebook 03 existed: run what is there.
    s3 = _client("s3", settings.region)
    if runs.s3_exists(s3, f"{options.notebooks}/03_classify.ipynb"):
        return options
    return runs.RunOptions(**{**vars(options), "skip_classify": True})


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    run_id = args.run_id or runs.new_run_id()
    options = _run_options(args, settings, run_id)
    emr = _client("emr", settings.region)
    s3 = _client("s3", settings.region)
    print(f"run id: {run_id}")
    if args.via == "notebook-execution":
        requests = runs.notebook_execution_requests(
            args.cluster_id, options, run_id,
            args.notebook_service_role or settings.notebook_service_role,
            security_group=args.master_security_group,
        )  # fmt: skip
        runs.run_notebook_executions(
            requests, options.output, emr_client=emr, s3_client=s3,
            poll_seconds=args.poll_seconds, max_attempts=args.max_attempts,
        )  # fmt: skip
    elif args.via == "livy":
        livy_url = args.livy_url or cluster.endpoints(settings, emr).livy_url
        runs.run_via_livy(
            options, livy_url, ca_bundle=args.livy_ca_bundle, insecure=args.livy_insecure
        )
    else:
        runs.run_step(
            args.cluster_id, options, run_id,
            emr_client=emr, s3_client=s3, wait=not args.no_wait,
            poll_seconds=args.poll_seconds, max_attempts=args.max_attempts,
            log_bucket=settings.bucket,
        )  # fmt: skip
        return 0
    runs.list_outputs(options.output, s3_client=s3)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    region = _region(args)
    cluster.down(
        args.cluster_id, emr_client=_client("emr", region), wait=not args.no_wait,
        poll_seconds=args.poll_seconds, max_attempts=args.max_attempts,
    )  # fmt: skip
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    region, path = _region(args), _settings_path(args)
    bucket = args.bucket or (EmrSettings.load_raw(path).get("bucket") if path else None)
    status.cluster_status(
        args.cluster_id, emr_client=_client("emr", region), s3_client=_client("s3", region),
        log_bucket=bucket,
    )  # fmt: skip
    return 0


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run the notebooks headlessly on a cluster and list the outputs",
        description=(
            "Run the notebooks on the cluster: as an EMR step running "
            "`python3.11 -m imagepca run ... --master yarn` (default), as EMR Studio "
            "notebook executions (--via notebook-execution), or with papermill here and "
            "the PySpark kernel through Livy (--via livy)."
        ),
    )  # fmt: skip
    _add_settings_options(run)
    run.add_argument("--cluster-id", help="the cluster (not needed with --via livy)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--input", help="s3:// input (default: s3://BUCKET/input/)")
    source.add_argument(
        "--manifest", help="s3:// CSV/Parquet list of image URIs or S3 Inventory manifest.json"
    )
    run.add_argument(
        "--incremental",
        action="store_true",
        help="featurize only images new or changed since the features in --output",
    )
    run.add_argument("--output", help="s3:// output (default: s3://BUCKET/runs/RUN_ID)")
    run.add_argument("--run-id", help="run id (default: UTC time + random suffix)")
    run.add_argument("--weights", help="s3:// weights (default: the staged weights)")
    choice = run.add_mutually_exclusive_group()
    choice.add_argument("--k", type=int, help="number of PCA components")
    choice.add_argument("--variance", type=float, help="explained-variance threshold")
    run.add_argument("--engine", choices=("keras", "tflite"))
    add_tuning_options(run, defaults=False)
    run.add_argument(
        "--execution-timeout",
        type=int,
        help="seconds one notebook cell may run (--via step and livy)",
    )
    run.add_argument("--skip-classify", action="store_true")
    run.add_argument(
        "--via",
        choices=("step", "notebook-execution", "livy"),
        default="step",
        help="step: papermill on the primary node (EMR step); notebook-execution: EMR "
        "StartNotebookExecution; livy: papermill here with the PySpark kernel over Livy",
    )
    run.add_argument(
        "--livy-url",
        help="Livy URL for --via livy (default: the SSH tunnel that `emr up` prints, "
        "https://localhost:8998 when the security configuration encrypts in transit)",
    )
    run.add_argument("--livy-ca-bundle", help="PEM file trusted for an https Livy URL")
    run.add_argument(
        "--livy-insecure",
        action="store_true",
        help="do not verify Livy's TLS certificate (anyone on the path can read the session)",
    )
    run.add_argument(
        "--notebook-service-role",
        help="EMR notebooks service role for --via notebook-execution (default: the "
        f"settings' notebook_service_role, {NOTEBOOK_SERVICE_ROLE} unless set; the operator "
        "policy may pass that one; not the cluster's service role)",
    )
    run.add_argument("--master-security-group", help="notebook-execution engine SG")
    run.add_argument("--no-wait", action="store_true", help="submit and return")
    _add_wait_options(run, 240)
    run.set_defaults(func=_guard(_cmd_run))


def _add_emr(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(
        subparsers,
        "emr",
        help="stage artifacts, start an EMR cluster, run the notebooks on it, stop it",
        description="Run imagepca on AWS EMR 7.x (see docs/emr.md).",
    )

    render = commands.add_parser(
        "render", help="print the run_job_flow request built from emr_config.json + settings",
        description="Print the RunJobFlow request `emr up` would send; nothing is sent.",
    )  # fmt: skip
    _add_settings_options(render)
    render.add_argument("--config", help="cluster template (default: ./emr_config.json)")
    render.set_defaults(func=_guard(_cmd_render))

    security = commands.add_parser(
        "security-config",
        help="create the EMR security configuration (encryption at rest/in transit, IMDSv2)",
        description=(
            "Create the security configuration from aws/emr-security-configuration.json: "
            "KMS local-disk/EBS encryption at rest (S3 objects keep the bucket's default "
            "encryption), TLS in transit from a PEM certificate zip in S3, IMDSv2 required "
            "on all nodes."
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
            "s3://BUCKET/artifacts/VERSION/. Files whose content is unchanged are skipped."
        ),
    )
    _add_settings_options(stage_parser)
    stage_parser.add_argument(
        "--weights", help=f"local {stage.WEIGHTS_FILE} (default: Keras cache)"
    )
    stage_parser.add_argument(
        "--wheelhouse", help="folder of dependency wheels to stage too (see `emr wheelhouse`)"
    )
    stage_parser.add_argument(
        "--image-sizes",
        default="224",
        help="input sizes to stage a converted TFLite model for, comma-separated (default 224)",
    )
    stage_parser.set_defaults(func=_guard(_cmd_stage))

    wheelhouse = commands.add_parser(
        "wheelhouse",
        help="download every dependency wheel for offline nodes (private subnets)",
        description=(
            "pip download the pinned requirements as wheels for EMR 7 nodes of one "
            "architecture (python 3.11, glibc 2.34), from any machine; then "
            '`emr stage --wheelhouse DIR` and set "offline": true.'
        ),
    )
    wheelhouse.add_argument("destination", metavar="DIR")
    wheelhouse.add_argument("--arch", choices=stage.ARCHES, default="x86_64")
    wheelhouse.set_defaults(func=_guard(_cmd_wheelhouse))

    doctor_parser = commands.add_parser(
        "doctor",
        help="check the account before `emr up`: bucket, key, roles, network, artifacts",
        description=(
            "Checks what the caller's credentials can see before a cluster is created, and "
            "prints each finding with its fix. Exit status 1 when something would stop "
            "the cluster or the run."
        ),
    )
    _add_settings_options(doctor_parser)
    doctor_parser.set_defaults(func=_guard(_cmd_doctor))

    up = commands.add_parser(
        "up", help="start the cluster and wait until it is ready",
        description="Render emr_config.json, submit it, wait for WAITING, print addresses.",
    )  # fmt: skip
    _add_settings_options(up)
    up.add_argument("--config", help="cluster template (default: ./emr_config.json)")
    up.add_argument("--key-file", help="private key path shown in the SSH command")
    _add_wait_options(up, 120)
    up.set_defaults(func=_guard(_cmd_up))

    _add_run(commands)

    down = commands.add_parser(
        "down", help="terminate the cluster",
        description="Terminate the cluster; wait until it has terminated unless --no-wait.",
    )  # fmt: skip
    _add_settings_options(down)
    down.add_argument("--cluster-id", required=True)
    down.add_argument("--no-wait", action="store_true")
    _add_wait_options(down, 60)
    down.set_defaults(func=_guard(_cmd_down))

    status_parser = commands.add_parser(
        "status", help="the cluster's state, and each run's step, output and completeness",
        description="Print the cluster's state and its newest steps: for each run, its state, "
        "its output and whether that output is complete (_SUCCESS), or its log.",
    )  # fmt: skip
    _add_settings_options(status_parser)
    status_parser.add_argument("--cluster-id", required=True)
    status_parser.set_defaults(func=_guard(_cmd_status))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``aws`` and ``emr`` command groups to the imagepca CLI."""
    add_aws(subparsers)
    _add_emr(subparsers)
