"""The watchdog that ends the servers tests start in their own process group (Spark
daemons, JupyterLab, driver scripts) when nothing else does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from group_watch import watch_group

TESTS = os.path.dirname(os.path.abspath(__file__))


def group_ends_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_group_outliving_its_lifetime_is_ended():
    server = subprocess.Popen(["sleep", "600"], start_new_session=True)
    watch = watch_group(server.pid, max_lifetime=1)
    server.wait(timeout=15)  # reaped here, so the group can end
    assert server.returncode == -signal.SIGTERM
    assert watch.wait(timeout=15) == 0


def test_a_group_is_ended_when_the_test_process_dies():
    """pytest killed (a CI timeout): the server it started in its own session ends too."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"sys.path.insert(0, {TESTS!r})\n"
            "from group_watch import watch_group\n"
            "server = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            "watch_group(server.pid, max_lifetime=600)\n"
            "print(server.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert group_ends_within(server, 15)


def test_the_watchdog_exits_once_the_group_has_ended():
    server = subprocess.Popen(["sleep", "600"], start_new_session=True)
    watch = watch_group(server.pid, max_lifetime=600)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    assert watch.wait(timeout=15) == 0
