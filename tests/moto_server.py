"""A moto server on 127.0.0.1 for the AWS tests: real HTTP, no AWS account, no network.

Import the fixtures explicitly in a test module::

    from moto_server import aws_env, moto_endpoint  # noqa: F401

``moto_endpoint`` starts one ``ThreadedMotoServer`` per test session on a free port and
stops it at the end. ``aws_env`` (per test) resets moto's state and points boto3 at the
server through ``AWS_ENDPOINT_URL`` with fake credentials set only for that test, so a
test can never reach AWS even if real credentials exist on the machine.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[str]:
    # AWS managed policies (AmazonEMRServicePolicy_v2) exist in moto only when asked for;
    # the server runs in this process, so the variable reaches it at the reset below.
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in fake.items():
        monkeypatch.setenv(name, value)
    yield moto_endpoint


def set_step_states(cluster_id: str, state: str = "COMPLETED", region: str = REGION) -> int:
    """Move the cluster's steps to ``state`` inside moto (steps never finish on their own).

    The server runs in this process, so its backend is reachable directly; this stands
    in for the step finishing on a real cluster. Returns how many steps were changed.
    """
    from moto.emr.models import emr_backends

    cluster = emr_backends[ACCOUNT_ID][region].clusters[cluster_id]
    for step in cluster.steps:
        step.state = state
    return len(cluster.steps)
