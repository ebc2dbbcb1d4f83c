"""``python -m imagepca`` / ``imagepca``: run the notebooks, make the sample, deploy on EMR.

Options are validated here, once, by building the parameter dataclasses; a failed run
exits non-zero with the reason on its last line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import (
    DEFAULT_ENGINE,
    DEFAULT_VARIANCE,
    ENGINES,
    ClassifyParams,
    ExtractParams,
    ParameterError,
    ReduceParams,
    check_master,
    expand_home,
    max_components,
)
from .run_options import (
    add_tuning_options,
    execution_timeout_problem,
    refuse_unused_classifier_options,
    tuning_values,
)


def _add_run(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="execute the notebooks (features, PCA, then the classifier) with papermill",
        description="Extract MobileNetV2 features from a folder-per-class image set, fit "
        "StandardScaler + PCA and a classifier on the reduced features, by executing the "
        "project's notebooks with papermill. "
        "Executed notebooks, datasets, model, metrics and plots go to --output.",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", type=expand_home, help="folder or URI with one sub-folder per class"
    )
    source.add_argument(
        "--manifest",
        type=expand_home,
        help="instead of --input: CSV/Parquet file of image URIs (column `path`, optional "
        "`label`, `size`, `modified`) or an S3 Inventory manifest.json; nothing is listed",
    )
    run.add_argument(
        "--output",
        required=True,
        type=expand_home,
        help="output folder or URI (replaced by the run)",
    )
    run.add_argument(
        "--weights",
        default="imagenet",
        type=expand_home,
        help="'imagenet' (Keras cache, downloaded if absent) or a .h5 file path / s3:// URI",
    )
    choice = run.add_mutually_exclusive_group()
    choice.add_argument("--k", type=int, help="fixed number of PCA components")
    choice.add_argument(
        "--variance",
        type=float,
        default=DEFAULT_VARIANCE,
        help=f"smallest k reaching this cumulative explained variance (default {DEFAULT_VARIANCE})",
    )
    run.add_argument(
        "--master", help="Spark master: local[*] (default), local[N,R], yarn, spark://..."
    )
    run.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE, help="inference engine")
    run.add_argument(
        "--max-records-per-batch",
        type=int,
        default=256,
        help="Arrow batch size (bounds worker memory; fewer files when the largest listed "
        "would carry more than 256 MiB per batch)",
    )
    run.add_argument(
        "--incremental",
        action="store_true",
        help="featurize only files new or changed since the features in --output, append "
        "them as a batch, drop those of files that are gone; then PCA on the whole set",
    )
    add_tuning_options(run)
    run.add_argument("--notebooks", help="folder or s3:// URI of the notebooks (default: bundled)")
    run.add_argument(
        "--kernel", default="python3", help="Jupyter kernel (python3 or pysparkkernel)"
    )
    livy = run.add_argument_group("Livy (--kernel pysparkkernel: sparkmagic, e.g. EMR)")
    livy.add_argument(
        "--livy-url", help="Livy URL (default http://localhost:8998: an SSH tunnel to EMR)"
    )
    livy.add_argument(
        "--livy-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Spark setting of the Livy session (repeatable), e.g. spark.executor.memory=4g",
    )
    livy.add_argument("--livy-driver-memory", help="Livy session driverMemory, e.g. 4g")
    livy.add_argument(
        "--livy-startup-timeout",
        type=int,
        help="seconds the Livy session may take to start (at least 300; default 600)",
    )
    livy.add_argument(
        "--livy-ca-bundle",
        metavar="PEM",
        help="CA bundle to verify an https:// Livy (EMR 7.4+ with in-transit encryption)",
    )
    livy.add_argument(
        "--livy-insecure",
        action="store_true",
        help="do not verify the https:// Livy's certificate (loudly warned; prefer a CA bundle)",
    )
    run.add_argument("--execution-timeout", type=int, help="seconds one notebook cell may run")
    run.add_argument("--skip-classify", action="store_true", help="do not run notebook 03")
    shown = run.add_mutually_exclusive_group()
    shown.add_argument(
        "--quiet", "-q", action="store_true", help="print only the summary at the end"
    )
    shown.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also show every cell's output and the kernel's own logs (Spark, TensorFlow)",
    )
    shown.add_argument("--log-output", action="store_true", help="same as --verbose")
    run.set_defaults(func=_run)


def _livy_options(args: argparse.Namespace) -> dict:
    """The ``--livy-*`` options, as :func:`imagepca.livy.kernel_environment` takes them."""
    return {
        "livy_url": args.livy_url,
        "livy_conf": args.livy_conf,
        "driver_memory": args.livy_driver_memory,
        "ca_bundle": args.livy_ca_bundle,
        "insecure": args.livy_insecure or None,
        "startup_timeout": args.livy_startup_timeout,
    }


def _check_run_options(args: argparse.Namespace) -> None:
    """What Spark, papermill or Jupyter would reject only once the run had begun (a Java
    error for a master, a missing notebook named as a partial one): refused before the run
    writes anything."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from . import livy, runner
    from .storage import is_local, local_path

    check_master(args.master)
    refuse_unused_classifier_options(args)
    problem = execution_timeout_problem(args.execution_timeout)
    if problem:
        raise ParameterError(problem)
    livy.check_kernel_options(args.kernel, master=args.master, **_livy_options(args))
    if args.kernel not in (runner.LOCAL_KERNEL, livy.KERNEL_NAME):
        try:
            KernelSpecManager().get_kernel_spec(args.kernel)
        except NoSuchKernel:
            raise ParameterError(
                f"--kernel {args.kernel}: no such Jupyter kernel here (`jupyter kernelspec "
                f"list` shows them); use {runner.LOCAL_KERNEL} or {livy.KERNEL_NAME}"
            ) from None
    local_input = args.input and is_local(args.input) and args.kernel == runner.LOCAL_KERNEL
    # Noticed in notebook 02 (--k) or 03 (--k-values) otherwise, after notebook 01's work.
    sized = {"--k": [args.k] if args.k is not None else []}
    if not args.skip_classify:
        sized["--k-values"] = args.k_values or []
    largest = max((k for values in sized.values() for k in values), default=None)
    if largest is not None and local_input and os.path.isdir(local_path(args.input)):
        found = runner.local_image_count(args.input, largest)
        most = max_components(found)
        for option, values in sized.items():
            if values and max(values) > most:
                shown = ",".join(map(str, values))
                advice = (
                    f"give {option} up to {most} (less if some are not usable images)"
                    if most > 0
                    else "PCA needs 2"
                )
                advice += ", or --variance" if option == "--k" and most > 0 else ""
                raise ParameterError(
                    f"{option} {shown}: {args.input} holds {found} image files, and the PCA "
                    f"of n images has at most n - 1 components with variance; {advice}"
                )
    bucket = runner.missing_bucket(args.output)
    if bucket:
        raise ParameterError(
            f"--output {args.output}: S3 bucket {bucket!r} does not exist; create it (aws s3 "
            f"mb s3://{bucket}) or choose an output in a bucket of yours"
        )
    needed = [runner.EXTRACT_NOTEBOOK, runner.REDUCE_NOTEBOOK]
    if not args.skip_classify:
        needed.append(runner.CLASSIFY_NOTEBOOK)
    for name in needed:
        if not runner.has_notebook(args.notebooks, name):
            raise ParameterError(
                f"--notebooks {args.notebooks}: no {name} there; pass the folder holding the "
                "project's notebooks, or leave the option out for the bundled ones"
                + ("" if name != runner.CLASSIFY_NOTEBOOK else " (or --skip-classify)")
            )


def _run(args: argparse.Namespace) -> int:
    from . import livy, runner
    from .console import NORMAL, QUIET, VERBOSE, Console, log_path, summary, upload_log
    from .storage import LOG_FILE, is_local, join, local_path

    extract = ExtractParams(
        input=args.input,
        manifest=args.manifest,
        output=args.output,
        weights=args.weights,
        engine=args.engine,
        max_records_per_batch=args.max_records_per_batch,
        incremental=args.incremental,
        **tuning_values(args, ExtractParams),
    )
    reduce = ReduceParams(
        output=args.output,
        k=args.k,
        variance=args.variance,
        **tuning_values(args, ReduceParams),
    )
    classify = ClassifyParams(output=args.output, **tuning_values(args, ClassifyParams))
    _check_run_options(args)
    if args.kernel == livy.KERNEL_NAME:
        locations = {"input": args.input, "manifest": args.manifest, "output": args.output}
        locations["weights"] = None if args.weights == "imagenet" else args.weights
        relative = [
            f"--{name} {value}"
            for name, value in locations.items()
            if value and is_local(value) and not os.path.isabs(local_path(value))
        ]
        if relative:
            raise ParameterError(
                f"{', '.join(relative)}: a relative path means a folder of the Livy session's "
                "driver (in a YARN container on a cluster); pass an s3:// URI, or an absolute "
                "path when Livy runs on this machine"
            )
    runs = runner.plan(
        extract,
        reduce,
        master=args.master,
        classify=not args.skip_classify,
        classify_parameters=classify.as_dict(),
    )
    started = time.perf_counter()
    # The terminal shows the notebooks' progress; Spark's, TensorFlow's and the kernel's own
    # logs go to the log file (all of it with --verbose, only the summary with --quiet).
    mode = QUIET if args.quiet else VERBOSE if args.verbose or args.log_output else NORMAL
    log = log_path(args.output)
    remote_log = None if is_local(args.output) else join(args.output, LOG_FILE)
    completed_log = _completed_run_log(args.output, log)
    try:
        with (
            Console(mode, log=log) as console,
            console.python_logging(),
            livy.kernel_environment(args.kernel, master=args.master, **_livy_options(args)) as env,
        ):
            metrics = runner.run_notebooks(
                runs,
                args.output,
                notebooks=args.notebooks,
                kernel=args.kernel,
                execution_timeout=args.execution_timeout,
                env={
                    **(env or {}),
                    **runner.jvm_environment(extract, master=args.master, kernel=args.kernel),
                },
                console=console,
            )
    except BaseException as error:
        log, remote_log = _stopped_run_log(args.output, log, remote_log, completed_log)
        print(f"log: {log}", file=sys.stderr)
        if isinstance(error, KeyboardInterrupt):  # what the output holds now: the next step
            error.args = (_stopped_output_note(args.output, incremental=args.incremental),)
        raise
    finally:
        if remote_log and log.is_file():
            remote_log = upload_log(log, remote_log)
    shown_log = f"{log} (copied to {remote_log})" if remote_log else str(log)
    print(summary(metrics, args.output, log=shown_log))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _completed_run_log(output: str, log: Path) -> str | None:
    """The log of the run that completed the local ``output``, which this run's replaces."""
    from .executed import is_complete

    if log.is_file() and is_complete(output):
        return log.read_text(encoding="utf-8", errors="replace")
    return None


def _stopped_run_log(
    output: str, log: Path, remote_log: str | None, completed: str | None
) -> tuple[Path, str | None]:
    """Where a run that did not complete leaves its log (and its copy, for a remote output):
    ``logs/run.log``, unless the output still holds the run that completed it (this one
    stopped before touching it). Then that run's log stays, and this one goes to
    ``logs/stopped-run.log``, as its notebook 01 goes to ``logs/``."""
    from .executed import is_complete
    from .storage import STOPPED_LOG_FILE, join

    if not is_complete(output):
        return log, remote_log
    if remote_log is not None:
        return log, join(output, STOPPED_LOG_FILE)
    stopped = log.with_name(Path(STOPPED_LOG_FILE).name)
    os.replace(log, stopped)
    if completed is not None:
        log.write_text(completed, encoding="utf-8")
    return stopped, None


def _stopped_output_note(output: str, *, incremental: bool) -> str:
    from .executed import is_complete

    if is_complete(output):
        return f"{output} is complete: it holds the last run that completed there"
    if incremental:  # --reuse-features would refuse features/ for an input that changed
        return (
            f"{output} is incomplete (no _SUCCESS); run the same command again: --incremental "
            "featurizes what features/ lacks, including what this run had not committed"
        )
    return (
        f"{output} is incomplete (no _SUCCESS); run again (--reuse-features keeps features/ "
        "if their featurization had finished)"
    )


def _add_sample(subparsers) -> None:
    sample = subparsers.add_parser(
        "sample",
        help="write the generated Fruits-360-like sample data set",
        description="Write a deterministic folder-per-class set of fruit-like 100x100 JPEGs.",
    )
    sample.add_argument("out", help="folder to write (created; refused if it holds other files)")
    sample.add_argument("--classes", type=int, default=6, help="number of classes (default 6)")
    sample.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    sample.add_argument("--size", type=int, default=100, help="image side in pixels (default 100)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    from .sample import write_sample

    summary = write_sample(
        args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed
    )
    print(f"wrote {summary.total} images in {len(summary.class_names)} classes to {summary.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagepca",
        description="Images -> MobileNetV2 features -> StandardScaler + PCA on Spark, "
        "driven by parameterized notebooks (local or AWS EMR).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(subparsers)
    _add_sample(subparsers)
    for module in _command_groups():
        module.add_commands(subparsers)
    return parser


def _command_groups():
    from .aws import commands

    return (commands,)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as error:
        from .runner import RunTerminated

        note = f": {error}" if str(error) else ""
        if isinstance(error, RunTerminated):
            print(f"error: terminated (SIGTERM){note}", file=sys.stderr)
            return 128 + 15  # as a shell reports a process SIGTERM ended
        print(f"error: interrupted{note}", file=sys.stderr)
        return 130
    except (ParameterError, ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        if isinstance(error, ParameterError):
            print(f"error: {error.option_message()}", file=sys.stderr)
            return 2
        print(f"error: {error}", file=sys.stderr)
        return 1
