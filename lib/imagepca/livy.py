"""Run the notebooks in sparkmagic's PySpark kernel, on a Spark cluster reached through Livy.

On EMR, JupyterHub and EMR Notebooks run notebooks in sparkmagic's ``pysparkkernel``: each
cell is sent to a Livy session and runs on the cluster's driver. papermill can drive that
kernel headlessly from any machine that reaches Livy (on EMR: port 8998 of the primary
node, through an SSH tunnel). :func:`livy_environment` prepares such a run in a folder it
owns, so nothing in ``~/.sparkmagic`` or the system's Jupyter is read or changed:

- a sparkmagic ``config.json`` (``SPARKMAGIC_CONF_DIR``) with the Livy URL and settings
  that make a headless run safe: every error fatal (so papermill fails the run),
  a startup timeout long enough for a cluster that loads TensorFlow, heartbeats, no
  auto-visualisation, and the session's sizing (there are no ``%%configure`` cells);
- a ``pysparkkernel`` kernelspec (``JUPYTER_PATH``) running this interpreter;
- on exit, every Livy session the run created is deleted through Livy's REST API, also
  when a kernel was killed before it could delete its own.

Livy over HTTPS: from EMR 7.4, a cluster with in-transit encryption serves Livy over HTTPS
only, with the certificate of its security configuration (often self-signed). Pass that
certificate (or its CA) as ``ca_bundle``: the REST calls (:mod:`imagepca.livy_api`) and the
kernel's (``requests``, through ``REQUESTS_CA_BUNDLE``) then verify against it. ``insecure=True``
turns verification off, and says so loudly, at the start and at the end of the run.

With this kernel a notebook's ``master`` parameter is ignored (``get_spark`` returns the
Livy session's ``spark``) and paths are read and written by the remote driver.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

from .config import SPARK_SETTINGS, ParameterError
from .livy_api import LivyTls, LivyUnavailable, delete_run_sessions, list_sessions

KERNEL_NAME = "pysparkkernel"
DEFAULT_LIVY_URL = "http://localhost:8998"
SESSION_NAME_PREFIX = "imagepca"
# Startup covers YARN scheduling the driver and the first import of TensorFlow there.
DEFAULT_STARTUP_TIMEOUT_S = 600
# Livy deletes a session whose client stopped sending heartbeats for this long (a runner
# that died), while a long cell keeps its session alive as the kernel keeps polling.
DEFAULT_HEARTBEAT_TIMEOUT_S = 600
# A Livy session exists before any cell runs, so the pipeline's settings come with its
# configuration instead of from get_spark.
SESSION_SPARK_CONF = SPARK_SETTINGS


def sparkmagic_config(
    livy_url: str,
    *,
    session_name: str | None = None,
    spark_conf: dict[str, str] | None = None,
    driver_memory: str | None = None,
    executor_memory: str | None = None,
    startup_timeout: int = DEFAULT_STARTUP_TIMEOUT_S,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    verify_tls: bool = True,
) -> dict:
    """The sparkmagic ``config.json`` for a headless run against ``livy_url``.

    Parameters
    ----------
    livy_url : str
        Livy's base URL, e.g. ``http://localhost:8998`` through an SSH tunnel.
    session_name : str, optional
        Livy session ``name``; each kernel appends its process id (Livy refuses two live
        sessions with one name, and a run starts one kernel per notebook). The run's
        leftover sessions are found by this name.
    spark_conf : dict, optional
        Spark settings of the session, over :data:`SESSION_SPARK_CONF`.
    driver_memory, executor_memory : str, optional
        Livy's ``driverMemory`` / ``executorMemory`` (e.g. ``"4g"``); cluster defaults
        otherwise.
    startup_timeout : int
        Seconds a session may take to become idle (sparkmagic's default, 60, is too short
        for a YARN driver that imports TensorFlow). At least 300.
    heartbeat_timeout : int
        Livy's ``heartbeatTimeoutInSecond``: the session dies this long after its kernel
        stopped sending heartbeats.
    verify_tls : bool
        ``False`` sets sparkmagic's ``ignore_ssl_errors`` (``--livy-insecure``).
    """
    if not livy_url.startswith(("http://", "https://")):
        raise ValueError(f"--livy-url must be an http(s) URL, got {livy_url!r}")
    if startup_timeout < 300:
        raise ValueError(f"the Livy startup timeout must be at least 300 s, got {startup_timeout}")
    session: dict = {"conf": {**SESSION_SPARK_CONF, **(spark_conf or {})}}
    if session_name:
        session["name"] = session_name
    if driver_memory:
        session["driverMemory"] = driver_memory
    if executor_memory:
        session["executorMemory"] = executor_memory
    return {
        "kernel_python_credentials": {
            "username": "",
            "password": "",
            "url": livy_url.rstrip("/"),
            "auth": "None",
        },
        "session_configs": session,
        "livy_session_startup_timeout_seconds": startup_timeout,
        "wait_for_idle_timeout_seconds": 120,
        "heartbeat_refresh_seconds": 5,
        "heartbeat_retry_seconds": 5,
        "livy_server_heartbeat_timeout_seconds": heartbeat_timeout,
        # A failing cell must fail papermill's run (pm#330, sm#518): raise, do not print.
        "all_errors_are_fatal": True,
        "shutdown_session_on_spark_statement_errors": True,
        "cleanup_all_sessions_on_exit": True,
        # No widgets or auto-visualisation in a headless run (pm#717).
        "use_auto_viz": False,
        "coerce_dataframe": True,
        "default_maxrows": 100,
        "ignore_ssl_errors": not verify_tls,
    }


def write_sparkmagic_config(folder: str | Path, config: dict) -> Path:
    """Write ``config`` as ``folder/config.json`` (the folder is ``SPARKMAGIC_CONF_DIR``)."""
    path = Path(folder) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def install_kernelspec(
    jupyter_dir: str | Path,
    conf_dir: str | Path,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Path:
    """Write the ``pysparkkernel`` kernelspec under ``jupyter_dir/kernels/``.

    ``jupyter_dir`` goes on ``JUPYTER_PATH``, so no system-wide ``jupyter kernelspec
    install`` is needed. Unlike the kernel.json sparkmagic ships (``"python"``, whichever
    is first on ``PATH``), this one runs ``python`` (default: this interpreter), and it
    names ``conf_dir`` (and ``env``, e.g. the CA bundle) in the kernel's environment, so
    the kernel reads this run's configuration whatever the caller's environment.
    """
    spec_dir = Path(jupyter_dir) / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [python, "-m", "imagepca.livy", "kernel", "-f", "{connection_file}"],
        "display_name": "PySpark (imagepca, Livy)",
        "language": "python",
        "env": {"SPARKMAGIC_CONF_DIR": str(conf_dir), **(env or {})},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return spec_dir


def _kernel_main(argv: list[str]) -> None:
    """Start sparkmagic's PySpark kernel with a session name unique to this kernel."""
    import sparkmagic.utils.configuration as conf

    session = dict(conf.session_configs())
    if session.get("name"):
        session["name"] = f"{session['name']}-{os.getpid()}"
        conf.override("session_configs", session)
    from ipykernel.kernelapp import IPKernelApp
    from sparkmagic.kernels.pysparkkernel.pysparkkernel import PySparkKernel

    IPKernelApp.launch_instance(argv=argv, kernel_class=PySparkKernel)


@dataclass
class LivyRun:
    """What :func:`livy_environment` prepared: hand ``env`` to the runner."""

    livy_url: str
    session_name: str
    folder: Path
    env: dict[str, str]
    known_ids: frozenset[int]
    deleted: list[int] = field(default_factory=list)


@contextmanager
def livy_environment(
    livy_url: str = DEFAULT_LIVY_URL,
    *,
    folder: str | Path | None = None,
    spark_conf: dict[str, str] | None = None,
    driver_memory: str | None = None,
    executor_memory: str | None = None,
    startup_timeout: int = DEFAULT_STARTUP_TIMEOUT_S,
    keep_folder: bool = False,
    tls: LivyTls | None = None,
) -> Iterator[LivyRun]:
    """Prepare a papermill run in ``pysparkkernel`` against ``livy_url``; clean up after.

    Yields a :class:`LivyRun` whose ``env`` (``SPARKMAGIC_CONF_DIR``, ``JUPYTER_PATH``)
    goes to :func:`imagepca.runner.run_notebooks` with ``kernel="pysparkkernel"``. On exit,
    the run's Livy sessions still alive are deleted, and the folder is removed unless
    ``keep_folder`` (it holds sparkmagic's logs, under ``sparkmagic/logs``). ``tls``
    says how to trust an ``https`` Livy (default: the system's CAs).

    Raises
    ------
    LivyUnavailable
        Before anything runs, when Livy does not answer.
    """
    tls = tls or LivyTls()
    tls.check(livy_url)
    tls.warn(livy_url)
    known = frozenset(session["id"] for session in list_sessions(livy_url, tls))
    owned = folder is None
    root = Path(folder or tempfile.mkdtemp(prefix="imagepca-livy-"))
    session_name = f"{SESSION_NAME_PREFIX}-{uuid.uuid4().hex[:12]}"
    conf_dir = root / "sparkmagic"
    jupyter_dir = root / "jupyter"
    write_sparkmagic_config(
        conf_dir,
        sparkmagic_config(
            livy_url,
            session_name=session_name,
            spark_conf=spark_conf,
            driver_memory=driver_memory,
            executor_memory=executor_memory,
            startup_timeout=startup_timeout,
            verify_tls=not tls.insecure,
        ),
    )
    install_kernelspec(jupyter_dir, conf_dir, env=tls.kernel_env())
    jupyter_path = os.pathsep.join(filter(None, [str(jupyter_dir), os.environ.get("JUPYTER_PATH")]))
    run = LivyRun(
        livy_url=livy_url,
        session_name=session_name,
        folder=root,
        # Not the CA bundle: this process's own clients (botocore's, papermill's for an
        # s3:// output) read REQUESTS_CA_BUNDLE too and would trust nothing but Livy's
        # certificate. The kernel gets it from its kernelspec.
        env={"SPARKMAGIC_CONF_DIR": str(conf_dir), "JUPYTER_PATH": jupyter_path},
        known_ids=known,
    )
    try:
        yield run
    finally:
        try:
            run.deleted = delete_run_sessions(livy_url, session_name, known_ids=known, tls=tls)
        except (LivyUnavailable, URLError, OSError) as error:
            # Do not hide the run's own outcome; say what may be left behind instead.
            print(
                f"warning: could not delete the Livy sessions named {session_name}-* "
                f"({error}); list them with GET {livy_url}/sessions and delete each with "
                f"DELETE {livy_url}/sessions/ID (Livy also ends them after "
                f"{DEFAULT_HEARTBEAT_TIMEOUT_S} s without heartbeats)",
                file=sys.stderr,
            )
        finally:
            tls.warn(livy_url)  # again at the end, where the eye lands
            if owned and not keep_folder:
                shutil.rmtree(root, ignore_errors=True)


def parse_spark_conf(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (``--livy-conf``) as a dict; a malformed item is refused."""
    conf = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--livy-conf takes KEY=VALUE (a Spark setting), got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


def check_kernel_options(kernel: str, *, master: str | None, **livy_options: object) -> None:
    """Refuse ``--livy-*`` options without ``pysparkkernel``, ``--master`` with it, a Livy
    URL that is not http(s) and a startup timeout under 300 s: before Livy is contacted."""
    if kernel != KERNEL_NAME and any(livy_options.values()):
        raise ParameterError(f"--livy-* options need --kernel {KERNEL_NAME}, not {kernel!r}")
    if kernel == KERNEL_NAME and master:
        raise ParameterError(
            f"--master does not apply to --kernel {KERNEL_NAME}: the Livy session runs where "
            "the cluster puts it (size it with --livy-conf / --livy-driver-memory)"
        )
    url, timeout = livy_options.get("livy_url"), livy_options.get("startup_timeout")
    if url and not str(url).startswith(("http://", "https://")):
        raise ParameterError(f"--livy-url {url}: give an http:// or https:// URL")
    if timeout is not None and timeout < 300:
        raise ParameterError(
            f"--livy-startup-timeout {timeout}: give at least 300 seconds (a YARN driver that "
            "imports TensorFlow takes minutes), or leave it out for 600"
        )


@contextmanager
def kernel_environment(
    kernel: str,
    *,
    livy_url: str | None = None,
    livy_conf: list[str] | tuple[str, ...] = (),
    driver_memory: str | None = None,
    startup_timeout: int | None = None,
    master: str | None = None,
    ca_bundle: str | None = None,
    insecure: bool | None = None,
) -> Iterator[dict[str, str] | None]:
    """The kernel environment for ``imagepca run``: ``None`` for a local kernel, else the
    :func:`livy_environment` of the ``pysparkkernel`` run (cleaned up on exit).

    ``ca_bundle`` / ``insecure`` (:class:`LivyTls`) default to ``IMAGEPCA_LIVY_CA_BUNDLE``
    / ``IMAGEPCA_LIVY_INSECURE`` for an https URL; options that cannot apply are refused
    before anything runs."""
    check_kernel_options(
        kernel,
        master=master,
        livy_url=livy_url,
        livy_conf=livy_conf,
        driver_memory=driver_memory,
        ca_bundle=ca_bundle,
        insecure=insecure,
        startup_timeout=startup_timeout,
    )
    if kernel != KERNEL_NAME:
        yield None
        return
    https = (livy_url or DEFAULT_LIVY_URL).startswith("https://")
    from_env = LivyTls.from_environment() if https else LivyTls()
    tls = LivyTls(
        ca_bundle if ca_bundle is not None else from_env.ca_bundle,
        insecure if insecure is not None else from_env.insecure,
    )
    with livy_environment(
        livy_url or DEFAULT_LIVY_URL,
        spark_conf=parse_spark_conf(livy_conf),
        driver_memory=driver_memory,
        startup_timeout=startup_timeout or DEFAULT_STARTUP_TIMEOUT_S,
        tls=tls,
    ) as run:
        yield run.env


if __name__ == "__main__":
    if sys.argv[1:2] == ["kernel"]:
        _kernel_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m imagepca.livy kernel -f CONNECTION_FILE (started by Jupyter)")
