"""``imagepca emr status``: a cluster and its runs at a glance.

After ``emr up``, or ``emr run --no-wait``, the terminal that waited may be gone. This says
whether the cluster is still up (and billed), and for each ``imagepca run`` step its state,
the output it writes and whether that output is complete (its ``_SUCCESS``), or where the
log of a step that failed is.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any, TextIO

from .runs import STEP_ENDED, s3_exists, step_logs

# Cluster states in which EMR bills the instances (EMR API reference, ``ClusterState``).
BILLED_STATES = ("STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING", "TERMINATING")
MAX_STEPS = 10  # the newest steps shown; EMR keeps every step of a cluster


def cluster_status(
    cluster_id: str,
    *,
    emr_client: Any,
    s3_client: Any,
    log_bucket: str | None = None,
    out: TextIO | None = None,
) -> str:
    """Print the cluster's state and its newest steps; return the cluster's state."""
    out = out or sys.stdout
    cluster = emr_client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    status = cluster["Status"]
    state = status["State"]
    reason = status.get("StateChangeReason", {}).get("Message")
    line = f"{cluster_id} ({cluster.get('Name', '')}): {state}"
    print(
        line + (f": {reason}" if reason and state not in ("RUNNING", "WAITING") else ""), file=out
    )
    if state in BILLED_STATES:
        since = _when(status.get("Timeline", {}).get("CreationDateTime"))
        print(
            f"  billed since {since}: stop it with `imagepca emr down --cluster-id {cluster_id}`",
            file=out,
        )
        if cluster.get("MasterPublicDnsName"):
            print(f"  primary node: {cluster['MasterPublicDnsName']}", file=out)
    # One page, newest first (50 steps); a marker says there are more, which are not counted:
    # a cluster's thousands of steps would cost a request per 50.
    page = emr_client.list_steps(ClusterId=cluster_id)
    steps, more_pages = page.get("Steps", []), bool(page.get("Marker"))
    if not steps:
        print("  no steps: `imagepca emr run --cluster-id ...` adds one per run", file=out)
    for step in steps[:MAX_STEPS]:
        print("  " + _step_line(cluster_id, step, s3_client, log_bucket), file=out)
    older = max(len(steps) - MAX_STEPS, 0)
    if older or more_pages:
        count = f"more than {older}" if more_pages else str(older)
        print(f"  ... and {count} older steps (aws emr list-steps)", file=out)
    return state


def _step_line(cluster_id: str, step: dict, s3_client: Any, log_bucket: str | None) -> str:
    step_status = step["Status"]
    state, timeline = step_status["State"], step_status.get("Timeline", {})
    line = f"{step['Id']} {step.get('Name', '')}: {state}"
    if timeline.get("StartDateTime"):
        line += f", started {_when(timeline['StartDateTime'])}"
    if timeline.get("EndDateTime"):
        line += f", ended {_when(timeline['EndDateTime'])}"
    args = step.get("Config", {}).get("Args", [])
    output = args[args.index("--output") + 1] if "--output" in args[:-1] else None
    if output and state == "COMPLETED":
        complete = s3_exists(s3_client, output.rstrip("/") + "/_SUCCESS")
        line += f"; {output}: " + ("complete" if complete else "no _SUCCESS, not complete")
    elif output:
        line += f"; output {output}"
    if state in STEP_ENDED and state != "COMPLETED":
        details = step_status.get("FailureDetails", {})
        logs = step_logs(cluster_id, step["Id"], details, log_bucket)
        why = " ".join(filter(None, (details.get("Reason"), details.get("Message"))))
        line += (f" ({why})" if why else "") + (f"; logs: {logs}" if logs else "")
    return line


def _when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "an unknown time"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
