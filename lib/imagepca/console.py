"""What a run shows a person, and its log file.

A :class:`Console` shows one line as each notebook starts and ends, the featurization
progress line the kernel prints (:mod:`imagepca.progress`), and ``warning:`` lines.
Everything else the kernel writes (Spark's and TensorFlow's logs, the cells' own output)
goes to the run's log file, ``OUTPUT/logs/run.log``; :func:`summary` is what the terminal
gets when the run has ended.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from .images import skipped_notes
from .storage import LOG_FILE, is_local, join, local_path, papermill_location

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_WARNING = re.compile(r"^warning: ")  # lowercase: ours (progress), not a library's WARNING:


def log_path(output: str) -> Path:
    """Where the run's log goes: ``OUTPUT/logs/run.log``, or a local temporary file when the
    output is remote (copied to ``OUTPUT/logs/run.log`` when the run ends)."""
    if is_local(output):
        return Path(local_path(output), LOG_FILE)
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


def upload_log(log: Path, uri: str) -> str | None:
    """Copy the local log of a run with a remote output to ``uri``; None when that fails."""
    from papermill.iorw import papermill_io

    try:
        with warnings.catch_warnings():  # papermill warns of any file but .ipynb and .json
            warnings.simplefilter("ignore", UserWarning)
            papermill_io.write(
                log.read_text(encoding="utf-8", errors="replace"), papermill_location(uri)
            )
    except Exception:  # the log stays local, and the summary says where
        return None
    return uri


def rate_text(images_per_s: float | None) -> str:
    """Featurization's rate, or why there is none (an increment that found nothing new)."""
    return "no image featurized" if images_per_s is None else f"{images_per_s:.1f} images/s"


def increment_line(increment: dict | None) -> str | None:
    """What an incremental run did (``_extraction.json``'s ``incremental``), or why it was
    a full run; None for a run that was not incremental."""
    increment = increment or {}
    if "kept" in increment:
        read = increment.get("read", increment["featurized"])
        line = (
            f"incremental: {increment['featurized']} new or changed images featurized"
            + (f" of {read} files read" if read != increment["featurized"] else "")
            + f", {increment['kept']} kept, {increment['dropped']} dropped (of files gone or "
            "changed)"
        )
        if increment.get("still_rejected"):
            line += f", {increment['still_rejected']} rejected before and unchanged (not read)"
        return line
    if "full_run_because" in increment:
        return f"incremental: a full run, because {increment['full_run_because']}"
    return None


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
    lines += [f"warning: {note}" for note in skipped_notes(metrics)]
    lines += [
        # In features/: featurized by this run, or reused, or kept by an incremental run.
        f"images: {metrics['n_images']} in features/, {metrics['n_rejected']} rejected, "
        f"{metrics['n_classes']} class{'es' if metrics['n_classes'] != 1 else ''}",
        f"PCA: k = {metrics['k']} components, {metrics['variance_reached']:.1%} of the variance "
        + (
            "(k fixed)"
            if metrics["k_mode"] == "fixed"
            else f"(the fewest reaching {metrics['variance_threshold']:g})"
        ),
        f"time: {sum(timings.values()):.1f} s in stages, "
        + (
            f"features reused (featurized {metrics['reused_features_created_at']})"
            if metrics.get("reused_features_created_at")
            else rate_text(None)
            if metrics.get("images_per_s") is None
            else f"featurization {rate_text(metrics['images_per_s'])}"
        ),
    ]
    increment = increment_line(metrics.get("incremental"))
    if increment:
        lines.append(increment)
    if metrics.get("reuse_refused"):
        lines.append(f"features not reused: {metrics['reuse_refused']}; featurized again")
    classification = metrics.get("classification", {})
    if "skipped" in classification:
        lines.append(f"classifier skipped: {classification['skipped']}")
    elif classification:
        lines.append(
            f"classifier on reduced features: accuracy "
            f"{classification['reduced']['accuracy']:.3f}, macro F1 "
            f"{classification['reduced']['f1_macro']:.3f}"
        )
        excluded = classification.get("excluded_labels") or {}
        if excluded:
            shown = ", ".join(f"{label} ({n})" for label, n in list(excluded.items())[:5])
            more = f" and {len(excluded) - 5} more" if len(excluded) > 5 else ""
            lines.append(
                f"left out of the classifier, fewer than 2 images: {shown}{more} "
                "(metrics.json: classification.excluded_labels)"
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
