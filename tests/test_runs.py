"""Whole runs through the CLI: a completed output holds only its own run's artifacts, and
images without labels are a first-class input (the classifier is skipped, the run succeeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from conftest import FRUIT_PHOTOS, WEIGHTS, processes_with, signal_once_started, write_notebook
from imagepca import executed, pipeline, runner
from imagepca.classify import prepare
from imagepca.cli import main
from imagepca.config import ClassifyParams, ExtractParams, ReduceParams
from imagepca.console import LOG_FILE
from imagepca.images import load_samples
from imagepca.pipeline import extract_features, finish_run, reduce_features, start_extraction
from imagepca.plots import plot_confusion_matrix, plot_explained_variance, plot_samples, save_figure
from imagepca.storage import (
    CLASSIFY_ARTIFACTS,
    CLASSIFY_FIGURES,
    EXTRACT_FIGURES,
    REDUCE_FIGURES,
    REPLACING_FILE,
    Storage,
)
from moto_server import aws_env, moto_endpoint  # noqa: F401


def test_a_java_errors_line_is_its_exception_not_its_stack(spark):
    """What the terminal shows of a failed cell: a Java error's text is py4j's call, the
    exception, then its stack, whose last line ("... 20 more") said nothing."""
    from py4j.protocol import Py4JJavaError

    with pytest.raises(Py4JJavaError) as caught:
        spark._jvm.java.lang.Class.forName("no.such.Class")
    text = str(caught.value)
    assert text.splitlines()[-1].strip().startswith("at ")
    line = runner.cell_error_line("Py4JJavaError", text)
    assert line == "java.lang.ClassNotFoundException: no.such.Class"
    assert runner.cell_error_line("ValueError", "k is too large\n") == "k is too large"
    assert runner.cell_error_line("KeyError", "") == ""


def test_rerun_without_classifier_removes_the_earlier_classifier(sample_run, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    assert all((output / name).exists() for name in CLASSIFY_ARTIFACTS)
    capsys.readouterr()
    status = main(
        # As a file:// URI, which papermill's handlers do not know (the runner maps it).
        ["run", "--input", str(_input_of(output)), "--output", output.as_uri(), "--master",
         "local[2]", "--weights", str(WEIGHTS), "--reuse-features", "--k", "5",
         "--skip-classify"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    assert (output / "_SUCCESS").exists()
    for name in CLASSIFY_ARTIFACTS:
        assert not (output / name).exists(), name
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["k"] == 5 and "classification" not in metrics
    assert sorted(metrics["removed_from_earlier_run"]) == sorted(CLASSIFY_ARTIFACTS)
    # Its own log, written as it ran, is not an earlier run's to remove.
    assert "[2/2] 02_reduce_pca.ipynb done in " in (output / LOG_FILE).read_text()
    assert "removed from an earlier run: classifier_model" in printed
    assert "features reused (featurized " in printed  # not the earlier run's images/s
    # What is left is this run's: notebooks 01 and 02, the 5-component model.
    assert sorted(p.name for p in (output / "notebooks").iterdir()) == [
        "01_extract_features.ipynb",
        "02_reduce_pca.ipynb",
    ]


def test_unlabeled_images_skip_the_classifier_and_succeed(spark, sample_dir, tmp_path, capsys):
    flat = tmp_path / "photos"
    flat.mkdir()
    for path in sorted(sample_dir.rglob("*.jpg"))[::12][:16]:
        shutil.copyfile(path, flat / f"{path.parent.name}-{path.name}")
    output = tmp_path / "out"
    capsys.readouterr()
    status = main(
        ["run", "--input", str(flat), "--output", str(output), "--master", "local[2]",
         "--weights", str(WEIGHTS)]
    )  # fmt: skip
    captured = capsys.readouterr()
    printed, progress = captured.out, captured.err
    assert status == 0
    assert (output / "_SUCCESS").exists() and (output / "reduced").is_dir()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["n_images"] == 16 and metrics["n_classes"] == 1
    assert "found 1 (photos: 16)" in metrics["classification"]["skipped"]
    assert not (output / "classifier_model").exists()
    assert not (output / "notebooks" / "03_classify.ipynb").exists()
    notes = [line for line in printed.splitlines() if "classifier skipped" in line]
    assert len(notes) == 1 and "2 labels" in notes[0]
    assert "[3/3] 03_classify.ipynb skipped: " in progress  # the third status line, too
    # Notebook 03 run by hand, or by papermill, says so and leaves the output complete.
    with pytest.raises(ValueError, match=r"found 1 \(photos: 16\).*complete without a class"):
        prepare(spark, ClassifyParams(output=str(output)))
    assert (output / "_SUCCESS").exists()


def test_notebooks_run_by_hand_remove_the_copies_an_earlier_run_saved(spark, sample_run, tmp_path):
    """Run by hand (the calls a notebook in JupyterHub makes), a notebook saves no executed
    copy in the output: the copy an earlier `imagepca run` saved there, which describes
    another run's outputs, goes, and metrics.json lists it. A copy papermill is writing
    (no end_time yet: `imagepca run` under way) stays."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    copies = output / "notebooks"
    earlier = {path.name: path.read_bytes() for path in copies.iterdir()}
    stored = json.loads((output / "metrics.json").read_text())["params"]["extract"]
    extract = {field.name: stored[field.name] for field in dataclasses.fields(ExtractParams)}
    extract.update(output=str(output), reuse_features=True)  # the same features, quickly

    extract_features(spark, ExtractParams(**extract))
    assert not (copies / runner.EXTRACT_NOTEBOOK).exists()
    assert not (output / "samples.png").exists()  # not drawn again: no plot call here
    running = nbformat.reads(earlier[runner.REDUCE_NOTEBOOK].decode(), as_version=4)
    running.metadata.papermill.update(end_time=None, duration=None)  # as papermill starts
    nbformat.write(running, str(copies / runner.REDUCE_NOTEBOOK))
    assert (output / LOG_FILE).is_file()  # the earlier run's log
    reduction = reduce_features(spark, ReduceParams(output=str(output), k=5))
    assert (copies / runner.REDUCE_NOTEBOOK).exists()
    assert sorted(reduction.metrics["removed_from_earlier_run"]) == sorted(
        [
            f"notebooks/{runner.EXTRACT_NOTEBOOK}",
            *EXTRACT_FIGURES,
            *REDUCE_FIGURES,
            *CLASSIFY_ARTIFACTS,
        ]
    )
    assert (output / LOG_FILE).is_file()  # `imagepca run`'s own, while papermill writes 02

    (copies / runner.REDUCE_NOTEBOOK).write_bytes(earlier[runner.REDUCE_NOTEBOOK])
    reduction = reduce_features(spark, ReduceParams(output=str(output), k=5))
    finish_run(spark, str(output), reduction.metrics)
    assert not any(copies.iterdir())
    by_hand = [
        "samples.png",
        f"notebooks/{runner.EXTRACT_NOTEBOOK}",
        LOG_FILE,  # the earlier run's: run by hand, notebook 02 writes no log
        f"notebooks/{REDUCE}",
    ]
    assert reduction.metrics["removed_from_earlier_run"] == by_hand

    (copies / runner.CLASSIFY_NOTEBOOK).write_bytes(earlier[runner.CLASSIFY_NOTEBOOK])
    clf = prepare(spark, ClassifyParams(output=str(output)))
    clf.fit_reduced()
    metrics = clf.publish()
    assert (output / "_SUCCESS").exists() and (output / "classifier_model").is_dir()
    assert not any(copies.iterdir())
    assert metrics["removed_from_earlier_run"] == [
        *by_hand,
        f"notebooks/{runner.CLASSIFY_NOTEBOOK}",
    ]
    assert json.loads((output / "metrics.json").read_text()) == metrics


FIGURES = (*EXTRACT_FIGURES, *REDUCE_FIGURES, *CLASSIFY_FIGURES)
REDUCE = runner.REDUCE_NOTEBOOK


def _removed_figures(metrics: dict) -> list[str]:
    return [name for name in metrics["removed_from_earlier_run"] if name in FIGURES]


def test_figures_not_drawn_again_by_hand_go_with_the_earlier_run(spark, sample_run, tmp_path):
    """Each notebook removes an earlier run's copies of its own figures as it starts, and its
    cells draw them again: a figure's cell skipped by hand leaves none of another run's, and
    metrics.json lists it as removed; a figure drawn again is not listed."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    assert all((output / name).exists() for name in FIGURES)
    earlier_sweep = (output / "k_sweep.png").read_bytes()
    storage, uri = Storage(spark), str(output)
    stored = json.loads((output / "metrics.json").read_text())["params"]["extract"]
    extract = {field.name: stored[field.name] for field in dataclasses.fields(ExtractParams)}
    extract.update(output=uri, reuse_features=True)
    params = ExtractParams(**extract)

    listing = start_extraction(spark, params)
    assert not (output / "samples.png").exists()
    fig = plot_samples(load_samples(spark, listing, per_label=3, size=params.image_size))
    save_figure(fig, storage, uri, "samples.png")
    extraction = extract_features(spark, params, listing)
    assert _removed_figures(extraction.metadata) == []

    reduction = reduce_features(spark, ReduceParams(output=uri, k=5))
    assert not any((output / name).exists() for name in (*REDUCE_FIGURES, *CLASSIFY_FIGURES))
    fit = reduction.fit
    fig = plot_explained_variance(fit.explained_variance, fit.k, None)
    save_figure(fig, storage, uri, "explained_variance.png")
    finish_run(spark, uri, reduction.metrics)  # the projection's cell skipped
    metrics = json.loads((output / "metrics.json").read_text())
    assert _removed_figures(metrics) == ["projection.png", *CLASSIFY_FIGURES]

    def classify_drawing_the_confusion_matrix_only() -> dict:
        clf = prepare(spark, ClassifyParams(output=uri))
        assert not any((output / name).exists() for name in CLASSIFY_FIGURES)
        scores = clf.fit_reduced().scores
        clf.save_figure(plot_confusion_matrix(**scores["confusion_matrix"]), "confusion_matrix.png")
        return clf.publish()

    metrics = classify_drawing_the_confusion_matrix_only()
    assert _removed_figures(metrics) == ["projection.png", "k_sweep.png"]
    # Notebook 03 again, alone, on an output that has an earlier sweep's figure.
    (output / "k_sweep.png").write_bytes(earlier_sweep)
    metrics = classify_drawing_the_confusion_matrix_only()
    assert _removed_figures(metrics) == ["projection.png", "k_sweep.png"]
    assert (output / "confusion_matrix.png").exists() and not (output / "k_sweep.png").exists()
    assert (output / "_SUCCESS").exists()


def _input_of(output: Path) -> Path:
    metrics = json.loads((output / "metrics.json").read_text())
    return Path(metrics["params"]["extract"]["input"])


def test_a_rerun_with_a_bad_path_leaves_the_earlier_output_complete(sample_run, tmp_path, capsys):
    """A mistyped or broken weights file, or a mistyped input, stops notebook 01 before it
    touches the output: the earlier run's output stays complete, its executed notebooks those
    of the run that completed it; the failed notebook, the record of what went wrong, goes to
    logs/."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    failed = output / "logs" / "01_extract_features.ipynb"
    truncated = tmp_path / "truncated.h5"  # an interrupted copy of the weights
    truncated.write_bytes(WEIGHTS.read_bytes()[: 4 << 20])
    for argv, problem in (
        (["--input", str(_input_of(output)), "--weights", str(tmp_path / "missing.h5")],
         "missing.h5"),
        (["--input", str(_input_of(output)), "--weights", str(truncated)], "truncated file"),
        (["--input", str(tmp_path / "no-such-folder"), "--weights", str(WEIGHTS)],
         "no-such-folder"),
    ):  # fmt: skip
        status = main(["run", *argv, "--output", str(output), "--master", "local[2]"])
        assert status != 0
        assert f"(executed notebook: {failed})" in capsys.readouterr().err
        after = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
        changed = {
            name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
        }
        # The completed run's log stays; the failed run's is beside its notebook.
        assert changed == {Path("logs/01_extract_features.ipynb"), Path("logs/stopped-run.log")}
        assert (output / "_SUCCESS").exists() and (output / "metrics.json").exists()
        notebook = nbformat.read(str(failed), as_version=4)
        assert notebook.metadata.papermill.exception is True
        errors = [o for c in notebook.cells for o in c.get("outputs", []) if "ename" in o]
        assert len(errors) == 1 and problem in errors[0].evalue
    # The next run that completes the output removes that record of an earlier attempt.
    status = main(
        ["run", "--input", str(_input_of(output)), "--output", str(output), "--weights",
         str(WEIGHTS), "--reuse-features", "--skip-classify", "--master", "local[2]"]
    )  # fmt: skip
    assert status == 0 and not failed.exists()
    assert not (output / "logs" / "stopped-run.log").exists()
    metrics = json.loads((output / "metrics.json").read_text())
    assert "logs/01_extract_features.ipynb" in metrics["removed_from_earlier_run"]
    assert "logs/stopped-run.log" in metrics["removed_from_earlier_run"]
    assert "removed from an earlier run: logs/01_extract_features.ipynb" in capsys.readouterr().out


def test_the_classifier_options_reach_notebook_03(sample_run, tmp_path):
    """`imagepca run --seed --k-values --test-fraction ...` are notebook 03's parameters."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    status = main(
        ["run", "--input", str(_input_of(output)), "--output", str(output), "--weights",
         str(WEIGHTS), "--reuse-features", "--master", "local[2]", "--seed", "7",
         "--test-fraction", "0.5", "--k-values", "3,2", "--max-iter", "20"]
    )  # fmt: skip
    assert status == 0
    classification = json.loads((output / "metrics.json").read_text())["classification"]
    params = classification["params"]
    assert (params["seed"], params["test_fraction"], params["k_values"]) == (7, 0.5, [2, 3])
    assert [fit["k"] for fit in classification["k_sweep"]] == [2, 3]
    assert classification["reduced"]["iterations"] <= 20
    # Half of each label's images held out (rounded), as the split's counts say.
    split = classification["split"]
    assert all(abs(s["test"] - s["train"]) <= 1 for s in split.values())


def test_cells_run_again_never_complete_an_output_with_another_runs_artifacts(
    spark, sample_run, tmp_path, capsys
):
    """Cells run again by hand, out of order, or from a kernel that read an earlier state:
    the output is complete only with one run's artifacts."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    uri, marker = str(output), output / "_SUCCESS"
    stored = json.loads((output / "metrics.json").read_text())["params"]["extract"]
    extract = {field.name: stored[field.name] for field in dataclasses.fields(ExtractParams)}
    params = ExtractParams(**{**extract, "output": uri, "reuse_features": True})
    # Notebook 01's featurization cell again, its listing from before notebook 02 completed.
    listing = start_extraction(spark, params)
    reduction = reduce_features(spark, ReduceParams(output=uri, k=5))
    finish_run(spark, uri, reduction.metrics)
    assert marker.exists()
    extract_features(spark, params, listing)
    assert not marker.exists() and not (output / "metrics.json").exists()

    # Notebook 03 on it; its cells again, from the top (metrics.json stays readable).
    reduction = reduce_features(spark, ReduceParams(output=uri, k=5))
    finish_run(spark, uri, reduction.metrics)
    classify = ClassifyParams(output=uri, k_values=[2])
    clf = prepare(spark, classify)
    reduced = clf.fit_reduced()
    clf.save_figure(plot_confusion_matrix(**reduced.scores["confusion_matrix"]), "cm.png")
    clf = prepare(spark, classify)
    clf.fit_reduced()
    clf.publish()
    # Notebook 02's last cell again: notebook 03's classification of this reduction stays.
    finish_run(spark, uri, reduction.metrics)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["classification"]["reduced"]["k"] == 5 and marker.exists()
    assert "notebook 03 has classified this reduction since" in capsys.readouterr().out

    # A notebook 03 that read k = 5 (and wrote a figure) while notebook 02 ran again with
    # k = 3 writes nothing more: no figure, no staged model on a refit, no publish.
    stale = prepare(spark, classify)
    stale.fit_reduced()
    stale.save_figure(plot_confusion_matrix(**reduced.scores["confusion_matrix"]), "cm.png")
    # Notebook 02's last cell again meanwhile: notebook 03 has not published this time.
    with pytest.raises(RuntimeError, match="began classifying this reduction again"):
        finish_run(spark, uri, reduction.metrics)
    reduction = reduce_features(spark, ReduceParams(output=uri, k=3))
    finish_run(spark, uri, reduction.metrics)
    for write in (
        lambda: stale.save_figure(
            plot_confusion_matrix(**reduced.scores["confusion_matrix"]), "cm.png"
        ),
        stale.fit_reduced,
        stale.publish,
    ):
        with pytest.raises(RuntimeError, match="notebook 02 ran again since prepare.*k = 5.*k = 3"):
            write()
    assert marker.exists() and not (output / "classifier_model").exists()
    assert not (output / "_staging").exists()
    assert json.loads((output / "metrics.json").read_text())["k"] == 3


def test_notebook_02_refuses_features_notebook_01_began_replacing(
    spark, sample_run, tmp_path, monkeypatch
):
    """Notebook 01 stopped after its first look at a new input (its samples.png drawn):
    notebook 02 on the earlier features would complete an output mixing the two runs."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    uri = str(output)
    stored = json.loads((output / "metrics.json").read_text())["params"]["extract"]
    extract = {field.name: stored[field.name] for field in dataclasses.fields(ExtractParams)}
    start_extraction(spark, ExtractParams(**{**extract, "output": uri}))  # then stopped
    with pytest.raises(RuntimeError, match="notebook 01 began replacing .* did not finish"):
        reduce_features(spark, ReduceParams(output=uri, k=5))
    assert not (output / "_SUCCESS").exists()
    # So does a --reuse-features run whose features are not reusable (other parameters),
    # stopped once it knows it featurizes everything again.
    (output / "features" / REPLACING_FILE).unlink()
    changed = {"output": uri, "reuse_features": True, "max_image_pixels": 10**7}
    other = ExtractParams(**{**extract, **changed})

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_model_payload", stopped)
    with pytest.raises(KeyboardInterrupt):
        extract_features(spark, other)
    assert (output / "features" / REPLACING_FILE).exists()
    monkeypatch.undo()
    # A run that keeps the earlier features settles it.
    params = ExtractParams(**{**extract, "output": uri, "reuse_features": True})
    extract_features(spark, params)
    finish_run(spark, uri, reduce_features(spark, ReduceParams(output=uri, k=5)).metrics)
    assert (output / "_SUCCESS").exists()


def test_an_output_is_not_complete_between_notebooks_02_and_03_of_one_run(
    spark, sample_run, tmp_path, monkeypatch
):
    """A scheduler waiting for _SUCCESS must not take the output between the two notebooks:
    with notebook 03 next (then_classify, as imagepca run plans it), notebook 02 leaves
    _SUCCESS to it, unless the classifier is skipped."""
    planned = ExtractParams(input="in", output="o"), ReduceParams(output="o")
    assert runner.plan(*planned, classify=True)[1].parameters["then_classify"] is True
    assert runner.plan(*planned)[1].parameters["then_classify"] is False
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    uri = str(output)
    reduction = reduce_features(spark, ReduceParams(output=uri, k=5, then_classify=True))
    finish_run(spark, uri, reduction.metrics)
    assert (output / "metrics.json").exists() and not (output / "_SUCCESS").exists()
    clf = prepare(spark, ClassifyParams(output=uri, k_values=[2]))
    clf.fit_reduced()
    clf.publish()
    assert (output / "_SUCCESS").exists()
    # Fewer than 2 labels: notebook 03 will not run, notebook 02 completes the output.
    monkeypatch.setattr(pipeline, "classifiable", lambda labels: "fewer than 2 labels")
    reduction = reduce_features(spark, ReduceParams(output=uri, k=5, then_classify=True))
    assert not (output / "_SUCCESS").exists()
    finish_run(spark, uri, reduction.metrics)
    assert (output / "_SUCCESS").exists()


def test_a_failed_rerun_leaves_no_completion_markers(sample_run, tmp_path, capsys):
    """A rerun into a completed output that fails in notebook 01 after replacing part of it
    (here: more rejected images than allowed, found by featurization) must not leave the
    earlier run's _SUCCESS and metrics.json beside its own new files."""
    output = tmp_path / "out"
    shutil.copytree(sample_run, output)
    images = tmp_path / "images"
    shutil.copytree(_input_of(output), images)
    (images / "Banana" / "notes.jpg").write_text("not an image")
    status = main(
        ["run", "--input", str(images), "--output", str(output), "--master", "local[2]",
         "--weights", str(WEIGHTS), "--max-rejected-fraction", "0"]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status != 0
    assert "max_rejected_fraction=0" in printed.out + printed.err
    assert (output / "samples.png").exists()  # written again before the failure
    assert not (output / "_SUCCESS").exists() and not (output / "metrics.json").exists()
    # The output is this run's now: its failed notebook is where its notebooks go.
    executed = nbformat.read(str(output / "notebooks" / "01_extract_features.ipynb"), 4)
    assert executed.metadata.papermill.exception is True
    assert not (output / "logs" / "01_extract_features.ipynb").exists()


def test_a_timed_out_cell_is_interrupted_before_spark_is_stopped(tmp_path, monkeypatch):
    """papermill gives up on the cell, the kernel is still running it: interrupted, it is
    free to answer the stop (which otherwise waited 30 s and gave up)."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "slow.ipynb", "seconds = 0", "import time\ntime.sleep(seconds)", "print(1)"
    )
    stops = []
    stop = runner.stop_kernel_spark

    async def recorded(kernel_manager):
        stops.append(await stop(kernel_manager))
        return stops[-1]

    monkeypatch.setattr(runner, "stop_kernel_spark", recorded)
    with pytest.raises(runner.NotebookFailed, match="did not complete: CellTimeoutError") as failed:
        runner.run_notebooks(
            [runner.NotebookRun("slow.ipynb", {"seconds": 600})],
            str(tmp_path / "out"),
            notebooks=str(notebooks),
            execution_timeout=10,  # the 600 s cell only: the others take milliseconds
        )
    assert stops == [True]  # the stop code ran, and reported no error
    # One line (the CLI prints it last): the timeout's first line, not the cell's code.
    assert "\n" not in str(failed.value) and "time.sleep" not in str(failed.value)
    assert "timed out" in str(failed.value)

    # The saved notebook says which cell timed out, as papermill says which cell raised:
    # on its own, papermill marks every cell completed and sets no exception flag.
    saved = nbformat.read(str(tmp_path / "out" / "notebooks" / "slow.ipynb"), as_version=4)
    assert saved.metadata.papermill.exception is True
    assert "An Exception was encountered" in saved.cells[0].source  # papermill's banner
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    statuses = [cell.metadata.papermill.status for cell in code]
    assert statuses == ["completed", "completed", "failed", "pending"]
    (error,) = code[2].outputs
    assert error.output_type == "error" and error.ename == "CellTimeoutError"
    assert "timed out" in error.evalue
    assert not code[3].outputs


def test_notebook_paths_with_braces_are_taken_literally(tmp_path):
    """papermill formats notebook paths with the run's parameters: ``out {k}`` would have
    saved notebook 1 as ``out 3``, and ``out {a,b}`` failed as a missing parameter."""
    notebooks = tmp_path / "notebooks {a,b}"
    notebooks.mkdir()
    write_notebook(
        notebooks / "one.ipynb",
        "k = 0\noutput = None",
        "import pathlib\npathlib.Path(output, 'metrics.json').write_text('{}')\nprint(k * 2)",
    )
    output = str(tmp_path / "out {k}")
    runner.run_notebooks(
        [runner.NotebookRun("one.ipynb", {"k": 3, "output": output})],
        output,
        notebooks=str(notebooks),
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notebooks {a,b}", "out {k}"]
    saved = nbformat.read(str(tmp_path / "out {k}" / "notebooks" / "one.ipynb"), as_version=4)
    assert saved.cells[-1].outputs[0].text == "6\n"


STOPS = {  # how a run is stopped: the error its saved notebook shows
    "ctrl-c": ("KeyboardInterrupt", "the run was interrupted here"),
    "sigterm": ("RunTerminated", "the run was terminated here (SIGTERM)"),
}


@pytest.mark.parametrize("how", STOPS)
def test_an_interrupted_run_marks_where_it_stopped(tmp_path, how):
    """Ctrl-C (SIGINT to the run's process group, as a terminal sends it) or SIGTERM to the
    run's process alone (``kill``, ``timeout``, a scheduler's cancel) during a cell: the
    saved notebook says which cell was stopped, the run exits with an error, and the kernel
    it started is gone."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "slow.ipynb",
        "seconds = 0",
        "import time\ntime.sleep(seconds)",
        "print(1)",
    )
    output = tmp_path / "out"
    code = (
        "from imagepca import runner\n"
        f"runner.run_notebooks([runner.NotebookRun('slow.ipynb', {{'seconds': 600}})], "
        f"{str(output)!r}, notebooks={str(notebooks)!r})\n"
    )
    marker = f"IMAGEPCA_TEST_STOP_{os.getpid()}_{how}"
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, marker: "1"},
    )
    saved = output / "notebooks" / "slow.ipynb"

    def stop(process) -> None:
        time.sleep(1)
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)

    stderr = signal_once_started(process, saved, stop, cell=2)
    ename, evalue = STOPS[how]
    assert process.returncode != 0 and ename in stderr
    notebook = nbformat.read(str(saved), as_version=4)
    assert notebook.metadata.papermill.exception is True
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    statuses = [cell.metadata.papermill.status for cell in code_cells]
    assert statuses == ["completed", "completed", "failed", "pending"]
    assert code_cells[2].outputs[-1].ename == ename
    assert code_cells[2].outputs[-1].evalue == evalue
    assert not processes_with(marker)


def test_a_stopped_cell_is_not_handled_during_the_clean_up(tmp_path, monkeypatch):
    """What a stopped cell prints after the interrupt reaches no one: nbclient's task for it
    is cancelled before the clean-up runs the event loop again, so papermill never handles
    its late messages (nor autosaves over the notebook the runner has marked)."""
    from papermill.clientwrap import PapermillNotebookClient

    handled = []
    process_message = PapermillNotebookClient.process_message

    def record(self, msg, *args, **kwargs):
        handled.append(msg.get("content", {}).get("text", ""))
        return process_message(self, msg, *args, **kwargs)

    monkeypatch.setattr(PapermillNotebookClient, "process_message", record)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "slow.ipynb",
        "seconds = 0",
        "import time\ntry:\n    time.sleep(seconds)\nexcept KeyboardInterrupt:\n"
        "    print('late', flush=True)\n    time.sleep(1)",
    )
    output = tmp_path / "out"
    saved = output / "notebooks" / "slow.ipynb"

    def terminate_once_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                cells = nbformat.read(str(saved), as_version=4).cells
            except (OSError, ValueError):
                cells = []
            if cells and cells[-1].metadata.get("papermill", {}).get("start_time"):
                time.sleep(1)
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # raises RunTerminated in this (main) thread

    signaller = threading.Thread(target=terminate_once_started, daemon=True)
    signaller.start()
    with pytest.raises(runner.RunTerminated):
        runner.run_notebooks(
            [runner.NotebookRun("slow.ipynb", {"seconds": 600})],
            str(output),
            notebooks=str(notebooks),
        )
    signaller.join()
    assert handled, "papermill handled none of the kernel's messages"
    assert not any("late" in text for text in handled)
    notebook = nbformat.read(str(saved), as_version=4)
    assert notebook.cells[-1].metadata.papermill.status == "failed"


def sleeping_notebooks(folder: Path) -> Path:
    """Stand-in notebooks, 01 sleeping: the CLI's own path, without Spark."""
    notebooks = folder / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / runner.EXTRACT_NOTEBOOK, "input = None", "import time\ntime.sleep(600)"
    )
    write_notebook(notebooks / runner.REDUCE_NOTEBOOK, "output = None")  # never reached
    return notebooks


def start_run(output: Path, notebooks: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imagepca", "run", "--input", str(FRUIT_PHOTOS), "--output",
         str(output), "--weights", str(WEIGHTS), "--notebooks", str(notebooks), "--skip-classify",
         *options],
        start_new_session=True, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def completed_output(folder: Path) -> tuple[Path, Path]:
    """An output a run completed (``_SUCCESS``), and its executed notebook 01."""
    output = folder / "out"
    (output / "notebooks").mkdir(parents=True)
    completed = output / "notebooks" / runner.EXTRACT_NOTEBOOK
    write_notebook(completed, "input = 'the run that completed the output'")
    (output / "_SUCCESS").write_bytes(b"")
    return output, completed


def test_a_terminated_run_exits_as_a_shell_reports_sigterm(tmp_path):
    """``imagepca run`` stopped by SIGTERM exits 143, not 130 nor 1, so a scheduler or a
    script can tell a cancel from a failure; the log is named as for any stopped run.
    (Stand-in notebooks, 01 sleeping: the CLI's own path, without Spark.)"""
    notebooks = sleeping_notebooks(tmp_path)
    output = tmp_path / "out"
    process = start_run(output, notebooks)
    saved = output / "notebooks" / runner.EXTRACT_NOTEBOOK
    err = signal_once_started(process, saved, lambda p: p.send_signal(signal.SIGTERM))
    assert process.returncode == 143
    assert err.splitlines()[-1] == (
        f"error: terminated (SIGTERM): {output} is incomplete (no _SUCCESS); run again "
        "(--reuse-features keeps features/ if their featurization had finished)"
    )
    assert f"log: {output / 'logs' / 'run.log'}" in err
    # An incremental run is run again as it was: --reuse-features would refuse features/
    # for an input that changed.
    process = start_run(tmp_path / "again", notebooks, "--incremental")
    saved = tmp_path / "again" / "notebooks" / runner.EXTRACT_NOTEBOOK
    err = signal_once_started(process, saved, lambda p: p.send_signal(signal.SIGTERM))
    assert err.splitlines()[-1].endswith(
        "is incomplete (no _SUCCESS); run the same command again: --incremental featurizes "
        "what features/ lacks, including what this run had not committed"
    )


def test_a_notebook_01_stopped_before_touching_a_complete_output_goes_to_logs(tmp_path):
    """Ctrl-C in notebook 01 before it began replacing a complete output: the output keeps
    the executed notebooks of the run that completed it, the stopped one goes to logs/ (as
    a notebook 01 that raised), and the message says the output is still complete. So do
    the logs: the completed run's stays, the stopped run's goes to logs/stopped-run.log."""
    notebooks = sleeping_notebooks(tmp_path)
    output, completed = completed_output(tmp_path)
    before = completed.read_bytes()
    (output / "logs").mkdir()
    (output / "logs" / "run.log").write_text("the log of the run that completed the output\n")
    process = start_run(output, notebooks)
    # papermill's copy of the stopped run is in notebooks/ while it runs.
    err = signal_once_started(
        process, completed, lambda p: p.send_signal(signal.SIGINT),
        ready=lambda: completed.read_bytes() != before,
    )  # fmt: skip
    assert process.returncode == 130
    assert err.splitlines()[-1] == (
        f"error: interrupted: {output} is complete: it holds the last run that completed there"
    )
    assert completed.read_bytes() == before
    stopped = nbformat.read(str(output / "logs" / runner.EXTRACT_NOTEBOOK), as_version=4)
    assert stopped.metadata.papermill.exception is True
    assert (output / "_SUCCESS").exists()
    logs = output / "logs"
    assert (logs / "run.log").read_text() == "the log of the run that completed the output\n"
    assert "01_extract_features.ipynb" in (logs / "stopped-run.log").read_text()
    assert f"log: {logs / 'stopped-run.log'}" in err


def test_a_notebook_01_timed_out_before_touching_a_complete_output_goes_to_logs(tmp_path):
    """The same for --execution-timeout: the message names where the stopped notebook is."""
    notebooks = sleeping_notebooks(tmp_path)
    output, completed = completed_output(tmp_path)
    before = completed.read_bytes()
    stopped = output / "logs" / runner.EXTRACT_NOTEBOOK
    with pytest.raises(runner.NotebookFailed, match=f"partial notebook: {stopped}"):
        runner.run_notebooks(
            [runner.NotebookRun(runner.EXTRACT_NOTEBOOK, {"input": "x"})],
            str(output),
            notebooks=str(notebooks),
            execution_timeout=3,
        )
    assert completed.read_bytes() == before and (output / "_SUCCESS").exists()
    assert nbformat.read(str(stopped), as_version=4).metadata.papermill.exception is True


def test_an_s3_output_keeps_its_completed_notebook_01_too(aws_env):  # noqa: F811
    """The keeping above through papermill's S3 handler (moto on loopback): an empty
    ``_SUCCESS`` counts, the failed copy goes to logs/ and the completed one is put back;
    without ``_SUCCESS`` the failed notebook stays where the run saved it."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="runs")
    destination = "s3://runs/out/notebooks/01_extract_features.ipynb"
    completed = nbformat.writes(nbformat.v4.new_notebook(metadata={"run": "completed"}))
    failed = nbformat.writes(nbformat.v4.new_notebook(metadata={"run": "failed"}))

    def body(key: str) -> str:
        return s3.get_object(Bucket="runs", Key=key)["Body"].read().decode()

    s3.put_object(Bucket="runs", Key="out/notebooks/01_extract_features.ipynb", Body=failed)
    assert executed.keep_completed_copy("s3://runs/out", destination, completed) == destination
    assert body("out/notebooks/01_extract_features.ipynb") == failed  # not complete
    s3.put_object(Bucket="runs", Key="out/_SUCCESS", Body=b"")
    kept = executed.keep_completed_copy("s3://runs/out", destination, completed)
    assert kept == "s3://runs/out/logs/01_extract_features.ipynb"
    assert json.loads(body("out/logs/01_extract_features.ipynb"))["metadata"]["run"] == "failed"
    restored = json.loads(body("out/notebooks/01_extract_features.ipynb"))
    assert restored["metadata"]["run"] == "completed"


# A thread of the kernel prints every 20 ms until told to stop (or for 60 s at most).
CHATTER = """
import threading, time
stop_chatter = threading.Event()
def chatter():
    end = time.monotonic() + 60
    while not stop_chatter.wait(0.02) and time.monotonic() < end:
        print(".", end="", flush=True)
chatty = threading.Thread(target=chatter, daemon=True)
chatty.start()
"""


def test_a_notebook_client_is_ready_while_the_kernels_output_never_pauses():
    """nbclient makes a client per notebook of the run's one kernel, and waits until it is
    ready: once the kernel answered on the shell channel and on IOPub, not once IOPub has
    been quiet for 0.2 s (jupyter_client's own wait, which a busy IOPub prolongs)."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    from imagepca.kernel import PromptKernelClient

    async def reply_to(client, request):
        while True:
            reply = await client.get_shell_msg(timeout=30)
            if reply["parent_header"]["msg_id"] == request:
                return reply["content"]

    async def scenario() -> tuple[str, str]:
        manager = AsyncKernelManager(kernel_name="python3")
        manager.client_factory = PromptKernelClient
        await manager.start_kernel()
        clients = []
        try:
            for _ in range(2):
                clients.append(manager.client())
                clients[-1].start_channels()
                await clients[-1].wait_for_ready(timeout=60)
                if len(clients) == 1:  # the first notebook leaves a thread printing
                    started = await reply_to(clients[0], clients[0].execute(CHATTER))
                    assert started["status"] == "ok"
            # The next notebook's client: ready while the thread still prints.
            asked = clients[1].execute("", user_expressions={"alive": "chatty.is_alive()"})
            alive = (await reply_to(clients[1], asked))["user_expressions"]["alive"]
            clients[1].execute("stop_chatter.set(); chatty.join()")
            # Its IOPub works: this cell's output arrives on it.
            printed = clients[1].execute("print('on iopub')")
            while True:
                message = await clients[1].get_iopub_msg(timeout=30)
                if (
                    message["parent_header"].get("msg_id") == printed
                    and message["msg_type"] == "stream"
                ):
                    return alive["data"]["text/plain"], message["content"]["text"]
        finally:
            for client in clients:
                client.stop_channels()
            await manager.shutdown_kernel(now=True)

    alive, printed = run_sync(scenario)()
    assert alive == "True"
    assert printed == "on iopub\n"
