"""Livy's REST API, as a run uses it: which TLS to trust, and the sessions it lists and
deletes (:mod:`imagepca.livy` prepares the run; the kernel talks to Livy itself).

Livy over HTTPS: from EMR 7.4, a cluster with in-transit encryption serves Livy over HTTPS
only, with the certificate of its security configuration (often self-signed); see
:class:`LivyTls`.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

# `imagepca run --kernel pysparkkernel` reads these when no option says otherwise.
CA_BUNDLE_ENV = "IMAGEPCA_LIVY_CA_BUNDLE"
INSECURE_ENV = "IMAGEPCA_LIVY_INSECURE"


class LivyUnavailable(RuntimeError):
    """Livy did not answer at the URL given; the message says how to reach it."""


@dataclass(frozen=True)
class LivyTls:
    """How to trust an ``https`` Livy: a CA bundle (PEM), or no verification at all.

    Validated at construction: a bundle must exist and either setting needs an
    ``https`` URL (see :meth:`check`).
    """

    ca_bundle: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.ca_bundle and self.insecure:
            raise ValueError("give --livy-ca-bundle or --livy-insecure, not both")
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise ValueError(f"--livy-ca-bundle {self.ca_bundle}: no such file (a PEM file)")

    def check(self, livy_url: str) -> None:
        if (self.ca_bundle or self.insecure) and not livy_url.startswith("https://"):
            raise ValueError(
                f"--livy-ca-bundle / --livy-insecure apply to an https:// Livy URL, not {livy_url}"
            )

    def context(self) -> ssl.SSLContext:
        """The SSL context of this module's REST calls."""
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self.ca_bundle)

    def kernel_env(self) -> dict[str, str]:
        """Environment of the kernel: ``requests`` (sparkmagic's client) reads the bundle here."""
        return {"REQUESTS_CA_BUNDLE": str(Path(self.ca_bundle).resolve())} if self.ca_bundle else {}

    def warn(self, livy_url: str) -> None:
        """The loud part of the opt-out."""
        if self.insecure:
            print(
                f"WARNING: TLS certificate verification for Livy at {livy_url} is OFF "
                "(--livy-insecure). Anyone between here and the cluster can read and change "
                "the code and data of this run. Use --livy-ca-bundle CERT.pem instead "
                "(docs/livy.md).",
                file=sys.stderr,
            )

    @classmethod
    def from_environment(cls) -> LivyTls:
        """``IMAGEPCA_LIVY_CA_BUNDLE`` / ``IMAGEPCA_LIVY_INSECURE=1`` (for ``imagepca run``)."""
        insecure = os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(os.environ.get(CA_BUNDLE_ENV) or None, insecure)


# -- Livy's REST API ---------------------------------------------------------------------


def _call(
    livy_url: str, method: str, path: str, timeout: float = 30.0, tls: LivyTls | None = None
) -> dict:
    request = Request(
        livy_url.rstrip("/") + path,
        method=method,
        headers={"Content-Type": "application/json", "X-Requested-By": "imagepca"},
    )
    context = (tls or LivyTls()).context() if livy_url.startswith("https://") else None
    with urlopen(request, timeout=timeout, context=context) as response:
        body = response.read()
    return json.loads(body) if body.strip() else {}


def _unavailable(livy_url: str, error: Exception) -> LivyUnavailable:
    reason = getattr(error, "reason", error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return LivyUnavailable(
            f"Livy at {livy_url} presents a certificate this machine does not trust "
            f"({reason.verify_message}). Pass --livy-ca-bundle CERT.pem with the certificate "
            "(or its CA) of the cluster's in-transit encryption, issued for localhost when "
            "you connect through an SSH tunnel (docs/livy.md); --livy-insecure skips the "
            "check, and anyone on the path can then read the session."
        )
    hint = ""
    if livy_url.startswith("http://"):
        hint = (
            " A cluster with in-transit encryption (EMR 7.4+) serves Livy over HTTPS only: "
            "use --livy-url https://localhost:8998 with --livy-ca-bundle."
        )
    return LivyUnavailable(
        f"Livy does not answer at {livy_url} ({error}). On EMR, open a tunnel to the "
        "primary node first: ssh -i KEY -N -L 8998:localhost:8998 hadoop@PRIMARY_DNS, "
        "then use --livy-url http://localhost:8998; the cluster needs the Livy "
        f"application and its security group must allow your SSH.{hint}"
    )


def list_sessions(livy_url: str, tls: LivyTls | None = None) -> list[dict]:
    """The live sessions (``GET /sessions``), as Livy's session objects.

    Raises
    ------
    LivyUnavailable
        When Livy does not answer, with the way to reach it.
    """
    sessions: list[dict] = []
    try:
        while True:
            page = _call(livy_url, "GET", f"/sessions?from={len(sessions)}&size=100", tls=tls)
            sessions.extend(page.get("sessions", []))
            if not page.get("sessions") or len(sessions) >= page.get("total", 0):
                return sessions
    except (URLError, OSError, ValueError) as error:
        raise _unavailable(livy_url, error) from None


def delete_session(livy_url: str, session_id: int, tls: LivyTls | None = None) -> bool:
    """``DELETE /sessions/{id}``; False when Livy no longer knows the session."""
    try:
        _call(livy_url, "DELETE", f"/sessions/{session_id}", tls=tls)
    except HTTPError as error:
        if error.code == 404:
            return False
        raise
    return True


def delete_run_sessions(
    livy_url: str,
    session_name: str,
    *,
    known_ids: set[int] | frozenset[int] = frozenset(),
    tls: LivyTls | None = None,
) -> list[int]:
    """Delete the live sessions this run created; returns their ids.

    A session is the run's when its name is ``session_name`` or starts with
    ``session_name-`` (see :func:`_kernel_main`). A Livy that does not report names
    (older than 0.6) falls back to the sessions absent from ``known_ids``, the ids listed
    before the run.
    """
    deleted = []
    for session in list_sessions(livy_url, tls):
        name = session.get("name")
        ours = (
            name == session_name or name.startswith(session_name + "-")
            if isinstance(name, str)
            else "name" not in session and session["id"] not in known_ids
        )
        live = session.get("state") not in ("dead", "killed", "success", "error")
        if ours and live and delete_session(livy_url, session["id"], tls):
            deleted.append(session["id"])
    return deleted
