"""Run the notebooks headlessly with papermill, in order, into the run's output.

The notebooks stay the single source of the workflow: the CLI, EMR steps and tests all
execute them through :func:`run_notebooks`, with the parameters injected by papermill and
the executed copies saved under ``OUTPUT/notebooks/`` for the record.

What a person sees meanwhile, and the run's log file, is an
:class:`imagepca.console.Console`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from .config import S3_SCHEMES, ExtractParams, ReduceParams
from .console import Console
from .executed import completed_copy, keep_completed_copy, record_stop
from .kernel import PromptKernelClient, recording_engine, stop_kernel_spark, stopping_clients
from .local_folders import image_files
from .storage import (  # the notebooks' names: imported from here too (cli, aws.runs)
    CLASSIFY_NOTEBOOK,
    EXECUTED_DIR,
    EXTRACT_NOTEBOOK,
    EXTRACTION_FILE,
    METRICS_FILE,
    REDUCE_NOTEBOOK,
    is_local,
    join,
    local_path,
    papermill_location,
)

# The kernel of local runs: the notebooks' Python runs in it, with its own Spark JVM (not so
# for sparkmagic's pysparkkernel, whose code runs in a Livy session on the cluster).
LOCAL_KERNEL = "python3"
# Local runs on folders of at most this many images get a JVM compiling with C1 only: measured
# faster at 2,000 and 10,000 images, slower at 100,000 (imagepca.session.QUICK_JIT_ENV).
QUICK_JIT_MAX_IMAGES = 20_000


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook, the error and the copy."""


class RunTerminated(KeyboardInterrupt):
    """SIGTERM to the run (``kill``, ``timeout``, a scheduler's cancel), handled as Ctrl-C
    is: the cell it stopped is marked, the kernel's Spark is stopped."""


def notebooks_dir() -> str:
    """The repository's ``notebooks/`` in a source tree, else the copy inside the wheel."""
    source_tree = Path(__file__).resolve().parents[2] / "notebooks"
    if (source_tree / EXTRACT_NOTEBOOK).is_file():
        return str(source_tree)
    return str(resources.files("imagepca") / "notebooks")


def has_notebook(notebooks: str | None, name: str) -> bool:
    """Whether ``name`` is among the notebooks (remote folders are assumed complete)."""
    source = notebooks or notebooks_dir()
    if not is_local(source):
        return True
    return Path(local_path(source), name).is_file()


def missing_bucket(output: str) -> str | None:
    """The bucket of an ``s3://`` output (or ``s3a://``) that S3 says does not exist, which
    papermill would find only at its first write; None otherwise, also when S3 cannot be
    asked here (no credentials, no route, no permission): the run's own writes will say.

    Asked as papermill's writes ask (boto3, its endpoint and credentials), once: a listing
    of one key under the output, whose error body names ``NoSuchBucket`` (a HEAD's 404
    could be a proxy's; an instance role may list only some prefixes).
    """
    from urllib.parse import urlsplit

    location = urlsplit(output)
    if location.scheme.lower() not in S3_SCHEMES or not location.netloc:
        return None
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    once = Config(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 1})
    key = location.path.strip("/")
    try:
        boto3.client("s3", config=once).list_objects_v2(
            Bucket=location.netloc, Prefix=f"{key}/" if key else "", MaxKeys=1
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return location.netloc
    except BotoCoreError:
        pass
    return None


def _taken_literally(path: str) -> str:
    """``path`` as papermill reads it literally: it formats notebook paths with the run's
    parameters (``runs/{k}/02.ipynb``), which would make ``out {a,b}`` a missing parameter."""
    return path.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class NotebookRun:
    """One notebook to execute and the parameters papermill injects into it."""

    name: str
    parameters: dict


def plan(
    extract: ExtractParams,
    reduce: ReduceParams,
    *,
    master: str | None = None,
    classify: bool = False,
    classify_parameters: dict | None = None,
) -> list[NotebookRun]:
    """The notebooks of a run and their parameters, in execution order."""
    common = {"master": master}
    # Notebook 03 completes the output when it runs: no _SUCCESS between the two.
    reduce = replace(reduce, then_classify=classify)
    runs = [
        NotebookRun(EXTRACT_NOTEBOOK, {**extract.as_dict(), **common}),
        NotebookRun(REDUCE_NOTEBOOK, {**reduce.as_dict(), **common}),
    ]
    if classify:
        runs.append(
            NotebookRun(
                CLASSIFY_NOTEBOOK,
                {"output": reduce.output, **common, **(classify_parameters or {})},
            )
        )
    return runs


def jvm_environment(extract: ExtractParams, *, master: str | None, kernel: str) -> dict[str, str]:
    """The kernel's environment for its local JVM: C1 only for a run on a small local folder.

    A local JVM lives as long as the run. C2's compilations cost a short run more than its
    code gives back, and the reverse holds for a long one (see
    :data:`imagepca.session.QUICK_JIT_ENV`), so the folder's image files are counted first,
    up to :data:`QUICK_JIT_MAX_IMAGES`. A setting of ``IMAGEPCA_JVM_QUICK_JIT`` wins.
    """
    from .session import QUICK_JIT_ENV

    local_master = master is None or master.startswith("local")
    if QUICK_JIT_ENV in os.environ or kernel != LOCAL_KERNEL or not local_master:
        return {}
    if extract.input is None or not is_local(extract.input):
        return {}  # a manifest, or an object store: nothing cheap to count, large runs
    if local_image_count(extract.input, QUICK_JIT_MAX_IMAGES) > QUICK_JIT_MAX_IMAGES:
        return {}
    return {QUICK_JIT_ENV: "1"}


def local_image_count(folder: str, limit: int) -> int:
    """Image files under a local folder, counted until there are more than ``limit``.

    Counted as Spark lists them (:func:`imagepca.local_folders.image_files`), before any is
    found unusable: never fewer than the run will featurize, so a check against it refuses
    only what cannot work.
    """
    from .images import IMAGE_EXTENSIONS

    count = 0
    for _, kind in image_files(local_path(folder), IMAGE_EXTENSIONS):
        count += kind == "listed"
        if count > limit:
            break
    return count


def cell_error_line(ename: str, evalue: str) -> str:
    """The line of a failed cell's error for the terminal: the end of Python's message, or
    for a Java error (py4j's call, then the exception and its stack) the exception's line."""
    lines = [line.strip() for line in evalue.strip().splitlines() if line.strip()]
    if ename == "Py4JJavaError":
        java = [line.removeprefix(": ") for line in lines if line.startswith(": ")]
        if java:
            return java[0]
    return lines[-1] if lines else ""


def run_notebooks(
    runs: list[NotebookRun],
    output: str,
    *,
    notebooks: str | None = None,
    kernel: str = "python3",
    execution_timeout: int | None = None,
    start_timeout: int = 120,
    log_output: bool = False,
    env: dict[str, str] | None = None,
    console: Console | None = None,
) -> dict:
    """Execute ``runs`` with papermill and return the run's ``metrics.json``.

    Parameters
    ----------
    runs : list of NotebookRun
        From :func:`plan`.
    output : str
        The run's output location; executed notebooks go to ``OUTPUT/notebooks/``.
    notebooks : str, optional
        Folder or URI (``s3://``) holding the notebooks; defaults to :func:`notebooks_dir`.
    kernel : str
        ``python3`` (local Spark or the EMR primary node) or ``pysparkkernel`` (Livy).
    execution_timeout : int, optional
        Seconds one cell may run.
    env : dict, optional
        Extra environment variables for the kernel (e.g. ``SPARKMAGIC_CONF_DIR``).
    console : Console, optional
        Shows each notebook's start and end, the progress line and warnings, and keeps the
        kernel's logs in its log file. Without one, papermill's defaults apply (the kernel
        logs to this process's terminal).

    Raises
    ------
    NotebookFailed
        When a cell raises or times out.
    """
    _skip_slow_optional_imports()
    import papermill
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import CellTimeoutError
    from papermill.exceptions import PapermillExecutionError

    source = papermill_location(notebooks or notebooks_dir())
    if is_local(output):
        Path(local_path(output), EXECUTED_DIR).mkdir(parents=True, exist_ok=True)
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    # One kernel for every notebook of the run: its Spark session (or Livy session), the
    # warm Python workers and the imported libraries are paid for once, not per notebook.
    # nbclient leaves a kernel it did not start running; it is shut down here at the end.
    if console is not None:
        kernel_manager = console.kernel_manager(kernel)
        streams = {"stdout_file": console.cell_output(), "stderr_file": console.cell_output()}
    else:
        kernel_manager = AsyncKernelManager(kernel_name=kernel)
        streams = {}
    kernel_manager.client_factory = PromptKernelClient  # ready without a 0.2 s wait
    engine = recording_engine() if kernel != LOCAL_KERNEL else None
    stop_clients = stopping_clients(kernel_manager)
    completed = False
    # A notebook 01 stopped (Ctrl-C, a timeout) before it touched a complete output: its copy
    # goes to logs/ once the kernel has stopped, as a notebook 01 that raised does. Held as
    # (its copy, the completed run's copy, a timeout's error that names where it went).
    keep_after_stop: tuple[str, str, NotebookFailed | None] | None = None
    restore_sigterm = _sigterm_interrupts()
    try:
        for number, run in enumerate(runs, 1):
            label = f"[{number}/{len(runs)}] {run.name}"
            skipped = run.name == CLASSIFY_NOTEBOOK and _classification_skipped(output)
            if skipped:
                if console is not None:
                    console.line(f"{label} skipped: {skipped}")
                continue
            destination = join(papermill_location(output), EXECUTED_DIR, run.name)
            kept = completed_copy(output, destination) if run.name == EXTRACT_NOTEBOOK else None
            # A local kernel's cell stops with the kernel (a Livy driver's may not).
            keep_when_stopped = kept is not None and kernel == LOCAL_KERNEL
            started, started_at = time.perf_counter(), time.time()
            if console is not None:
                console.line(f"{label} ...")
            try:
                papermill.execute_notebook(
                    _taken_literally(join(source, run.name)),
                    _taken_literally(destination),
                    parameters=run.parameters,
                    kernel_name=kernel,
                    language="python",
                    execution_timeout=execution_timeout,
                    start_timeout=start_timeout,
                    log_output=log_output,
                    progress_bar=False,
                    cwd=None,
                    km=kernel_manager,
                    engine_name=engine,
                    **streams,
                )
            except KeyboardInterrupt as error:  # Ctrl-C, SIGINT or SIGTERM to the run
                _ended(console, label, started, failed=True)
                if not isinstance(error, RunTerminated):
                    error = KeyboardInterrupt("the run was interrupted here")
                record_stop(destination, error)
                if keep_when_stopped:
                    keep_after_stop = (destination, kept, None)
                raise
            except PapermillExecutionError as error:
                _ended(console, label, started, failed=True)
                destination = keep_completed_copy(output, destination, kept)
                raise NotebookFailed(
                    f"{run.name} failed in cell {error.exec_count}: {error.ename}: "
                    f"{cell_error_line(error.ename, error.evalue)} "
                    f"(executed notebook: {destination})"
                ) from None
            except Exception as error:  # kernel died, cell timeout, unreachable Livy...
                _ended(console, label, started, failed=True)
                # The whole error (a timeout's includes the cell's code) goes to the log;
                # the message, printed last, keeps its first line.
                logging.getLogger(__name__).error("%s did not complete: %r", run.name, error)
                first_line = (str(error).strip().splitlines() or [""])[0]
                failure = NotebookFailed(
                    f"{run.name} did not complete: {type(error).__name__}: {first_line} "
                    f"(partial notebook: {destination})"
                )
                if isinstance(error, CellTimeoutError):
                    record_stop(destination, error)
                    if keep_when_stopped:  # the message then names where the copy went
                        keep_after_stop = (destination, kept, failure)
                raise failure from None
            _ended(console, label, started)
            if run.name == EXTRACT_NOTEBOOK and kernel != LOCAL_KERNEL and is_local(output):
                _check_written_here(output, run.name, since=started_at)
        completed = True
    finally:
        restore_sigterm()  # a second SIGTERM during the clean-up ends the process at once
        if not completed:
            _cancel_abandoned_tasks()
        if kernel_manager.has_kernel:
            if not completed and kernel == LOCAL_KERNEL:
                # A cell may still be running (a timeout, Ctrl-C here): interrupted, as a
                # user would, it ends (PySpark cancels its jobs) and the kernel answers the
                # stop below at once instead of after its 30 s wait.
                with suppress(Exception):
                    run_sync(kernel_manager.interrupt_kernel)()
            stopped = kernel == LOCAL_KERNEL and run_sync(stop_kernel_spark)(kernel_manager)
            # A local kernel whose Spark (and JVM) has stopped holds nothing left to flush or
            # release, so it is ended at once: its own orderly exit (interrupt, shutdown
            # request, Python's teardown, polled every 0.1 s) cost 0.5-0.8 s of every run.
            # Any other kernel is asked to shut down: sparkmagic's deletes its Livy session.
            run_sync(kernel_manager.shutdown_kernel)(now=stopped)
        stop_clients()
        if keep_after_stop is not None:  # nothing of the run touches the output any more
            stopped_copy, completed_run_copy, failure = keep_after_stop
            kept_at = keep_completed_copy(output, stopped_copy, completed_run_copy)
            if failure is not None:
                failure.args = (failure.args[0].replace(stopped_copy, kept_at),)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return read_metrics(output)


def _sigterm_interrupts():
    """Make SIGTERM raise :class:`RunTerminated` until the returned function is called.

    By default SIGTERM ends Python at once: no ``finally`` runs, so the saved notebook
    read as a run in progress and the kernel was left to notice its parent had gone. Only
    from the main thread and over Python's default handler (a caller's own stays).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return lambda: None

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise RunTerminated("the run was terminated here (SIGTERM)")

    def restore() -> None:  # unless something else took SIGTERM since
        if signal.getsignal(signal.SIGTERM) is terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, terminate)
    return restore


def _cancel_abandoned_tasks() -> None:
    """Cancel what a stopped notebook left on this thread's event loop.

    An interrupt (Ctrl-C, SIGTERM) raised while papermill waited for a cell leaves
    nbclient's task for that cell pending on the loop ``run_sync`` keeps per thread. The
    clean-up below runs that loop again: the task would go on handling the stopped cell's
    late messages, and papermill's autosave (30 s after its last save) could rewrite the
    notebook :func:`imagepca.executed.record_stop` has marked. Cancelled, it ends with
    nbclient's own error, which no one needs.
    """
    from jupyter_core.utils import ensure_event_loop

    loop = ensure_event_loop()
    if loop.is_running():  # called from inside a loop: not the one papermill ran
        return
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def _skip_slow_optional_imports() -> None:
    """Keep jsonschema from importing ``rfc3987_syntax`` in this process.

    papermill imports nbformat, which imports jsonschema, whose format checkers import
    ``rfc3987_syntax`` when it is installed (JupyterLab's dependencies bring it) to check
    the ``iri`` format; that module builds a Lark grammar when imported: 1.5 s of every
    ``imagepca run`` here. Notebook schemas use no such format, and jsonschema treats the
    module as absent. Has no effect when something imported it already.
    """
    sys.modules.setdefault("rfc3987_syntax", None)


def _ended(console: Console | None, label: str, started: float, failed: bool = False) -> None:
    if console is not None:
        seconds = time.perf_counter() - started
        console.line(f"{label} {'failed after' if failed else 'done in'} {seconds:.1f} s")


def _check_written_here(output: str, notebook: str, since: float) -> None:
    """Stop a Livy run whose local ``output`` is not this machine's folder.

    A remote kernel's driver writes a local path on its own disk (a YARN container's host
    on EMR), where this process cannot read the metrics nor notebook 03 the features. The
    description notebook 01 writes last tells, before notebooks 02 and 03 run for nothing:
    here, and written since ``since`` (an earlier local run's is older; same clock, as the
    writer is this machine; 2 s for file systems with coarse times).
    """
    written = Path(local_path(output), "features", EXTRACTION_FILE)
    if not written.is_file() or written.stat().st_mtime < since - 2:
        raise NotebookFailed(
            f"{notebook} completed in the Livy session, but {written} is not on this "
            "machine: the session's driver wrote --output on its own disk. Use an s3:// "
            "--output, or a local path only when Livy runs on this machine"
        )


def _classification_skipped(output: str) -> str | None:
    """Why notebook 02 left the classifier out (fewer than 2 usable labels), if it did."""
    return read_metrics(output).get("classification", {}).get("skipped")


def read_metrics(output: str) -> dict:
    """``OUTPUT/metrics.json`` through papermill's I/O registry (local, s3://, ...)."""
    from papermill.iorw import papermill_io

    return json.loads(papermill_io.read(join(papermill_location(output), METRICS_FILE)))
