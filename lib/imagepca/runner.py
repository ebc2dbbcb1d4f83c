"""Run the notebooks headlessly with papermill, in order, into the run's output.

The notebooks stay the single source of the workflow: the CLI, EMR steps and tests all
execute them through :func:`run_notebooks`, with the parameters injected by papermill and
the executed copies saved under ``OUTPUT/notebooks/`` for the record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import ExtractParams, ReduceParams
from .storage import METRICS_FILE, join

EXTRACT_NOTEBOOK = "01_extract_features.ipynb"
REDUCE_NOTEBOOK = "02_reduce_pca.ipynb"
CLASSIFY_NOTEBOOK = "03_classify.ipynb"


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

    Raises
    ------
    NotebookFailed
        When a cell raises or times out.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebooks or notebooks_dir()
    if "://" not in output or output.startswith("file://"):
        Path(output.removeprefix("file://"), "notebooks").mkdir(parents=True, exist_ok=True)
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        for run in runs:
            destination = join(output, "notebooks", run.name)
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
                )
            except PapermillExecutionError as error:
                raise NotebookFailed(
                    f"{run.name} failed in cell {error.exec_count}: {error.ename}: "
                    f"{error.evalue.strip().splitlines()[-1] if error.evalue.strip() else ''} "
                    f"(executed notebook: {destination})"
                ) from None
            except Exception as error:  # kernel died, cell timeout, unreachable Livy...
                raise NotebookFailed(
                    f"{run.name} did not complete: {type(error).__name__}: {error} "
                    f"(partial notebook: {destination})"
                ) from None
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return read_metrics(output)


def read_metrics(output: str) -> dict:
    """``OUTPUT/metrics.json`` through papermill's I/O registry (local, s3://, ...)."""
    from papermill.iorw import papermill_io

    return json.loads(papermill_io.read(join(output, METRICS_FILE)))


def summary(metrics: dict, output: str) -> str:
    """A few lines for the terminal after a run."""
    timings = metrics.get("timings_s", {})
    lines = [
        f"images: {metrics['n_images']} featurized, {metrics['n_rejected']} rejected, "
        f"{metrics['n_classes']} classes",
        f"PCA: k = {metrics['k']} components, {metrics['variance_reached']:.1%} of the variance "
        f"(threshold {metrics['variance_threshold']:g}, k {metrics['k_mode']})",
        f"time: {sum(timings.values()):.1f} s in stages, featurization "
        f"{metrics.get('images_per_s') or 0:.1f} images/s",
    ]
    if "classification" in metrics:
        scores = metrics["classification"]
        lines.append(
            f"classifier on reduced features: accuracy {scores['reduced']['accuracy']:.3f}, "
            f"macro F1 {scores['reduced']['f1_macro']:.3f}"
        )
    plots = "projection.png, samples.png"
    if "classification" in metrics:
        plots += ", confusion_matrix.png, k_sweep.png"
    lines.append(f"plots: {join(output, 'explained_variance.png')}, {plots}")
    lines.append(f"outputs: {output}")
    return "\n".join(lines)
