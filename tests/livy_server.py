"""A Livy-protocol test server: the part of Apache Livy's REST API that sparkmagic uses.

Test fixture, not product code. It lets the tests run the notebooks in sparkmagic's
``pysparkkernel`` exactly as on EMR (kernel -> HTTP -> Livy session -> PySpark driver),
without a cluster. What it implements, with Livy's JSON shapes:

- ``POST /sessions``, ``GET /sessions``, ``GET|DELETE /sessions/{id}``,
  ``GET /sessions/{id}/state``, ``GET /sessions/{id}/log``;
- ``POST|GET /sessions/{id}/statements``, ``GET /sessions/{id}/statements/{sid}``,
  ``POST /sessions/{id}/statements/{sid}/cancel``.

Session states follow Livy: ``starting -> idle -> busy -> idle ... -> shutting_down ->
dead`` (``dead`` too when the interpreter fails or exits). A deleted session leaves the
listing at once, as in Livy; :attr:`LivyServer.ended` keeps it for the tests. Statement
states: ``waiting -> running -> available`` (also when the code raised: the error is in
``output``), ``cancelling -> cancelled``, and ``error`` when the interpreter died.

Each session runs its statements in its own persistent Python process (this file run with
``--repl``, by the same interpreter), which holds a local SparkSession as ``spark`` and
``sc`` like Livy's PySpark interpreter: code is ``exec``-ed in one namespace, the value of
a trailing expression is printed, stdout/stderr become ``text/plain``, lines starting with
``%`` are Livy magics (``%matplot``, ``%json``), and an error comes back as
``ename``/``evalue``/``traceback``.

Over TLS (``tls=TlsFiles``, see :func:`make_test_pki`) it serves HTTPS only, as EMR 7.4+
serves Livy when the cluster encrypts in transit.

Everything stops by itself: :meth:`LivyServer.stop` (the fixture's teardown) deletes the
sessions; HTTP and session threads are daemons; idle sessions past their
``heartbeatTimeoutInSecond`` are deleted as Livy does; the server shuts down after
``max_lifetime`` seconds; and an interpreter exits when its stdin closes or its parent dies.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import itertools
import json
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

SESSION_ENV = "LIVY_TEST_SESSION"  # JSON settings handed to the interpreter process
FINAL_SESSION_STATES = ("dead", "killed", "error", "success")
LOG_LINES_IN_VIEW = 10  # Livy shows the last 10 log lines in a session object


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI: the CA clients trust, the server's chain and key."""

    ca: Path
    cert: Path
    key: Path


def make_test_pki(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """A self-signed CA and a server certificate it signs for ``hosts`` (SANs), valid 1 day.

    Made with ``cryptography`` in the test, so nothing secret is ever stored in the repo.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    folder.mkdir(parents=True, exist_ok=True)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("imagepca test CA"))
        .issuer_name(name("imagepca test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class _HttpServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            return  # a refused TLS handshake: the client sees it, the test log need not
        super().handle_error(request, client_address)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Statement:
    """One statement and its Livy JSON view."""

    def __init__(self, statement_id: int, code: str) -> None:
        self.id = statement_id
        self.code = code
        self.state = "waiting"
        self.output: dict | None = None
        self.started = 0
        self.completed = 0
        self.cancel_requested = False

    def view(self) -> dict:
        return {
            "id": self.id,
            "code": self.code,
            "state": self.state,
            "output": self.output,
            "progress": 1.0 if self.state == "available" else 0.0,
            "started": self.started,
            "completed": self.completed,
        }


class Session:
    """A Livy interactive session backed by one interpreter process."""

    def __init__(self, session_id: int, request: dict, workdir: Path, python: str) -> None:
        self.id = session_id
        self.request = request
        self.name = request.get("name")
        self.kind = request.get("kind") or "pyspark"
        self.heartbeat_timeout = float(request.get("heartbeatTimeoutInSecond") or 0)
        self.workdir = workdir
        self.python = python
        self.log_path = workdir / "session.log"
        self.app_id: str | None = None
        self.state = "starting"
        self.states = ["starting"]  # every state the session went through, for tests
        self.statements: list[Statement] = []
        self.last_activity = time.monotonic()
        self.process: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self._queue: queue.Queue[Statement | None] = queue.Queue()
        self._worker = threading.Thread(
            target=self._serve, name=f"livy-session-{session_id}", daemon=True
        )
        self._worker.start()

    # -- views -----------------------------------------------------------------------------

    def view(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "appId": self.app_id,
            "owner": None,
            "proxyUser": None,
            "state": self.state,
            "kind": self.kind,
            "appInfo": {"driverLogUrl": None, "sparkUiUrl": None},
            "log": self.log_lines()[-LOG_LINES_IN_VIEW:],
        }

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def _set_state(self, state: str) -> None:
        with self._lock:
            if self.state in FINAL_SESSION_STATES or self.state == state:
                return
            self.state = state
            self.states.append(state)

    # -- statements ------------------------------------------------------------------------

    def submit(self, code: str) -> Statement:
        with self._lock:
            if self.state not in ("starting", "idle", "busy"):
                raise ValueError(f"Session {self.id} is in state {self.state}")
            statement = Statement(len(self.statements), code)
            self.statements.append(statement)
        self._queue.put(statement)
        return statement

    def cancel(self, statement: Statement) -> None:
        with self._lock:
            if statement.state == "waiting":
                statement.state = "cancelled"
                statement.completed = _now_ms()
            elif statement.state == "running":
                statement.state = "cancelling"
                statement.cancel_requested = True
                threading.Thread(target=self._interrupt, args=(statement,), daemon=True).start()

    def _interrupt(self, statement: Statement, timeout: float = 60.0) -> None:
        """SIGINT the interpreter until the statement ends: it raises KeyboardInterrupt in
        the code (PySpark's handler also cancels the running jobs). The interpreter ignores
        SIGINT outside user code, so a signal sent before the code starts is simply sent
        again."""
        deadline = time.monotonic() + timeout
        while statement.state == "cancelling" and time.monotonic() < deadline:
            process = self.process
            if process is None or process.poll() is not None:
                return
            process.send_signal(signal.SIGINT)
            time.sleep(0.5)

    # -- interpreter -----------------------------------------------------------------------

    def _serve(self) -> None:
        settings = {
            "conf": self.request.get("conf") or {},
            "driverMemory": self.request.get("driverMemory"),
            "name": self.name or f"livy-session-{self.id}",
            "parent": os.getpid(),
        }
        env = {
            **os.environ,
            SESSION_ENV: json.dumps(settings),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, str(Path(__file__).resolve()), "--repl"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # its own process group: stop() ends the JVM too
            )
        ready = self._read_reply()
        if not ready or "appId" not in ready:
            self._set_state("dead")
            self._stop_process()
            return
        self.app_id = ready["appId"]
        self._set_state("idle")
        while True:
            statement = self._queue.get()
            if statement is None:
                break
            with self._lock:
                if statement.state == "cancelled":
                    continue
                statement.state = "running"
                statement.started = _now_ms()
            self._set_state("busy")
            reply = self._request({"code": statement.code})
            with self._lock:
                statement.completed = _now_ms()
                if reply is None:  # the interpreter died
                    statement.state = "error"
                    statement.output = {
                        "status": "error",
                        "execution_count": statement.id,
                        "ename": "InterpreterError",
                        "evalue": "the Python interpreter of the session exited",
                        "traceback": [],
                    }
                    self._set_state("dead")
                    return
                statement.output = {**reply, "execution_count": statement.id}
                statement.state = "cancelled" if statement.cancel_requested else "available"
            self._set_state("idle")

    def _request(self, message: dict) -> dict | None:
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read_reply()

    def _read_reply(self) -> dict | None:
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        """Livy's DELETE: shutting_down, interpreter and Spark stopped, then dead."""
        self._set_state("shutting_down")
        with self._lock:
            for statement in self.statements:
                if statement.state == "waiting":
                    statement.state = "cancelled"
        self._queue.put(None)
        self._stop_process()
        self._set_state("dead")

    def _stop_process(self, grace: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # the interpreter stops Spark and exits on EOF
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)  # its own group: the Spark JVM, Python workers
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(1.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


class LivyServer:
    """The HTTP server; ``url`` is ``http://127.0.0.1:PORT`` on an ephemeral port.

    Parameters
    ----------
    workdir : str or Path, optional
        Where each session's folder (cwd and ``session.log``) is made; a temp dir otherwise.
    python : str
        Interpreter of the sessions (default: this one, the project's venv).
    max_lifetime : float
        Seconds after which the server stops itself, whatever the tests do.
    tls : TlsFiles, optional
        Serve HTTPS only with this certificate (:func:`make_test_pki`).
    names : bool
        Report the sessions' names, as Livy 0.6 and later do (False: an older Livy).
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        python: str = sys.executable,
        max_lifetime: float = 1800.0,
        tls: TlsFiles | None = None,
        names: bool = True,
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="livy-test-"))
        self.names = names
        self.python = python
        self.max_lifetime = max_lifetime
        self.sessions: dict[int, Session] = {}
        self.ended: dict[int, Session] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._httpd = _HttpServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert, tls.key)
            # The handshake happens in the request's thread, so a client that speaks plain
            # HTTP (or distrusts the certificate) never blocks the accept loop.
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, name="livy-http", daemon=True),
            threading.Thread(target=self._watch, name="livy-watch", daemon=True),
        ]

    def start(self) -> LivyServer:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __enter__(self) -> LivyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Delete every live session (stopping its interpreter), then stop serving."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with self._lock:
            live = list(self.sessions)
        for session_id in live:
            self.delete_session(session_id, wait=True)
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- sessions --------------------------------------------------------------------------

    def session_view(self, session: Session) -> dict:
        view = session.view()
        if not self.names:
            del view["name"]
        return view

    def create_session(self, request: dict) -> Session:
        kind = request.get("kind")
        if kind not in (None, "pyspark", "shared"):
            raise ValueError(f"this test server runs pyspark sessions only, not kind {kind!r}")
        with self._lock:
            name = request.get("name")
            if name is not None and any(s.name == name for s in self.sessions.values()):
                raise ValueError(f"Duplicate session name: {name}")  # as Livy refuses it
            session_id = next(self._ids)
            workdir = self.workdir / f"session-{session_id}"
            workdir.mkdir(parents=True)
            session = Session(session_id, request, workdir, self.python)
            self.sessions[session_id] = session
        return session

    def delete_session(self, session_id: int, *, wait: bool = False) -> bool:
        with self._lock:
            session = self.sessions.pop(session_id, None)
            if session is None:
                return False
            self.ended[session_id] = session
        session._set_state("shutting_down")
        stopper = threading.Thread(target=session.stop, daemon=True)
        stopper.start()
        if wait:
            stopper.join(60)
        return True

    def _watch(self) -> None:
        """Livy's heartbeat expiry, and the server's own lifetime limit."""
        while not self._stopped.wait(1.0):
            now = time.monotonic()
            with self._lock:
                expired = [
                    s.id
                    for s in self.sessions.values()
                    if s.heartbeat_timeout > 0 and now - s.last_activity > s.heartbeat_timeout
                ]
            for session_id in expired:
                self.delete_session(session_id)
            if now - self._started > self.max_lifetime:
                threading.Thread(target=self.stop, daemon=True).start()
                return

    def wait_for_ended(self, timeout: float = 60.0) -> None:
        """Wait until every deleted session's interpreter has exited (for tests)."""
        deadline = time.monotonic() + timeout
        for session in list(self.ended.values()):
            while session.state != "dead" and time.monotonic() < deadline:
                time.sleep(0.2)


_SESSION = re.compile(r"^/sessions/(\d+)(/.*)?$")
_STATEMENT = re.compile(r"^/statements/(\d+)(/cancel)?$")


def _handler_for(server: LivyServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib's signature
            pass

        def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw.strip() else {}

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            server.requests.append((method, url.path))
            try:
                self._dispatch(method, url.path.rstrip("/") or "/", query)
            except ValueError as error:
                self._reply(400, {"msg": str(error)})
            except Exception as error:  # a bug in the fixture: say so, like Livy's 500s
                self._reply(500, {"msg": f"{type(error).__name__}: {error}"})

        def _dispatch(self, method: str, path: str, query: dict) -> None:
            if path == "/sessions":
                if method == "GET":
                    with server._lock:
                        sessions = sorted(server.sessions.values(), key=lambda s: s.id)
                    start = int(query.get("from", 0))
                    size = int(query.get("size", 100))
                    return self._reply(
                        200,
                        {
                            "from": start,
                            "total": len(sessions),
                            "sessions": [
                                server.session_view(s) for s in sessions[start : start + size]
                            ],
                        },
                    )
                if method == "POST":
                    session = server.create_session(self._body())
                    location = {"Location": f"/sessions/{session.id}"}
                    return self._reply(201, server.session_view(session), location)
            match = _SESSION.match(path)
            if not match:
                return self._reply(404, {"msg": f"no route for {method} {path}"})
            session_id, rest = int(match.group(1)), match.group(2) or ""
            with server._lock:
                session = server.sessions.get(session_id)
            if session is None:
                return self._reply(404, {"msg": f"Session '{session_id}' not found."})
            session.touch()
            if rest == "" and method == "GET":
                return self._reply(200, server.session_view(session))
            if rest == "" and method == "DELETE":
                server.delete_session(session_id)
                return self._reply(200, {"msg": "deleted"})
            if rest == "/state" and method == "GET":
                return self._reply(200, {"id": session.id, "state": session.state})
            if rest == "/log" and method == "GET":
                lines = session.log_lines()
                start = int(query.get("from", max(0, len(lines) - 100)))
                size = int(query.get("size", 100))
                return self._reply(
                    200,
                    {
                        "id": session.id,
                        "from": start,
                        "total": len(lines),
                        "log": lines[start : start + size],
                    },
                )
            if rest == "/statements":
                if method == "POST":
                    body = self._body()
                    if "code" not in body:
                        raise ValueError("a statement needs 'code'")
                    if body.get("kind") not in (None, "pyspark"):
                        raise ValueError(f"unsupported statement kind {body['kind']!r}")
                    statement = session.submit(body["code"])
                    return self._reply(
                        201,
                        statement.view(),
                        {"Location": f"/sessions/{session.id}/statements/{statement.id}"},
                    )
                if method == "GET":
                    views = [s.view() for s in session.statements]
                    return self._reply(200, {"total_statements": len(views), "statements": views})
            statement_match = _STATEMENT.match(rest)
            if statement_match:
                index = int(statement_match.group(1))
                if index >= len(session.statements):
                    return self._reply(404, {"msg": "Statement not found"})
                statement = session.statements[index]
                if statement_match.group(2) and method == "POST":
                    session.cancel(statement)
                    return self._reply(200, {"msg": "canceled"})
                if not statement_match.group(2) and method == "GET":
                    return self._reply(200, statement.view())
            return self._reply(404, {"msg": f"no route for {method} {path}"})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._route("DELETE")

    return Handler


# -- the session interpreter (this file run with --repl) ---------------------------------

_TOP_FRAME = re.compile(r'\s*File "<stdin>".*in <module>')


class _Interpreter:
    """Livy's PySpark shell, re-implemented: one namespace, statements, magics."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace
        self.magics = {"matplot": self._matplot, "json": self._json}

    def execute(self, code: str) -> dict:
        stdout, stderr = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = stdout, stderr
        try:
            try:
                chunks = self._parse(code)
            except SyntaxError:
                return self._error(*sys.exc_info()[:2], None)
            result: dict | None = None
            for chunk in chunks:
                if isinstance(chunk, str):  # a magic line
                    result = self._magic(chunk)
                    if result.get("status") == "error":
                        return result
                else:
                    result = None
                    try:
                        self._run(chunk)
                    except BaseException:  # noqa: BLE001 - the user's error, reported to them
                        return self._error(*sys.exc_info())
        finally:
            sys.stdout, sys.stderr = saved
        data = dict(result or {})
        text = data.pop("text/plain", "") + stdout.getvalue() + stderr.getvalue()
        text = text.rstrip()
        if text or not data:
            data["text/plain"] = text
        return {"status": "ok", "data": data}

    @staticmethod
    def _parse(code: str) -> list:
        """Python AST modules, or (when ``%`` lines make it invalid) code and magic chunks."""
        try:
            return [ast.parse(code, "<stdin>")]
        except SyntaxError:
            pass
        chunks: list = []
        normal: list[str] = []
        for line in code.rstrip().split("\n"):
            if line.startswith("%"):
                if normal:
                    chunks.append(ast.parse("\n".join(normal), "<stdin>"))
                    normal = []
                chunks.append(line)
            else:
                normal.append(line)
        if normal:
            chunks.append(ast.parse("\n".join(normal), "<stdin>"))
        return chunks

    def _run(self, module: ast.Module) -> None:
        """All statements but the last in ``exec`` mode, the last in ``single`` mode, so a
        trailing expression's value is printed (``sys.displayhook``) as Livy does."""
        body = module.body
        for node in body[:-1]:
            exec(compile(ast.Module([node], []), "<stdin>", "exec"), self.namespace)
        for node in body[-1:]:
            exec(compile(ast.Interactive([node]), "<stdin>", "single"), self.namespace)

    def _magic(self, line: str) -> dict:
        name, _, argument = line[1:].partition(" ")
        handler = self.magics.get(name)
        if handler is None:
            return self._error(ValueError, ValueError(f"unknown magic command '{name}'"), None)
        try:
            return handler(argument.strip())
        except Exception:  # noqa: BLE001
            return self._error(*sys.exc_info())

    def _matplot(self, name: str) -> dict:
        figure = self.namespace[name].gcf()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": ""}

    def _json(self, name: str) -> dict:
        return {"application/json": self.namespace[name]}

    @staticmethod
    def _error(kind, value, tb) -> dict:
        lines = traceback.format_exception(kind, value, tb)
        for index, line in enumerate(lines):
            if _TOP_FRAME.match(line):  # drop this interpreter's own frames
                lines = lines[:1] + lines[index + 1 :]
                break
        return {
            "status": "error",
            "ename": kind.__name__,
            "evalue": str(value),
            "traceback": lines,
        }


def _repl_main() -> int:
    """Start Spark, answer ``READY`` with the application id, then serve statements."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the JVM and libraries writing to fd 1 go to the session log instead
    requests = sys.stdin
    sys.stdin = io.StringIO()
    settings = json.loads(os.environ[SESSION_ENV])
    parent = settings["parent"]

    def watch_parent() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(2.0)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        from pyspark.sql import SparkSession

        conf = {"spark.ui.enabled": "false", **settings["conf"]}
        master = conf.pop("spark.master", "local[2]")
        builder = SparkSession.builder.master(master).appName(
            conf.pop("spark.app.name", settings["name"])
        )
        if settings.get("driverMemory"):
            conf.setdefault("spark.driver.memory", settings["driverMemory"])
        for key, value in conf.items():
            builder = builder.config(key, str(value))
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("WARN")
    except Exception:  # noqa: BLE001 - reported in the session log; the session dies
        traceback.print_exc()
        protocol.write(json.dumps({"error": "Spark did not start"}) + "\n")
        return 1
    interpreter = _Interpreter({"spark": spark, "sc": spark.sparkContext})
    # SIGINT (a cancel) interrupts user code only: PySpark's handler, which cancels the
    # running Spark jobs and raises KeyboardInterrupt, is active while a statement runs.
    interrupt = signal.getsignal(signal.SIGINT)
    if not callable(interrupt):
        interrupt = signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    protocol.write(json.dumps({"appId": spark.sparkContext.applicationId}) + "\n")
    try:
        while True:
            line = requests.readline()
            if not line:
                break
            if not line.strip():
                continue
            reply = None
            try:
                signal.signal(signal.SIGINT, interrupt)
                try:
                    reply = interpreter.execute(json.loads(line)["code"])
                finally:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
            except KeyboardInterrupt:  # between the code's end and SIG_IGN
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                if reply is None:
                    reply = _Interpreter._error(KeyboardInterrupt, KeyboardInterrupt(), None)
            protocol.write(json.dumps(reply, default=str) + "\n")
    finally:
        spark.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python tests/livy_server.py`` serves until interrupted (handy by hand)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--repl"]:
        return _repl_main()
    with LivyServer() as server:
        print(f"Livy test server at {server.url} (Ctrl-C stops it)", flush=True)
        try:
            while not server._stopped.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
