"""The notebooks in sparkmagic's PySpark kernel, as on EMR: papermill -> pysparkkernel ->
Livy REST API -> a PySpark driver.

Livy is :mod:`livy_server` (a local implementation of the REST API sparkmagic uses, whose
sessions run real PySpark); everything else is the real thing: the shipped notebooks,
sparkmagic 0.23, papermill, the shared weights and the generated sample. The Livy run's
outputs are compared with the local-kernel run (``sample_run``) on the same data.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from conftest import OUTPUT_LAYOUT, signal_once_started, write_notebook
from imagepca import livy, livy_api, runner
from imagepca.cli import main
from imagepca.config import SPARK_SETTINGS
from livy_server import LivyServer

NOTEBOOKS = (runner.EXTRACT_NOTEBOOK, runner.REDUCE_NOTEBOOK)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def livy_server(test_environment, tmp_path_factory):
    """The Livy test server for the whole test session; its sessions inherit the test
    environment (Keras cache with the shared weights, Spark on loopback)."""
    server = LivyServer(tmp_path_factory.mktemp("livy"), max_lifetime=3600).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def livy_sample_run(livy_server, sample_dir, tmp_path_factory):
    """``imagepca run --kernel pysparkkernel`` on the sample, through the Livy server."""
    output = tmp_path_factory.mktemp("livy_run") / "out"
    first_new = len(livy_server.sessions) + len(livy_server.ended)
    status = main(
        [
            "run",
            "--kernel",
            "pysparkkernel",
            "--livy-url",
            livy_server.url,
            "--input",
            str(sample_dir),
            "--output",
            str(output),
            "--skip-classify",
            "--livy-conf",
            "spark.imagepca.test = yes",
            "--livy-driver-memory",
            "1g",
        ]
    )
    livy_server.wait_for_ended()
    sessions = [s for i, s in sorted(livy_server.ended.items()) if i >= first_new]
    return {"status": status, "output": output, "sessions": sessions}


def _notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def _outputs(notebook) -> list[dict]:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(notebook) -> str:
    return "".join(
        "".join(o.get("text", "")) for o in _outputs(notebook) if o["output_type"] == "stream"
    )


# -- configuration and kernelspec (fast) -------------------------------------------------


def test_sparkmagic_config_keys():
    config = livy.sparkmagic_config(
        "http://localhost:8998/",
        session_name="imagepca-test",
        spark_conf={"spark.executor.memory": "4g"},
        driver_memory="2g",
    )
    assert config["kernel_python_credentials"] == {
        "username": "",
        "password": "",
        "url": "http://localhost:8998",
        "auth": "None",
    }
    assert config["livy_session_startup_timeout_seconds"] >= 300
    assert config["all_errors_are_fatal"] is True
    assert config["shutdown_session_on_spark_statement_errors"] is True
    assert config["cleanup_all_sessions_on_exit"] is True
    assert config["use_auto_viz"] is False
    assert config["coerce_dataframe"] is True
    assert config["heartbeat_refresh_seconds"] > 0
    assert config["heartbeat_retry_seconds"] > 0
    assert config["livy_server_heartbeat_timeout_seconds"] > 0
    session = config["session_configs"]
    assert session["name"] == "imagepca-test"
    assert session["driverMemory"] == "2g"
    assert session["conf"]["spark.executor.memory"] == "4g"
    assert session["conf"]["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    with pytest.raises(ValueError, match="300"):
        livy.sparkmagic_config("http://localhost:8998", startup_timeout=60)
    with pytest.raises(ValueError, match="http"):
        livy.sparkmagic_config("localhost:8998")


def test_kernel_reads_the_generated_config(tmp_path, monkeypatch):
    """sparkmagic, in the kernel's interpreter and environment, reads this run's config;
    Jupyter finds the kernelspec on JUPYTER_PATH without a system-wide install."""
    from jupyter_client.kernelspec import KernelSpecManager

    conf_dir = tmp_path / "sparkmagic"
    livy.write_sparkmagic_config(
        conf_dir, livy.sparkmagic_config("http://127.0.0.1:1", session_name="imagepca-x")
    )
    spec_dir = livy.install_kernelspec(tmp_path / "jupyter", conf_dir)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    spec = KernelSpecManager().get_kernel_spec(livy.KERNEL_NAME)
    assert Path(spec.resource_dir) == spec_dir
    assert spec.argv[0] == sys.executable
    assert spec.env == {"SPARKMAGIC_CONF_DIR": str(conf_dir)}
    probe = (
        "import sparkmagic.utils.configuration as c; import json; print(json.dumps(["
        "c.base64_kernel_python_credentials()['url'], c.all_errors_are_fatal(), "
        "c.livy_session_startup_timeout_seconds(), c.get_session_properties('python')]))"
    )
    env = {**os.environ, **spec.env}
    out = subprocess.run(
        [spec.argv[0], "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    url, fatal, timeout, properties = json.loads(out.stdout.strip().splitlines()[-1])
    assert (url, fatal, timeout) == ("http://127.0.0.1:1", True, 600)
    assert properties["kind"] == "pyspark"
    assert properties["name"] == "imagepca-x"


def test_cli_refuses_what_cannot_apply(sample_dir, tmp_path, capsys):
    base = ["run", "--input", str(sample_dir), "--output", str(tmp_path / "out")]
    # Parameter errors (exit 2), before the run writes anything.
    assert main([*base, "--livy-url", "http://localhost:8998"]) == 2
    assert "--kernel pysparkkernel" in capsys.readouterr().err
    assert main([*base, "--kernel", "pysparkkernel", "--master", "local[2]"]) == 2
    assert "--master does not apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*base, "--kernel", "pysparkkernel", "--livy-conf", "spark.executor.cores"]) == 1
    assert "--livy-conf takes KEY=VALUE (a Spark setting), got 'spark.executor.cores'" in (
        capsys.readouterr().err
    )
    # A relative path would name a folder of the Livy session's driver, not this machine's.
    relative = ["run", "--input", "data/sample", "--output", "output/x"]
    assert main([*relative, "--kernel", "pysparkkernel"]) == 2
    assert "--input data/sample, --output output/x: a relative path" in capsys.readouterr().err
    assert main([*base, "--kernel", "pysparkkernel", "--weights", "models/w.h5"]) == 2
    assert "--weights models/w.h5: a relative path" in capsys.readouterr().err
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main([*base, "--kernel", "pysparkkernel", "--livy-url", f"http://127.0.0.1:{port}"])
    assert "ssh -i KEY -N -L 8998:localhost:8998" in capsys.readouterr().err
    # Nothing but the run's log: no notebook ran, no Livy session was started.
    out = tmp_path / "out"
    assert not out.exists() or {p.name for p in out.iterdir()} == {"logs"}


# -- the Livy protocol of the test server ------------------------------------------------


def livy_call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A Livy REST call, as sparkmagic makes them: the status and the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_livy_protocol(livy_server):
    """Livy's session and statement state machines and JSON shapes, as sparkmagic reads
    them, on a real PySpark session (multi-line code, trailing expression, %matplot,
    errors, cancel, delete)."""
    import time

    def call(method, path, body=None):
        return livy_call(livy_server.url, method, path, body)

    status, created = call("POST", "/sessions", {"kind": "pyspark", "name": "protocol"})
    assert status == 201
    assert created["state"] == "starting" and created["kind"] == "pyspark"
    assert set(created) >= {"id", "name", "appId", "owner", "proxyUser", "state", "log"}
    session = f"/sessions/{created['id']}"
    deadline = time.monotonic() + 300
    while call("GET", session + "/state")[1]["state"] == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    info = call("GET", session)[1]
    assert info["state"] == "idle" and info["appId"].startswith("local-")

    def run(code):
        status, statement = call("POST", session + "/statements", {"code": code})
        assert status == 201 and statement["state"] in ("waiting", "running")
        deadline = time.monotonic() + 300
        while statement["state"] not in ("available", "error", "cancelled"):
            assert time.monotonic() < deadline, statement
            time.sleep(0.1)
            statement = call("GET", f"{session}/statements/{statement['id']}")[1]
        return statement

    ok = run("total = 0\nfor i in range(4):\n    total += i\nprint('sum')\ntotal")
    assert ok["output"] == {
        "status": "ok",
        "execution_count": ok["id"],
        "data": {"text/plain": "sum\n6"},
    }
    assert run("spark.range(5).count()")["output"]["data"]["text/plain"] == "5"
    plot = run("import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 3])\n%matplot plt")
    assert base64.b64decode(plot["output"]["data"]["image/png"]).startswith(PNG_MAGIC)
    failed = run("def f():\n    raise ValueError('bad value')\nf()")
    assert failed["state"] == "available"
    assert failed["output"]["status"] == "error"
    assert (failed["output"]["ename"], failed["output"]["evalue"]) == ("ValueError", "bad value")
    assert failed["output"]["traceback"][-1] == "ValueError: bad value\n"
    _, slow = call("POST", session + "/statements", {"code": "import time\ntime.sleep(120)"})
    deadline = time.monotonic() + 300
    while call("GET", f"{session}/statements/{slow['id']}")[1]["state"] == "waiting":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert call("GET", session + "/state")[1]["state"] == "busy"
    assert call("POST", f"{session}/statements/{slow['id']}/cancel") == (200, {"msg": "canceled"})
    assert run("total")["output"]["data"]["text/plain"] == "6"  # runs after the cancel
    cancelled = call("GET", f"{session}/statements/{slow['id']}")[1]
    assert cancelled["state"] == "cancelled"
    assert cancelled["completed"] - cancelled["started"] < 120_000  # interrupted before its end
    listing = call("GET", session + "/statements")[1]
    assert listing["total_statements"] == len(listing["statements"]) == 6
    log = call("GET", session + "/log?from=0&size=1000")[1]
    assert log["id"] == created["id"] and isinstance(log["log"], list)
    assert call("DELETE", session) == (200, {"msg": "deleted"})
    assert created["id"] not in {s["id"] for s in livy_api.list_sessions(livy_server.url)}
    livy_server.wait_for_ended()
    states = livy_server.ended[created["id"]].states
    assert states[:4] == ["starting", "idle", "busy", "idle"]
    assert states[-2:] == ["shutting_down", "dead"]


# -- papermill through the PySpark kernel ------------------------------------------------


@pytest.mark.parametrize("names", [True, False], ids=["livy-0.6+", "older-livy"])
def test_sessions_a_run_left_behind_are_deleted(tmp_path, names):
    """A kernel that died without deleting its session (sparkmagic's own clean-up) leaves
    it holding the cluster: the run deletes its sessions by name, or, on a Livy that
    reports no names, every session that was not there before it. Others stay."""

    def create(name: str) -> int:
        _, session = livy_call(server.url, "POST", "/sessions", {"kind": "pyspark", "name": name})
        return session["id"]

    with LivyServer(tmp_path, max_lifetime=300, names=names) as server:
        other = create("someone-else")
        known = frozenset(session["id"] for session in livy_api.list_sessions(server.url))
        ours = [create("imagepca-run-x"), create("imagepca-run-x-2")]
        assert all(("name" in s) is names for s in livy_api.list_sessions(server.url))
        deleted = livy_api.delete_run_sessions(server.url, "imagepca-run-x", known_ids=known)
        assert sorted(deleted) == ours
        assert [session["id"] for session in livy_api.list_sessions(server.url)] == [other]


def test_notebooks_run_in_pyspark_kernel(livy_sample_run, livy_server, sample_dir, sample_run):
    assert livy_sample_run["status"] == 0
    output = livy_sample_run["output"]
    layout = set(OUTPUT_LAYOUT)
    # logs/: the run's log file (imagepca run writes it for every kernel)
    assert {p.name for p in output.iterdir()} == layout | {"logs"}
    assert layout <= {p.name for p in sample_run.iterdir()}  # as a local-kernel run
    assert sorted(p.name for p in (output / "notebooks").iterdir()) == sorted(NOTEBOOKS)

    for name, plots in zip(NOTEBOOKS, (1, 2), strict=True):
        notebook = _notebook(output / "notebooks" / name)
        assert notebook.metadata.papermill.parameters["output"] == str(output)
        injected = [
            c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])
        ]
        assert len(injected) == 1 and f'output = "{output}"' in injected[0].source
        assert not notebook.metadata.papermill.get("exception")
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(c.metadata.papermill.status == "completed" for c in code)
        assert all(o["output_type"] != "error" for o in _outputs(notebook))
        # sparkmagic's own message, once per kernel (the run's notebooks share one): the
        # cells really went through a Livy session
        if name == runner.EXTRACT_NOTEBOOK:
            assert "SparkSession available as 'spark'." in _text(notebook)
        images = [
            o.data["image/png"] for o in _outputs(notebook) if "image/png" in o.get("data", {})
        ]
        assert len(images) == plots
        assert all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)

    extract = _notebook(output / "notebooks" / runner.EXTRACT_NOTEBOOK)
    assert f"240 image files under {sample_dir}" in _text(extract)  # ran with the parameters

    # one kernel for the run's notebooks, so one Livy session, named for the run and
    # deleted: none left behind
    sessions = livy_sample_run["sessions"]
    assert len(sessions) == 1
    assert all(s.name.startswith(livy.SESSION_NAME_PREFIX + "-") for s in sessions)
    assert all(s.states[-1] == "dead" for s in sessions)
    assert any(f'input = "{sample_dir}"' in st.code for st in sessions[0].statements)
    assert livy_api.list_sessions(livy_server.url) == []
    # The session sparkmagic asked Livy for has the settings local sessions are built with.
    sent = sessions[0].request["conf"]
    assert {key: sent.get(key) for key in SPARK_SETTINGS} == SPARK_SETTINGS
    assert sent["spark.imagepca.test"] == "yes"  # --livy-conf, trimmed
    assert sessions[0].request["driverMemory"] == "1g"  # --livy-driver-memory


def test_failing_cell_fails_the_run(livy_server, tmp_path):
    """A raising cell fails papermill with the Python error in the executed notebook, the
    cells after it do not run, and the session is deleted."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "fails.ipynb",
        "n = 1",
        "total = 0\nfor i in range(n):\n    total += i\ntotal",
        "raise ValueError(f'no such class: {n}')",
        "print('after the error')",
    )
    output = tmp_path / "out"
    before = set(livy_server.ended)
    with (
        livy.livy_environment(livy_server.url) as run,
        pytest.raises(runner.NotebookFailed, match="ValueError: no such class: 7"),
    ):
        runner.run_notebooks(
            [runner.NotebookRun("fails.ipynb", {"n": 7})],
            str(output),
            notebooks=str(notebooks),
            kernel=livy.KERNEL_NAME,
            env=run.env,
        )
    executed = _notebook(output / "notebooks" / "fails.ipynb")
    assert executed.metadata.papermill.exception is True
    cells = [c for c in executed.cells if c.cell_type == "code"]
    sums = [c for c in cells if c.source.startswith("total = 0")]
    assert "21" in "".join(o.get("text", "") for o in sums[0].outputs)  # multi-line cell
    errors = [o for c in cells for o in c.outputs if o["output_type"] == "error"]
    assert len(errors) == 1
    assert "ValueError: no such class: 7" in errors[0]["evalue"]
    assert cells[-1].metadata.papermill.status == "pending"
    assert not cells[-1].outputs
    livy_server.wait_for_ended()
    new = [livy_server.ended[i] for i in set(livy_server.ended) - before]
    assert len(new) == 1 and new[0].states[-1] == "dead"
    assert livy_api.list_sessions(livy_server.url) == []


def test_a_terminated_run_deletes_its_session(livy_server, tmp_path):
    """SIGTERM to a Livy run (``kill``, ``timeout``) during a statement: the
    saved notebook marks the cell, and the run's session does not stay holding the cluster
    (before, the process ended at once and the session stayed until Livy's timeout)."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "slow.ipynb", "seconds = 0", "import time\ntime.sleep(seconds)")
    output = tmp_path / "out"
    code = (
        "from imagepca import livy, runner\n"
        f"with livy.livy_environment({livy_server.url!r}) as run:\n"
        "    runner.run_notebooks(\n"
        f"        [runner.NotebookRun('slow.ipynb', {{'seconds': 600}})], {str(output)!r},\n"
        f"        notebooks={str(notebooks)!r}, kernel=livy.KERNEL_NAME, env=run.env)\n"
    )
    before = set(livy_server.ended)
    process = subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    saved = output / "notebooks" / "slow.ipynb"
    stderr = signal_once_started(
        process,
        saved,
        lambda p: p.send_signal(signal.SIGTERM),
        ready=lambda: any(s["state"] == "busy" for s in livy_api.list_sessions(livy_server.url)),
        timeout=240,
    )
    assert process.returncode != 0 and "RunTerminated" in stderr
    cells = [c for c in _notebook(saved).cells if c.cell_type == "code"]
    assert cells[-1].metadata.papermill.status == "failed"
    assert cells[-1].outputs[-1].evalue == "the run was terminated here (SIGTERM)"
    livy_server.wait_for_ended()
    new = [livy_server.ended[i] for i in set(livy_server.ended) - before]
    assert len(new) == 1 and new[0].states[-1] == "dead"
    assert livy_api.list_sessions(livy_server.url) == []


def test_local_output_written_elsewhere_stops_the_run(livy_server, tmp_path):
    """A Livy driver on another machine writes a local --output on its own disk: the run
    stops after notebook 01 and says so, instead of running notebooks 02 and 03 for nothing
    and failing on a metrics.json it cannot read."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # Notebook 01 as it completes on a remote driver: its outputs go to that driver's disk.
    write_notebook(
        notebooks / runner.EXTRACT_NOTEBOOK,
        "output = None",
        "import pathlib\nelsewhere = pathlib.Path(output + '-driver-disk', 'features')\n"
        "elsewhere.mkdir(parents=True)\n(elsewhere / '_extraction.json').write_text('{}')",
    )
    write_notebook(notebooks / runner.REDUCE_NOTEBOOK, "output = None", "print('ran')")
    output = tmp_path / "out"
    # An earlier local run's description is there: older than this run, it does not count.
    stale = output / "features" / "_extraction.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    os.utime(stale, (1e9, 1e9))
    runs = [runner.NotebookRun(name, {"output": str(output)}) for name in NOTEBOOKS]
    with (
        livy.livy_environment(livy_server.url) as run,
        pytest.raises(runner.NotebookFailed) as failed,
    ):
        runner.run_notebooks(
            runs, str(output), notebooks=str(notebooks), kernel=livy.KERNEL_NAME, env=run.env
        )
    message = str(failed.value)
    assert f"{output}/features/_extraction.json is not on this machine" in message
    assert "Use an s3:// --output" in message
    assert (tmp_path / "out-driver-disk" / "features" / "_extraction.json").is_file()
    assert {p.name for p in (output / "notebooks").iterdir()} == {runner.EXTRACT_NOTEBOOK}
    livy_server.wait_for_ended()
    assert livy_api.list_sessions(livy_server.url) == []


def test_livy_and_local_kernels_agree(livy_sample_run, sample_run):
    livy_out, local_out = livy_sample_run["output"], sample_run
    livy_metrics = json.loads((livy_out / "metrics.json").read_text())
    local_metrics = json.loads((local_out / "metrics.json").read_text())
    for key in ("n_files_found", "n_images", "n_rejected", "n_classes", "images_per_label", "k"):
        assert livy_metrics[key] == local_metrics[key], key
    np.testing.assert_allclose(
        livy_metrics["explained_variance"], local_metrics["explained_variance"], atol=1e-6
    )

    def features(output: Path) -> pd.DataFrame:
        frame = pd.read_parquet(output / "features")
        return frame.sort_values("path").reset_index(drop=True)

    remote, local = features(livy_out), features(local_out)
    assert list(remote["path"]) == list(local["path"])
    assert list(remote["label"]) == list(local["label"])
    difference = np.abs(np.stack(remote["features"]) - np.stack(local["features"]))
    assert difference.shape == (240, 1280)
    assert difference.max() <= 1e-4


# -- Livy over HTTPS (EMR 7.4+ with in-transit encryption) --------------------------------


def test_tls_options_are_validated_at_the_edge(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    with pytest.raises(ValueError, match="no such file"):
        livy_api.LivyTls(str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="not both"):
        livy_api.LivyTls(str(ca), insecure=True)
    with pytest.raises(ValueError, match="https://"):
        livy_api.LivyTls(str(ca)).check("http://localhost:8998")
    assert livy.sparkmagic_config("https://x:8998", verify_tls=False)["ignore_ssl_errors"] is True
    assert livy.sparkmagic_config("https://x:8998")["ignore_ssl_errors"] is False
    with (
        pytest.raises(ValueError, match="--kernel pysparkkernel"),
        livy.kernel_environment("python3", ca_bundle=str(ca)),
    ):
        pass


def test_notebook_runs_over_https_with_the_clusters_ca(tmp_path, monkeypatch, capsys):
    """The kernel (sparkmagic's requests session) and the runner's REST calls verify Livy's
    certificate against the bundle; without it nothing starts, with a clear message."""
    from livy_server import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(
        notebooks / "tls.ipynb",
        "n = 1\nout = ''",
        "import json, pathlib\nprint('over tls', n * 6)\n"
        "pathlib.Path(out, 'metrics.json').write_text(json.dumps({'n': n * 6}))",
    )
    output = tmp_path / "out"
    output.mkdir()
    with LivyServer(tmp_path / "livy", tls=pki, max_lifetime=600) as server:
        with (
            pytest.raises(livy_api.LivyUnavailable, match="--livy-ca-bundle"),
            livy.kernel_environment(livy.KERNEL_NAME, livy_url=server.url),
        ):
            pass
        assert server.sessions == {}  # refused before any session

        # `imagepca run --kernel pysparkkernel` takes the bundle from the environment,
        monkeypatch.setenv(livy_api.CA_BUNDLE_ENV, str(pki.ca))
        # for https URLs only: an http one (a cluster without in-transit encryption) is
        # tried, not refused as if --livy-ca-bundle had been passed.
        with (
            pytest.raises(livy_api.LivyUnavailable, match="does not answer"),
            livy.kernel_environment(livy.KERNEL_NAME, livy_url="http://127.0.0.1:9"),
        ):
            pass
        with livy.kernel_environment(livy.KERNEL_NAME, livy_url=server.url) as env:
            metrics = runner.run_notebooks(
                [runner.NotebookRun("tls.ipynb", {"n": 7, "out": str(output)})],
                str(output),
                notebooks=str(notebooks),
                kernel=livy.KERNEL_NAME,
                env=env,
            )
        server.wait_for_ended()
        assert len(server.ended) == 1 and not server.sessions
    assert metrics == {"n": 42}  # written by the cell, in the Livy session
    executed = _notebook(output / "notebooks" / "tls.ipynb")
    assert "over tls 42" in _text(executed)
    # The copy reopens in the kernel that ran it, not the source's python3.
    assert executed["metadata"]["kernelspec"]["name"] == livy.KERNEL_NAME
