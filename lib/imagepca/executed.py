"""The executed notebooks a stopped or failed run leaves in its output.

papermill saves each notebook as it runs into ``OUTPUT/notebooks/``. :mod:`imagepca.runner`
calls these when a run does not complete: a stopped cell is marked as papermill marks a cell
that raised, and a notebook 01 that raised, or was stopped, before touching a complete output
goes to ``logs/``, the completed run's copy staying in ``notebooks/``.
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path

from .storage import (
    FAILED_EXTRACT_NOTEBOOK,
    SUCCESS_MARKER,
    is_local,
    join,
    local_path,
    papermill_location,
)


def completed_copy(output: str, destination: str) -> str | None:
    """The executed notebook at ``destination`` when ``output`` holds a completed run."""
    from papermill.iorw import papermill_io

    if not is_complete(output):
        return None
    try:
        return papermill_io.read(destination)
    except Exception:  # no copy of this notebook
        return None


def is_complete(output: str) -> bool:
    """Whether ``output`` holds ``_SUCCESS`` (local, ``s3://``: papermill's I/O registry)."""
    from papermill.iorw import papermill_io

    try:
        papermill_io.read(join(papermill_location(output), SUCCESS_MARKER), extensions=None)
    except Exception:  # not there (each handler raises its own error)
        return False
    return True


def keep_completed_copy(output: str, destination: str, kept: str | None) -> str:
    """Where a notebook 01 that raised is kept: in ``logs/`` when the output it ran into
    is still complete (a mistyped path stops it before it touches the output), so that
    ``notebooks/`` keeps the copies of the run that completed it; else ``destination``.

    Only once nothing of the run will touch the output any more: after a cell that raised
    (the kernel is idle then), or once the kernel of an interrupted or timed-out cell has
    stopped.
    The failed copy is written first and the completed one put back whole (a new local
    file renamed over it; an S3 object is replaced whole), so a stop in between leaves
    what an earlier version left: the failed notebook in ``notebooks/``.
    """
    from papermill.iorw import papermill_io

    if kept is None or not is_complete(output):  # else the run had begun to replace it
        return destination
    failed = join(papermill_location(output), FAILED_EXTRACT_NOTEBOOK)
    try:
        executed = papermill_io.read(destination)
        if executed == kept:  # papermill never wrote it (its source could not be read)
            return destination
        if is_local(output):
            Path(local_path(output), "logs").mkdir(parents=True, exist_ok=True)
        papermill_io.write(executed, failed)
        if is_local(output):
            staged = Path(local_path(destination)).with_suffix(".ipynb.tmp")
            staged.write_text(kept, encoding="utf-8")
            os.replace(staged, local_path(destination))
        else:
            papermill_io.write(kept, destination)
    except Exception as problem:  # the run's own error matters more
        logging.getLogger(__name__).warning("could not keep %s: %s", destination, problem)
        return destination
    return failed


def record_stop(destination: str, error: BaseException) -> None:
    """Mark the cell a timeout or an interrupt stopped as failed in the saved notebook, as
    papermill marks a cell that raised: its error, the exception flag, papermill's banner,
    later cells pending.

    papermill saves a notebook whose cell timed out with no exception flag and every cell
    "completed" (its clean-up completes pending cells when none failed), and an interrupted
    one as it last saved it: opened later, either reads as a run that succeeded with outputs
    missing.
    """
    import nbformat
    from papermill.exceptions import PapermillExecutionError
    from papermill.execute import raise_for_execution_errors
    from papermill.iorw import load_notebook_node

    try:
        notebook = load_notebook_node(destination)
        ran = [i for i, c in enumerate(notebook.cells) if c.metadata.papermill.get("start_time")]
        if not ran:
            return
        cell = notebook.cells[ran[-1]]
        message = str(error).strip().splitlines()
        cell.outputs.append(
            nbformat.v4.new_output(
                "error", ename=type(error).__name__, evalue=message[0] if message else "",
                traceback=message,
            )
        )  # fmt: skip
        cell.metadata.papermill.update(status="failed", exception=True)
        for later in notebook.cells[ran[-1] + 1 :]:
            later.metadata.papermill.update(status="pending", start_time=None, end_time=None)
        notebook.metadata.papermill.exception = True
        with suppress(PapermillExecutionError):
            raise_for_execution_errors(notebook, destination)  # writes the notebook
    except Exception as problem:  # the run's own error matters more
        logging.getLogger(__name__).warning(
            "could not mark where the run stopped in %s: %s", destination, problem
        )
