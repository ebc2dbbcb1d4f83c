"""Processes the tests start in a group of their own stop by themselves.

Spark's standalone daemons, driver scripts and JupyterLab run in their own session, so a
test can kill each with its children; fixtures stop them at the end. :func:`watch_group`
covers the end that never comes (pytest killed by a CI timeout, a crash): a small detached
process ends the group once the test process is gone or ``max_lifetime`` has passed, and
exits by itself when the group has ended.
"""

from __future__ import annotations

import os
import subprocess
import sys

WATCHDOG = r"""
import os, signal, sys, time
parent, group, lifetime = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + lifetime


def group_alive():
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# Reparented away from the test process: it has ended.
while group_alive() and os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(1)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        sys.exit(0)
    for _ in range(50):
        if not group_alive():
            sys.exit(0)
        time.sleep(0.1)
"""


def watch_group(pgid: int, max_lifetime: float) -> subprocess.Popen:
    """End process group ``pgid`` when this process ends or after ``max_lifetime`` s."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(pgid), str(max_lifetime)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
