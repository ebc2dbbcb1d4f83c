"""Driver memory and time of a run's listing and accounting, without featurizing (issue 16).

    .venv/bin/python benchmarks/listing.py                    # 10^5 and 10^6 files
    .venv/bin/python benchmarks/listing.py --sizes 100000 --keep

What is measured. For n tiny files (100 bytes each, named ``*.jpg``, spread over 100 class
folders, plus a few zero-byte files; generated once under ``--root``, default
``/tmp/imagepca-listing``, reused if present, removed at the end unless ``--keep``), two ways
of getting a run's listing and doing the accounting the pipeline does, each in a fresh child
process (new local SparkSession: ``local[2]``, ``spark.driver.memory=4g``, UI off):

- ``folder``: ``inputs.list_folder(spark, root)``, then ``len(listing)``, ``listing.labels()``,
  ``imagepca.listing.fingerprint(listing.files, listing.n_files)`` and
  ``listing.unscanned(listing.files).count()``, which must equal the number of zero-byte
  files (Spark's file scan drops them; the pipeline reports them as rejected);
- ``manifest``: a CSV manifest (column ``path``) of the same files written beside them, then
  ``inputs.read_manifest(spark, manifest)`` and the same counts, labels and fingerprint (a
  manifest has no unscanned step: its files are read one by one by the executors).

Per case: wall seconds per step, the driver JVM's peak RSS (``VmHWM`` of the ``java`` child
of the Python driver, after start-up and after each step), the JVM heap still in use after a
full GC at the end of each step (what the listing *retains*, which RSS does not show: a JVM
keeps heap pages it has touched), and the Python driver's peak RSS.

Why. Spark's file index (``InMemoryFileIndex``) keeps one ``FileStatus`` per listed file in
the driver JVM for as long as the DataFrame lives, and every scan plans one
``PartitionedFile`` per file there: by design the folder way's driver memory grows with n.
A manifest is read like any table: its rows live in executor partitions, and the driver
holds only the plan. In neither way does Python hold the paths (one row per label reaches
it), so the Python driver's peak should not move with n.

Writes ``benchmarks/listing.json`` (with the CPU model, date and load average before and
after each case: the timings are only as quiet as the machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "listing.json"
CLASSES = 100
EMPTY_FILES = 7  # zero-byte files, one in each of the first classes
PAYLOAD = b"\xff\xd8\xff\xe0" + b"x" * 96  # 100 bytes; never decoded
MIB = 1 << 20
CHILD_TIMEOUT_S = 3600


# -- the files ------------------------------------------------------------------------------


def dataset(root: Path, n: int) -> dict:
    """n files (``EMPTY_FILES`` of them empty) under ``root/n<n>/images/c<k>/``, and
    ``root/n<n>/manifest.csv`` listing them all; made once, reused when complete."""
    base = root / f"n{n}"
    images, manifest, done = base / "images", base / "manifest.csv", base / "complete.json"
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("n") == n and info.get("empty") == EMPTY_FILES:
            return {**info, "reused": True}
    shutil.rmtree(base, ignore_errors=True)
    start = time.perf_counter()
    images.mkdir(parents=True)
    folders = [images / f"c{k:03d}" for k in range(CLASSES)]
    for folder in folders:
        folder.mkdir()
    with open(manifest, "w") as out:
        out.write("path\n")
        for i in range(n):
            path = f"{folders[i % CLASSES]}/img{i:07d}.jpg"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if i >= EMPTY_FILES:
                os.write(fd, PAYLOAD)
            os.close(fd)
            out.write(path + "\n")
    info = {
        "n": n,
        "empty": EMPTY_FILES,
        "classes": CLASSES,
        "bytes_per_file": len(PAYLOAD),
        "images": str(images),
        "manifest": str(manifest),
        "manifest_bytes": manifest.stat().st_size,
        "create_s": round(time.perf_counter() - start, 1),
    }
    done.write_text(json.dumps(info))
    return {**info, "reused": False}


# -- one case, in a child process -----------------------------------------------------------


def status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def jvm_pid() -> int:
    import psutil

    javas = [p for p in psutil.Process().children(recursive=True) if p.name() == "java"]
    if len(javas) != 1:
        raise RuntimeError(f"expected one java child, found {javas}")
    return javas[0].pid


def child(way: str, n: int, info: dict) -> dict:
    sys.path.insert(0, str(REPO / "lib"))
    from imagepca import inputs
    from imagepca.listing import fingerprint
    from imagepca.session import get_spark, stop_spark

    result: dict = {"way": way, "n": n, "steps_s": {}, "jvm_hwm_mib": {}, "jvm_heap_mib": {}}
    start = time.perf_counter()
    spark = get_spark("local[2]", driver_memory="4g", conf={"spark.ui.enabled": "false"})
    spark.range(1).count()  # the session's first job, so step 1 does not pay for it
    result["session_start_s"] = round(time.perf_counter() - start, 2)
    pid = jvm_pid()
    runtime = spark._jvm.java.lang.Runtime.getRuntime()

    def snapshot(name: str) -> None:
        result["jvm_hwm_mib"][name] = round(status_kib(pid, "VmHWM") / 1024, 1)
        spark._jvm.java.lang.System.gc()
        used = runtime.totalMemory() - runtime.freeMemory()
        result["jvm_heap_mib"][name] = round(used / MIB, 1)

    def step(name: str, fn):
        began = time.perf_counter()
        value = fn()
        result["steps_s"][name] = round(time.perf_counter() - began, 2)
        snapshot(name)
        return value

    snapshot("start")
    if way == "folder":
        listing = step("list", lambda: inputs.list_folder(spark, info["images"]))
    else:
        listing = step("list", lambda: inputs.read_manifest(spark, info["manifest"]))
    labels = step("count_labels", lambda: (len(listing), listing.labels()))
    result["n_files"], result["n_labels"] = labels[0], len(labels[1])
    result["labelled_rows"] = sum(labels[1].values())
    result["fingerprint"] = step("fingerprint", lambda: fingerprint(listing.files, listing.n_files))
    if way == "folder":
        result["unscanned"] = step("unscanned", lambda: listing.unscanned(listing.files).count())
    checks = {"n_files": result["n_files"] == n, "labels": result["n_labels"] == CLASSES}
    if way == "folder":
        checks["unscanned_is_empty_files"] = result["unscanned"] == EMPTY_FILES
        checks["labelled_rows_scanned"] = result["labelled_rows"] == n - EMPTY_FILES
    else:
        checks["labelled_rows"] = result["labelled_rows"] == n
    result["checks"] = checks
    result["total_s"] = round(sum(result["steps_s"].values()), 2)
    result["jvm_peak_rss_mib"] = result["jvm_hwm_mib"][list(result["steps_s"])[-1]]
    result["jvm_max_heap_mib"] = round(runtime.maxMemory() / MIB, 1)
    listing.release()
    stop_spark()
    result["python_peak_rss_mib"] = round(status_kib("self", "VmHWM") / 1024, 1)
    return result


def run_case(way: str, n: int, info: dict) -> dict:
    command = [sys.executable, __file__, "--child", way, json.dumps(info)]
    load_before = [round(x, 2) for x in os.getloadavg()]
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=REPO
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as timeout:
        rc, out, err = "timeout", timeout.stdout or "", timeout.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    wall = round(time.perf_counter() - began, 1)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if rc == 0 and lines:
        result = json.loads(lines[-1])
    else:
        tail = [line for line in err.splitlines() if line.strip()][-25:]
        result = {"way": way, "n": n, "error": {"returncode": rc, "stderr_tail": tail}}
    result["child_wall_s"] = wall
    result["load_before"] = load_before
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


# -- the report -----------------------------------------------------------------------------


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def table(cases: list[dict]) -> str:
    head = (
        "| way | files | list s | count+labels s | fingerprint s | unscanned s | total s "
        "| JVM peak RSS MiB (start -> end) | JVM heap after GC MiB (start -> max) "
        "| Python peak RSS MiB | load before/after |"
    )
    rows = [head, "|" + "---|" * 11]
    for case in cases:
        if "error" in case:
            rows.append(
                f"| {case['way']} | {case['n']:,} | failed: {case['error']['returncode']} "
                f"({(case['error']['stderr_tail'] or [''])[-1][:80]}) | | | | | | | | |"
            )
            continue
        steps, hwm, heap = case["steps_s"], case["jvm_hwm_mib"], case["jvm_heap_mib"]
        rows.append(
            f"| {case['way']} | {case['n_files']:,} | {steps['list']} | {steps['count_labels']} "
            f"| {steps['fingerprint']} | {steps.get('unscanned', '-')} | {case['total_s']} "
            f"| {hwm['start']:.0f} -> {case['jvm_peak_rss_mib']:.0f} "
            f"| {heap['start']:.0f} -> {max(heap.values()):.0f} "
            f"| {case['python_peak_rss_mib']:.0f} "
            f"| {case['load_before'][0]} / {case['load_after'][0]} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--ways", nargs="+", default=["folder", "manifest"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/imagepca-listing"))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        info = json.loads(args.child[1])
        print(json.dumps(child(args.child[0], info["n"], info)), flush=True)
        return

    report = {
        "what": "listing + accounting without featurizing, one fresh local[2] session per case",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "spark": {"master": "local[2]", "driver_memory": "4g", "ui": False},
        "datasets": {},
        "cases": [],
    }
    for n in args.sizes:
        print(f"files: {n:,} under {args.root}/n{n} ...", flush=True)
        info = dataset(args.root, n)
        report["datasets"][str(n)] = info
        print(f"  {'reused' if info['reused'] else 'created'} ({info['create_s']} s)", flush=True)
        for way in args.ways:
            print(f"  {way} ...", flush=True)
            case = run_case(way, n, info)
            report["cases"].append(case)
            print(f"    {json.dumps(case)[:400]}", flush=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")  # partial results too
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    print(f"\n{report['cpu_model']}, {report['cpus']} CPUs, {report['date']}, "
          f"load {report['load_start']} -> {report['load_end']}\n")  # fmt: skip
    print(table(report["cases"]))


if __name__ == "__main__":
    main()
