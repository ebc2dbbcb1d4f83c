"""The notebooks in the Jupyter a person uses: JupyterLab started by ``make lab`` on loopback,
driven in Debian's headless Chromium by Playwright.

For each of notebooks 01 and 02 the test opens it, points its parameters cell at a small
generated sample (typing in the cell, as a person would), runs all cells from the Run menu,
waits for the kernel to go idle, saves, and checks what a person would look at: no error in
any cell, the figures drawn, the datasets written. Screenshots of the finished notebooks are
kept under ``test-artifacts/browser/`` (git-ignored) for a person to look at.

JupyterLab serves a temporary copy of ``notebooks/``: the committed notebooks stay clean.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, WEIGHTS
from group_watch import watch_group

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("IMAGEPCA_ARTIFACTS", REPO / "test-artifacts")) / "browser"
TOKEN = "imagepca-browser-test"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the current tab
RUN_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``make lab`` on a copy of notebooks/, on 127.0.0.1 with a token; stopped at the end."""
    tmp = tmp_path_factory.mktemp("lab")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    for path in (REPO / "notebooks").glob("*.ipynb"):
        shutil.copy(path, notebooks / path.name)
    sample = tmp / "sample"
    subprocess.run(
        [
            REPO / ".venv" / "bin" / "imagepca",
            "sample",
            sample,
            "--classes",
            "3",
            "--per-class",
            "8",
        ],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    env = {
        **os.environ,
        # JupyterLab's settings, workspaces and runtime files stay in the test's folder.
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
    }
    log = open(tmp / "lab.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "lab",
            f"LAB_NOTEBOOKS={notebooks}",
            f"LAB_PORT={port}",
            f"LAB_ARGS=--IdentityProvider.token={TOKEN}",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    watch_group(server.pid, max_lifetime=1800)  # ends it if this fixture never does
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp / "lab.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start in 120 s"
                time.sleep(1)
        printed = (tmp / "lab.log").read_text()
        assert f"http://127.0.0.1:{port}/lab" in printed, "make lab prints the URL to open"
        yield {"url": url, "notebooks": notebooks, "sample": sample, "output": tmp / "out"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def _close_dialogs(page) -> None:
    """Close a JupyterLab dialog open over the notebook, printing its text. Seen in CI: a
    dialog covered the Run menu until the click timed out; once, "Select Kernel" for the
    notebook, which Escape did not close (and would have left without a kernel): its
    preferred kernel (Python 3) is accepted. Any other is cancelled (Escape). The run's own
    checks follow: a dialog that mattered fails them."""
    dialogs = page.locator(".jp-Dialog")
    for _ in range(3):
        if not dialogs.count():
            return
        text = dialogs.first.inner_text()
        print("JupyterLab dialog closed:", " | ".join(text.split("\n")))
        accept = dialogs.first.locator(".jp-Dialog-button.jp-mod-accept")
        if text.startswith("Select Kernel") and accept.count():
            accept.first.click()
        else:
            page.keyboard.press("Escape")
        time.sleep(0.5)


def _run_all_cells(page, attempts: int = 3) -> None:
    """Run > Run All Cells, until a cell is queued or running.

    Seen once in CI: the menu click did not take, and every prompt stayed ``[ ]:`` for
    600 s. Clicking again is safe only while no cell has started, which is what is checked.
    """
    for _ in range(attempts):
        _close_dialogs(page)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        for _ in range(60):
            prompts = page.eval_on_selector_all(
                f"{PANEL} .jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)"
            )
            if any(p.strip("[]: ") for p in prompts):
                return
            time.sleep(0.5)
        page.keyboard.press("Escape")  # a menu left open
    pytest.fail(f"Run All Cells started no cell after {attempts} attempts")


def _run_in_lab(browser, lab, name: str, assignments: dict[str, str]) -> tuple:
    """Open ``name``, append ``assignments`` to its parameters cell, run all cells, save.

    Returns the page (still open) and the saved notebook.
    """
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    # A workspace of its own, reset: only this notebook opens.
    stem = Path(name).stem
    page.goto(f"{lab['url']}/lab/workspaces/{stem}/tree/{name}?reset&token={TOKEN}")
    page.wait_for_selector(f"{PANEL} .jp-CodeCell", timeout=60_000)
    page.wait_for_selector(
        f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000
    )
    news = page.locator(".jp-toast-button", has_text="No")  # "notified about Jupyter news?"
    if news.count():
        news.first.click()

    # The parameters cell is the first code cell: new values typed at its end win.
    editor = page.locator(f"{PANEL} .jp-CodeCell").first.locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+End")
    page.keyboard.press("Enter")
    page.keyboard.insert_text("\n".join(f"{k} = {v!r}" for k, v in assignments.items()))
    source = editor.inner_text()
    for key, value in assignments.items():
        assert f"{key} = {value!r}" in source, source

    _run_all_cells(page)
    code_cells = page.locator(f"{PANEL} .jp-CodeCell")
    n_code = code_cells.count()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        prompts = page.eval_on_selector_all(
            f"{PANEL} .jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)"
        )
        idle = page.locator(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        if idle and len(prompts) == n_code and all(p.strip("[]: ").isdigit() for p in prompts):
            break
        assert time.monotonic() < deadline, (
            f"cells still running after {RUN_TIMEOUT_S} s: {prompts}"
        )
        time.sleep(2)

    path = lab["notebooks"] / name
    saved_at = path.stat().st_mtime
    page.locator(f"{PANEL} .jp-InputPrompt").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime == saved_at:
        assert time.monotonic() < deadline, "the notebook was not saved"
        time.sleep(0.5)
    time.sleep(1)  # the file is written whole before the next read
    return page, nbformat.read(path, as_version=4)


def _shut_down_kernels(lab) -> None:
    """Stop the notebook's kernel (and its Spark) through Jupyter's REST API."""
    import json

    headers = {"Authorization": f"token {TOKEN}"}
    request = urllib.request.Request(f"{lab['url']}/api/kernels", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        kernels = json.load(response)
    for kernel in kernels:
        delete = urllib.request.Request(
            f"{lab['url']}/api/kernels/{kernel['id']}", headers=headers, method="DELETE"
        )
        urllib.request.urlopen(delete, timeout=30).close()


def _check_ran_cleanly(notebook) -> None:
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]


def _rendered_images(page) -> list[dict]:
    """Images drawn in the output areas, with their natural size (0 when broken)."""
    return page.eval_on_selector_all(
        f"{PANEL} .jp-OutputArea-output img",
        "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, src: e.src.slice(0, 22)}))",
    )


def _screenshot(page, image, name: str) -> Path:
    """The figure in view, then the notebook's last cells: two PNGs in ``ARTIFACTS``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    image.scroll_into_view_if_needed()
    path = ARTIFACTS / f"{Path(name).stem}.png"
    page.screenshot(path=str(path))
    page.locator(f"{PANEL} .jp-CodeCell").last.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / f"{Path(name).stem}-end.png"))
    return path


def test_extract_features_notebook_runs_in_jupyterlab(lab, browser):
    name = "01_extract_features.ipynb"
    page, notebook = _run_in_lab(
        browser,
        lab,
        name,
        {"input": str(lab["sample"]), "output": str(lab["output"]), "weights": str(WEIGHTS)},
    )
    try:
        _check_ran_cleanly(notebook)
        images = _rendered_images(page)
        assert len(images) == 1 and images[0]["w"] > 100 and images[0]["h"] > 100, images
        assert images[0]["src"].startswith("data:image/png"), images
        shot = _screenshot(page, page.locator(".jp-OutputArea-output img").first, name)
        assert shot.stat().st_size > 10_000
        features = lab["output"] / "features"
        assert list(features.rglob("part-*.parquet")), "features/ written"
        assert (lab["output"] / "samples.png").is_file()
    finally:
        page.close()
        _shut_down_kernels(lab)


def test_reduce_pca_notebook_runs_in_jupyterlab(lab, browser):
    if not (lab["output"] / "features").is_dir():
        pytest.fail("notebook 01 did not write features/ (see the test before)")
    name = "02_reduce_pca.ipynb"
    page, notebook = _run_in_lab(browser, lab, name, {"output": str(lab["output"])})
    try:
        _check_ran_cleanly(notebook)
        images = _rendered_images(page)
        # The explained-variance plot, then the projection.
        assert len(images) == 2 and all(i["w"] > 100 and i["h"] > 100 for i in images), images
        variance_cell = page.locator(f"{PANEL} .jp-CodeCell", has_text="plot_explained_variance")
        plot = variance_cell.locator(".jp-OutputArea-output img")
        assert plot.count() == 1 and plot.is_visible()
        _screenshot(page, plot, name)
        assert (lab["output"] / "explained_variance.png").is_file()
        assert (lab["output"] / "_SUCCESS").is_file()
    finally:
        page.close()
        _shut_down_kernels(lab)
