"""Run the notebooks headlessly with papermill, in order, into the run's output.

The notebooks stay the single source of the workflow: the CLI, EMR steps and tests all
execute them through :func:`run_notebooks`, with the parameters injected by papermill and
the executed copies saved under ``OUTPUT/notebooks/`` for the record.

What a person sees meanwhile is a :class:`Console`: one line as each notebook starts and
ends, the featurization progress line the kernel prints (:mod:`imagepca.progress`), and
``warning:`` lines. Everything else the kernel writes (Spark's and TensorFlow's logs, the
cells' own output) goes to the run's log file, ``OUTPUT/logs/run.log``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TextIO

from .config import ExtractParams, ReduceParams
from .storage import METRICS_FILE, join

EXTRACT_NOTEBOOK = "01_extract_features.ipynb"
REDUCE_NOTEBOOK = "02_reduce_pca.ipynb"
CLASSIFY_NOTEBOOK = "03_classify.ipynb"


# The kernel of local runs: the notebooks' Python runs in it, with its own Spark JVM (not so
# for sparkmagic's pysparkkernel, whose code runs in a Livy session on the cluster).
LOCAL_KERNEL = "python3"
# Local runs on folders of at most this many images get a JVM compiling with C1 only: measured
# faster at 2,000 and 10,000 images, slower at 100,000 (imagepca.session.QUICK_JIT_ENV).
QUICK_JIT_MAX_IMAGES = 20_000
STOP_SPARK_CODE = "from imagepca.session import stop_spark\nstop_spark()"

LOG_FILE = "logs/run.log"  # under the output (a local file first when the output is remote)
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_WARNING = re.compile(r"^warning: ")  # lowercase: ours (progress), not a library's WARNING:


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook, the error and the copy."""


def notebooks_dir() -> str:
    """The repository's ``notebooks/`` in a source tree, else the copy inside the wheel."""
    source_tree = Path(__file__).resolve().parents[2] / "notebooks"
    if (source_tree / EXTRACT_NOTEBOOK).is_file():
        return str(source_tree)
    return str(resources.files("imagepca") / "notebooks")


def has_notebook(notebooks: str | None, name: str) -> bool:
    """Whether ``name`` is among the notebooks (remote folders are assumed complete)."""
    source = notebooks or notebooks_dir()
    if "://" in source and not source.startswith("file://"):
        return True
    return Path(source.removeprefix("file://"), name).is_file()


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


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def jvm_environment(extract: ExtractParams, *, master: str | None, kernel: str) -> dict[str, str]:
    """The kernel's environment for its local JVM: C1 only for a run on a small local folder.

    A local JVM lives as long as the run. C2's compilations cost a short run more than its
    code gives back, and the reverse holds for a long one (see
    :data:`imagepca.session.QUICK_JIT_ENV`), so the folder's image files are counted first,
    up to :data:`QUICK_JIT_MAX_IMAGES`. A setting of ``IMAGEPCA_JVM_QUICK_JIT`` wins.
    """
    from .images import IMAGE_EXTENSIONS
    from .session import QUICK_JIT_ENV

    local_master = master is None or master.startswith("local")
    if QUICK_JIT_ENV in os.environ or kernel != LOCAL_KERNEL or not local_master:
        return {}
    if extract.input is None or not is_local(extract.input):
        return {}  # a manifest, or an object store: nothing cheap to count, large runs
    count = 0
    for _, _, names in os.walk(extract.input.removeprefix("file://")):
        count += sum(name.lower().endswith(IMAGE_EXTENSIONS) for name in names)
        if count > QUICK_JIT_MAX_IMAGES:
            return {}
    return {QUICK_JIT_ENV: "1"}


def log_path(output: str) -> Path:
    """Where the run's log goes: ``OUTPUT/logs/run.log``, or a local temporary file when the
    output is remote (copied to ``OUTPUT/logs/run.log`` when the run ends)."""
    if is_local(output):
        return Path(output.removeprefix("file://"), LOG_FILE)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(tempfile.gettempdir(), f"imagepca-run-{stamp}-{os.getpid()}.log")


class Console:
    """What a run shows in the terminal, and its log file.

    ``quiet``: nothing here (the caller prints the summary). ``normal``: a line as each
    notebook starts and ends, the progress line, ``warning:`` lines. ``verbose``: also every
    cell's output and the kernels' own logs. The log file gets everything in every mode.
    """

    NON_TTY_PROGRESS_S = 10.0  # a log or a CI console gets a progress line this often at most

    def __init__(
        self, mode: str = NORMAL, stream: TextIO | None = None, log: Path | None = None
    ) -> None:
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.log_path = log
        self.log: TextIO | None = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_progress = False
        self._last_progress = -self.NON_TTY_PROGRESS_S

    def __enter__(self) -> Console:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(self.log_path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        return self

    def __exit__(self, *exc) -> None:
        self._close_progress()
        if self.log is not None:
            self.log.close()

    def _log(self, text: str) -> None:
        if self.log is not None and not self.log.closed:
            self.log.write(text)

    def _show(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _close_progress(self) -> None:
        if self._open_progress:
            self._show("\n")
            self._open_progress = False

    def line(self, text: str) -> None:
        """A status line: shown unless quiet, always logged."""
        self._log(f"[imagepca] {text}\n")
        if self.mode != QUIET:
            self._close_progress()
            self._show(text + "\n")

    def warning(self, text: str) -> None:
        """A ``warning:`` line from a kernel: shown unless quiet."""
        if self.mode != QUIET:
            self._close_progress()
            self._show(text + "\n")

    def progress(self, text: str, final: bool = False) -> None:
        """The refreshed progress line: in place on a terminal, every few seconds elsewhere."""
        if self.mode == QUIET:
            return
        if self._tty:
            self._show(f"\r\x1b[K{text}")
            self._open_progress = True
            if final:
                self._close_progress()
            return
        now = time.monotonic()
        if final or now - self._last_progress >= self.NON_TTY_PROGRESS_S:
            self._last_progress = now
            self._show(text + "\n")

    def cell_output(self) -> _CellStream:
        """A file-like sink for papermill's ``stdout_file`` / ``stderr_file``."""
        return _CellStream(self)

    @contextmanager
    def python_logging(self):
        """This process's Python logging (papermill, jupyter_client) into the log file, and
        to the terminal too when verbose."""
        root = logging.getLogger()
        handlers: list[logging.Handler] = []
        if self.log is not None:
            handlers.append(logging.StreamHandler(self.log))
        if self.mode == VERBOSE:
            handlers.append(logging.StreamHandler(self.stream))
        for handler in handlers:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            root.addHandler(handler)
        level = root.level
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.setLevel(level)
            for handler in handlers:
                root.removeHandler(handler)

    def kernel_manager(self, kernel: str):
        """A kernel manager whose kernel writes its stdout and stderr (Spark, TensorFlow,
        ipykernel logs) to the log file, or to this terminal when verbose."""
        from jupyter_client.manager import AsyncKernelManager

        log = None if self.mode == VERBOSE else self.log

        class LoggedKernelManager(AsyncKernelManager):
            async def start_kernel(self, **kw):
                if log is not None:
                    kw.setdefault("stdout", log)
                    kw.setdefault("stderr", log)
                return await super().start_kernel(**kw)

        return LoggedKernelManager(kernel_name=kernel)


class _CellStream:
    """Receives a notebook's stream output as the cells write it.

    A segment written after ``\\r`` is the kernel's refreshed progress line; a line that
    starts with ``warning:`` is a warning; everything goes to the log, and every line to the
    terminal too when verbose.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._buffer = ""
        self._after_cr = False

    def write(self, text: str) -> int:
        self.console._log(text.replace("\r", "\n"))
        self._buffer += text
        while (match := re.search(r"[\r\n]", self._buffer)) is not None:
            segment, end = self._buffer[: match.start()], match.group()
            self._buffer = self._buffer[match.end() :]
            self._segment(segment, refreshed=self._after_cr, final=end == "\n")
            self._after_cr = end == "\r" or (self._after_cr and not segment.strip())
        return len(text)

    def _segment(self, segment: str, *, refreshed: bool, final: bool) -> None:
        console = self.console
        if not segment.strip():
            return
        if refreshed:
            console.progress(segment.strip(), final=final)
        elif _WARNING.match(segment):
            console.warning(segment.rstrip())
        elif console.mode == VERBOSE:
            console._close_progress()
            console._show(f"{segment}\n")

    def flush(self) -> None:
        pass


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
    from papermill.exceptions import PapermillExecutionError

    source = notebooks or notebooks_dir()
    if "://" not in output or output.startswith("file://"):
        Path(output.removeprefix("file://"), "notebooks").mkdir(parents=True, exist_ok=True)
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
    try:
        for number, run in enumerate(runs, 1):
            if run.name == CLASSIFY_NOTEBOOK and _classification_skipped(output):
                continue
            destination = join(output, "notebooks", run.name)
            label = f"[{number}/{len(runs)}] {run.name}"
            started = time.perf_counter()
            if console is not None:
                console.line(f"{label} ...")
            try:
                papermill.execute_notebook(
                    join(source, run.name),
                    destination,
                    parameters=run.parameters,
                    kernel_name=kernel,
                    language="python",
                    execution_timeout=execution_timeout,
                    start_timeout=start_timeout,
                    log_output=log_output,
                    progress_bar=False,
                    cwd=None,
                    km=kernel_manager,
                    **streams,
                )
            except PapermillExecutionError as error:
                _ended(console, label, started, failed=True)
                raise NotebookFailed(
                    f"{run.name} failed in cell {error.exec_count}: {error.ename}: "
                    f"{error.evalue.strip().splitlines()[-1] if error.evalue.strip() else ''} "
                    f"(executed notebook: {destination})"
                ) from None
            except Exception as error:  # kernel died, cell timeout, unreachable Livy...
                _ended(console, label, started, failed=True)
                raise NotebookFailed(
                    f"{run.name} did not complete: {type(error).__name__}: {error} "
                    f"(partial notebook: {destination})"
                ) from None
            _ended(console, label, started)
    finally:
        if kernel_manager.has_kernel:
            if kernel == LOCAL_KERNEL:
                run_sync(_stop_kernel_spark)(kernel_manager)
            run_sync(kernel_manager.shutdown_kernel)(now=False)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return read_metrics(output)


def _skip_slow_optional_imports() -> None:
    """Keep jsonschema from importing ``rfc3987_syntax`` in this process.

    papermill imports nbformat, which imports jsonschema, whose format checkers import
    ``rfc3987_syntax`` when it is installed (JupyterLab's dependencies bring it) to check
    the ``iri`` format; that module builds a Lark grammar when imported: 1.5 s of every
    ``imagepca run`` here. Notebook schemas use no such format, and jsonschema treats the
    module as absent. Has no effect when something imported it already.
    """
    sys.modules.setdefault("rfc3987_syntax", None)


async def _stop_kernel_spark(kernel_manager) -> None:
    """Stop the kernel's Spark (session and JVM) before the kernel is shut down; see
    :func:`imagepca.session.stop_spark`. Best effort: the kernel shutdown follows anyway."""
    if not await kernel_manager.is_alive():
        return
    client = kernel_manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        await client.execute_interactive(
            STOP_SPARK_CODE, silent=True, store_history=False, timeout=120
        )
    except Exception as error:  # a dead or busy kernel: its shutdown still ends it
        logging.getLogger(__name__).warning("could not stop the kernel's Spark: %s", error)
    finally:
        client.stop_channels()


def _ended(console: Console | None, label: str, started: float, failed: bool = False) -> None:
    if console is not None:
        seconds = time.perf_counter() - started
        console.line(f"{label} {'failed after' if failed else 'done in'} {seconds:.1f} s")


def _classification_skipped(output: str) -> bool:
    """Notebook 02 found fewer than 2 usable labels (see ``metrics.json``)."""
    return "skipped" in read_metrics(output).get("classification", {})


def upload_log(log: Path, uri: str) -> str | None:
    """Copy the local log of a run with a remote output to ``uri``; None when that fails."""
    from papermill.iorw import papermill_io

    try:
        papermill_io.write(log.read_text(encoding="utf-8", errors="replace"), uri)
    except Exception:  # the log stays local, and the summary says where
        return None
    return uri


def read_metrics(output: str) -> dict:
    """``OUTPUT/metrics.json`` through papermill's I/O registry (local, s3://, ...)."""
    from papermill.iorw import papermill_io

    return json.loads(papermill_io.read(join(output, METRICS_FILE)))


def summary(metrics: dict, output: str, log: str | None = None) -> str:
    """A few lines for the terminal after a run."""
    timings = metrics.get("timings_s", {})
    lines = []
    if metrics.get("n_rejected"):
        kinds = ", ".join(f"{n} {kind}" for kind, n in metrics.get("rejected_by_kind", {}).items())
        lines.append(
            f"warning: {metrics['n_rejected']} image files rejected ({kinds}): reasons in "
            f"{join(output, 'rejected')}"
        )
    lines += [
        f"images: {metrics['n_images']} featurized, {metrics['n_rejected']} rejected, "
        f"{metrics['n_classes']} classes",
        f"PCA: k = {metrics['k']} components, {metrics['variance_reached']:.1%} of the variance "
        f"(threshold {metrics['variance_threshold']:g}, k {metrics['k_mode']})",
        f"time: {sum(timings.values()):.1f} s in stages, featurization "
        f"{metrics.get('images_per_s') or 0:.1f} images/s",
    ]
    classification = metrics.get("classification", {})
    if "skipped" in classification:
        lines.append(f"classifier skipped: {classification['skipped']}")
    elif classification:
        lines.append(
            f"classifier on reduced features: accuracy "
            f"{classification['reduced']['accuracy']:.3f}, macro F1 "
            f"{classification['reduced']['f1_macro']:.3f}"
        )
    if metrics.get("removed_from_earlier_run"):
        lines.append(
            "removed from an earlier run: " + ", ".join(metrics["removed_from_earlier_run"])
        )
    plots = "projection.png, samples.png"
    if "reduced" in classification:
        plots += ", confusion_matrix.png, k_sweep.png"
    lines.append(f"plots: {join(output, 'explained_variance.png')}, {plots}")
    lines.append(f"outputs: {output}")
    if log:
        lines.append(f"log: {log}")
    return "\n".join(lines)
