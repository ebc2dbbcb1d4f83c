"""Featurization throughput, side by side, on this machine's cores and the shared images.

One command runs every measurement of issue 9 and writes one JSON file::

    .venv/bin/python benchmarks/featurize.py --limit 600 --out benchmarks/results-quick.json
    .venv/bin/python benchmarks/featurize.py --out benchmarks/results.json   # full sets

Every measurement runs in its own child process (its own JVM for Spark runs) so that
environment variables read at TensorFlow import (``TF_ENABLE_ONEDNN_OPTS``), thread pools and
memory peaks of one configuration cannot leak into the next. Spark start-up is excluded
(a session is built and warmed up with a trivial job before the clock starts); model
loading is excluded from the raw single-process runs (as the issue asks) and included in
the Spark runs (broadcast, per-worker model build, cached TFLite flatbuffer load).

The host is shared: ``uptime`` load averages are recorded before and after each
measurement and must be read alongside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEPCA_SHARED", REPO.parent / "shared")).resolve()
WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DATASETS = {
    "fruit360": SHARED / "datasets" / "fruit360-shapes",
    "photos": SHARED / "datasets" / "fruit-photos",
}
NN_CLASSES = ("apple", "banana", "orange")
MOBILENETV2_FLOP_224 = 600e6  # ~300 M multiply-adds per 224x224 image
SECTIONS = ("machine", "raw", "levers", "common", "pipeline", "decode", "scaling", "sizes", "pca")


# -- helpers shared by parent and children -----------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN kernels (its own, private check)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def list_files(root: Path) -> list[Path]:
    from imagepca.images import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def subset(files: list[Path], limit: int | None) -> list[Path]:
    """Evenly spaced files of the sorted listing, so every class keeps its share."""
    if not limit or limit >= len(files):
        return files
    index = np.unique(np.linspace(0, len(files) - 1, limit).round().astype(int))
    return [files[i] for i in index]


class MemorySampler:
    """Peak RSS and CPU time of this process's descendants, sampled every 0.1 s (psutil).

    CPU seconds (user + system, this process plus every descendant, counted from when the
    sampler starts) make a load-independent efficiency measure on a shared host: under an
    oversubscribed CPU the scheduler shares time per runnable thread, so wall-clock
    throughput favours configurations that simply run more threads.

    Python workers are recognised by ``pyspark.daemon`` in their command line (the daemon
    forks them); the largest worker RSS is what an executor's ``memoryOverhead`` must hold
    per concurrently running task.
    """

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.peak_total_workers = 0
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.self_cpu0 = sum(self.process.cpu_times()[:2])
        for child in self.process.children(recursive=True):
            try:
                self.cpu_first[child.pid] = sum(child.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for child in self.process.children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                    rss = child.memory_info().rss
                    self.cpu_last[child.pid] = sum(child.cpu_times()[:2])
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                kind = (
                    "python_worker"
                    if "pyspark.daemon" in cmd
                    else ("jvm" if "java" in cmd else "other")
                )
                if kind == "python_worker":
                    total += rss
                if rss > self.peaks.get(child.pid, ("", 0))[1]:
                    self.peaks[child.pid] = (kind, rss)
            self.peak_total_workers = max(self.peak_total_workers, total)
            self._stop.wait(0.1)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        mib = 1 << 20
        workers = [rss for kind, rss in self.peaks.values() if kind == "python_worker"]
        jvm = [rss for kind, rss in self.peaks.values() if kind == "jvm"]
        cpu = sum(self.process.cpu_times()[:2]) - self.self_cpu0
        cpu += sum(last - self.cpu_first.get(pid, 0.0) for pid, last in self.cpu_last.items())
        return {
            "cpu_s": round(cpu, 2),
            "peak_python_worker_rss_mib": round(max(workers, default=0) / mib, 1),
            "python_workers_seen": len(workers),
            "peak_python_workers_total_mib": round(self.peak_total_workers / mib, 1),
            "peak_jvm_rss_mib": round(max(jvm, default=0) / mib, 1),
        }


# -- child: raw single-process featurization ---------------------------------------------


def child_raw(job: dict) -> dict:
    """Decode + model in one Python process, files read from disk, model load excluded."""
    engine, threads, batch = job["engine"], job["threads"], job["batch"]
    size, fast = job["image_size"], job["fast_decode"]
    files = [Path(p) for p in job["files"]]
    from imagepca.images import decode_image

    load_start = time.perf_counter()
    if engine == "keras":
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        from imagepca.features import build_keras_model

        model = build_keras_model(size, WEIGHTS)
        model.predict_on_batch(np.zeros((batch, size, size, 3), np.float32))

        def run(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict_on_batch(pixels))

    else:
        from ai_edge_litert.interpreter import Interpreter

        from imagepca.features import tflite_model

        interpreter = Interpreter(
            model_content=tflite_model(WEIGHTS, size), num_threads=threads or 1
        )
        input_index = interpreter.get_input_details()[0]["index"]
        output_index = interpreter.get_output_details()[0]["index"]
        interpreter.resize_tensor_input(input_index, [batch, size, size, 3])
        interpreter.allocate_tensors()

        def run(pixels: np.ndarray) -> np.ndarray:
            out = []
            for start in range(0, len(pixels), batch):
                chunk = pixels[start : start + batch]
                if len(chunk) < batch:  # last partial batch: pad, then drop the padding
                    pad = np.zeros((batch - len(chunk), size, size, 3), np.float32)
                    chunk = np.concatenate([chunk, pad])
                interpreter.set_tensor(input_index, chunk)
                interpreter.invoke()
                out.append(interpreter.get_tensor(output_index).copy())
            return np.concatenate(out)[: len(pixels)]

        run(np.zeros((batch, size, size, 3), np.float32))
    load_s = time.perf_counter() - load_start

    outer = 64  # decode this many, then run them through the model
    features = []
    decode_s = 0.0
    cpu0 = sum(os.times()[:2])
    start = time.perf_counter()
    for first in range(0, len(files), outer):
        t0 = time.perf_counter()
        pixels = np.stack(
            [
                decode_image(path.read_bytes(), size, fast_decode=fast)
                for path in files[first : first + outer]
            ]
        ).astype(np.float32)
        decode_s += time.perf_counter() - t0
        features.append(run(pixels))
    seconds = time.perf_counter() - start
    cpu_s = sum(os.times()[:2]) - cpu0
    features = np.concatenate(features)
    if job.get("save"):
        np.save(job["save"], features)
    import resource

    return {
        "images": len(files),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(files) / seconds, 2),
        "decode_s": round(decode_s, 3),
        "model_load_s_excluded": round(load_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_s": round(cpu_s, 2),
        "images_per_cpu_s": round(len(files) / cpu_s, 2),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "onednn_enabled": onednn_enabled() if engine == "keras" else None,
    }


# -- child: Spark runs (common pattern, pipeline) ----------------------------------------


def common_pattern(spark, input_dir: str, output: str, image_size: int) -> None:
    """The widely published pattern (Databricks' "Featurization for transfer learning"
    notebook): broadcast the Keras weights, a Scalar-Iterator pandas UDF that rebuilds the
    model per task and calls ``model.predict`` on every Arrow batch (1024 rows),
    ``repartition(16)``, write Parquet. Decoding uses :func:`imagepca.images.decode_image`
    so both sides decode identically (the notebook's bare ``Image.open().resize()`` fails on
    the grayscale Fruits-360 files).
    """
    from pyspark.sql import functions as F

    from imagepca.features import build_keras_model
    from imagepca.images import decode_image

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
    weights = spark.sparkContext.broadcast(build_keras_model(image_size, WEIGHTS).get_weights())

    @F.pandas_udf("array<float>")
    def featurize_udf(content_series_iter: Iterator[pd.Series]) -> Iterator[pd.Series]:
        model = build_keras_model(image_size, None)
        model.set_weights(weights.value)
        for content_series in content_series_iter:
            pixels = np.stack([decode_image(c, image_size) for c in content_series]).astype(
                np.float32
            )
            preds = model.predict(pixels, verbose=0)
            yield pd.Series(list(preds))

    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(input_dir)
    images.repartition(16).select(
        F.col("path"), featurize_udf("content").alias("features")
    ).write.mode("overwrite").parquet(output)


def child_spark(job: dict) -> dict:
    from imagepca.session import get_spark

    spark = get_spark(
        job["master"],
        driver_memory=job.get("driver_memory", "2g"),
        conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
    )
    spark.range(1000).selectExpr("sum(id)").collect()  # warm the JVM before the clock
    n = len(list_files(Path(job["input"])))
    result: dict = {"images": n, "master": job["master"]}
    with MemorySampler() as memory:
        start = time.perf_counter()
        if job["mode"] == "common":
            common_pattern(spark, job["input"], job["output"], job["image_size"])
            result["onednn_enabled_driver"] = onednn_enabled()
        else:
            from imagepca.config import ExtractParams
            from imagepca.pipeline import extract_features

            params = ExtractParams(
                input=job["input"],
                output=job["output"],
                weights=str(WEIGHTS),
                engine=job["engine"],
                image_size=job["image_size"],
                fast_decode=job["fast_decode"],
            )
            extraction = extract_features(spark, params)
            result["timings_s"] = extraction.metadata["timings_s"]
            result["n_images"] = extraction.n_images
            result["n_rejected"] = extraction.n_rejected
        seconds = time.perf_counter() - start
    result.update(seconds=round(seconds, 3), images_per_s=round(n / seconds, 2), **memory.summary())
    result["images_per_cpu_s"] = round(n / max(result["cpu_s"], 1e-9), 2)
    spark.stop()
    return result


# -- child: PCA fit ----------------------------------------------------------------------


def child_pca(job: dict) -> dict:
    """fit_pca on synthetic 1280-d rows: 64 latent factors + noise, generated in Spark."""
    from imagepca.reduction import fit_pca
    from imagepca.session import get_spark

    spark = get_spark(
        job["master"],
        driver_memory=job.get("driver_memory", "6g"),
        conf={"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"},
    )
    dim = 1280

    def generate(batches):
        for frame in batches:
            rng = np.random.default_rng(int(frame["id"].iloc[0]))
            mixing = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
            latent = rng.standard_normal((len(frame), 64)).astype(np.float32)
            rows = latent @ mixing + 0.5 * rng.standard_normal((len(frame), dim)).astype(np.float32)
            yield pd.DataFrame(
                {"path": frame["id"].astype(str), "label": "x", "features": list(rows)}
            )

    out = {}
    for rows in job["rows"]:
        data = (
            spark.range(rows, numPartitions=max(2, rows // 5000))
            .mapInPandas(generate, "path string, label string, features array<float>")
            .persist()
        )
        data.count()
        start = time.perf_counter()
        fit = fit_pca(data, k=None, variance=0.95)
        seconds = time.perf_counter() - start
        data.unpersist()
        out[str(rows)] = {"fit_s": round(seconds, 2), "k_at_95pct": fit.k}
    spark.stop()
    return out


def child_convert(job: dict) -> dict:
    """Convert (or load from the cache) the TFLite flatbuffer for every size asked."""
    from imagepca.features import tflite_model

    out = {}
    for size in job["sizes"]:
        start = time.perf_counter()
        tflite_model(WEIGHTS, size)
        out[str(size)] = round(time.perf_counter() - start, 2)
    return out


CHILDREN = {"raw": child_raw, "spark": child_spark, "pca": child_pca, "convert": child_convert}


# -- parent ------------------------------------------------------------------------------


class Bench:
    def __init__(self, workdir: Path, cache: Path, log) -> None:
        self.workdir = workdir
        self.cache = cache
        self.log = log

    def child(self, job: dict, *, onednn: str | None = None) -> dict:
        """Run one job in a fresh interpreter; ``onednn`` None leaves TF/lib defaults."""
        env = dict(os.environ)
        env.update(
            IMAGEPCA_CACHE=str(self.cache),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYSPARK_PYTHON=sys.executable,
            PYSPARK_DRIVER_PYTHON=sys.executable,
            SPARK_LOCAL_IP="127.0.0.1",
        )
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
        if onednn is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = onednn
        spec = self.workdir / f"job-{time.monotonic_ns()}.json"
        spec.write_text(json.dumps(job))
        before = load_average()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(spec)],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"child {job['kind']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        result = json.loads(lines[-1][len("RESULT ") :])
        result["load_before_after"] = [before, load_average()]
        return result


def stage_input(files: list[Path], root: Path, target: Path, full: bool) -> Path:
    """The full set is read in place; a subset is copied (class folders kept) to a temp dir."""
    if full:
        return root
    if target.exists():
        shutil.rmtree(target)
    for path in files:
        dest = target / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return target


def stage_copies(files: list[Path], root: Path, target: Path, copies: int) -> Path:
    """Each file ``copies`` times under its class folder, as ``name-cN.ext``."""
    if target.exists():
        shutil.rmtree(target)
    for path in files:
        dest = target / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            shutil.copyfile(path, dest.with_name(f"{dest.stem}-c{copy}{dest.suffix}"))
    return target


def machine_info() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {}
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "fma", "sse4", "amx"))]
    import psutil

    from imagepca.run_record import library_versions

    return {
        "cpu_model": fields.get("Model name"),
        "cpu_family_model": f"{fields.get('CPU family')}/{fields.get('Model')}",
        "cpus": os.cpu_count(),
        "threads_per_core": fields.get("Thread(s) per core"),
        "hypervisor": fields.get("Hypervisor vendor"),
        "l2_l3": [fields.get("L2 cache"), fields.get("L3 cache")],
        "simd_flags": simd,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "versions": library_versions(),
        # numpy's BLAS kernels, which a machine's environment can choose instead of OpenBLAS
        # (this sandbox sets OPENBLAS_CORETYPE=Haswell on CPUs with AVX-512 kernels).
        "blas": {
            "kernels": sorted(
                {
                    str(pool.get("architecture"))
                    for pool in threadpool_info()
                    if pool["user_api"] == "blas"
                }
            ),
            "environment": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
        },
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def read_features(output: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(output / "features", columns=["path", "features"]).to_pydict()
    return {
        p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1]: np.asarray(f, np.float32)
        for p, f in zip(table["path"], table["features"], strict=True)
    }


def nearest_neighbour(features: np.ndarray, labels: np.ndarray) -> dict:
    """1-NN (cosine) accuracy: a stratified half/half held-out split, plus leave-one-out."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        test[where[1::2]] = True
    sims = unit[test] @ unit[~test].T
    held_out = float((labels[~test][sims.argmax(1)] == labels[test]).mean())
    all_sims = unit @ unit.T
    np.fill_diagonal(all_sims, -np.inf)
    loo = float((labels[all_sims.argmax(1)] == labels).mean())
    return {
        "held_out_accuracy": round(held_out, 4),
        "train_test": [int((~test).sum()), int(test.sum())],
        "leave_one_out_accuracy": round(loo, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="images per dataset (default: all)")
    parser.add_argument("--lever-limit", type=int, default=1500, help="images for levers")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=",".join(SECTIONS))
    parser.add_argument("--pca-rows", default="10000,100000")
    parser.add_argument(
        "--photo-copies",
        type=int,
        default=10,
        help="also measure the photos copied this many times (distinct files), 0 to skip",
    )
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(Path(args.child).read_text())
        if job.get("cpus"):  # inherited by the Spark JVM and its Python workers
            os.sched_setaffinity(0, set(job["cpus"]))
        print("RESULT " + json.dumps(CHILDREN[job["kind"]](job)), flush=True)
        return 0

    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imagepca-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "limit": args.limit,
    }

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {message}", flush=True)

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=2))

    bench = Bench(workdir, workdir / "cache", log)
    files = {name: subset(list_files(root), args.limit) for name, root in DATASETS.items()}
    full = args.limit is None
    inputs = {
        name: stage_input(files[name], DATASETS[name], workdir / "input" / name, full)
        for name in DATASETS
    }
    if args.photo_copies > 1:
        # 240 photos are too few to amortize a Spark run's fixed cost; the same photos as
        # many distinct files show the steady state where decoding large JPEGs matters.
        many = f"photos_x{args.photo_copies}"
        inputs[many] = stage_copies(
            files["photos"], DATASETS["photos"], workdir / "input" / many, args.photo_copies
        )
        files[many] = list_files(inputs[many])
    results["images"] = {name: len(f) for name, f in files.items()}
    cores = os.cpu_count() or 1
    master = f"local[{cores}]"

    def record(key: str, value) -> None:
        results[key] = value
        save()

    try:
        results["machine"] = machine_info()
        log(f"machine: {results['machine']['cpu_model']}, {cores} cpus; images {results['images']}")
        conversions = bench.child({"kind": "convert", "sizes": [224, 160, 128]})
        record("tflite_conversion_s", conversions)
        log(f"TFLite conversion (one-off, cached afterwards): {conversions}")

        def raw(
            name,
            engine,
            *,
            onednn=None,
            threads=0,
            batch=64,
            size=224,
            fast=False,
            file_list=None,
            save=None,
        ):
            job = dict(
                kind="raw",
                engine=engine,
                threads=threads,
                batch=batch,
                image_size=size,
                fast_decode=fast,
                files=[str(p) for p in (file_list or files[name])],
                save=save,
            )
            return bench.child(job, onednn=onednn)

        def pipeline(
            name, engine="tflite", *, master=master, size=224, fast=False, tag="", cpus=None
        ):
            output = workdir / "out" / f"{name}-{engine}-{size}-{fast}-{master}{cpus}{tag}"
            job = dict(
                kind="spark",
                mode="pipeline",
                master=master,
                input=str(inputs[name]),
                output=str(output),
                engine=engine,
                image_size=size,
                fast_decode=fast,
                cpus=cpus,
            )
            result = bench.child(job)
            result["output"] = str(output)
            return result

        # "Default settings" is whatever TensorFlow does with TF_ENABLE_ONEDNN_OPTS unset:
        # it turns oneDNN on for some CPUs (AVX-512 VNNI/BF16, AMX) and not for others, so
        # each baseline runs as the default and again with oneDNN forced off (the issue's
        # table measured "default" = off on a CPU without AVX-512).
        baselines = {"": None, "_onednn_off": "0"}
        if "raw" in sections:
            for suffix, onednn in baselines.items():
                results[f"raw_baseline{suffix}"] = {}
                for name in inputs:
                    r = raw(name, "keras", onednn=onednn, batch=64)
                    results[f"raw_baseline{suffix}"][name] = r
                    save()
                    log(
                        f"raw baseline{suffix} {name}: {r['images_per_s']} img/s "
                        f"(oneDNN {r['onednn_enabled']})"
                    )
        if "common" in sections:
            for suffix, onednn in baselines.items():
                results[f"common_pattern{suffix}"] = {}
                for name in inputs:
                    job = dict(
                        kind="spark",
                        mode="common",
                        master=master,
                        input=str(inputs[name]),
                        output=str(workdir / "out" / f"common-{name}{suffix}"),
                        image_size=224,
                    )
                    r = bench.child(job, onednn=onednn)
                    results[f"common_pattern{suffix}"][name] = r
                    save()
                    log(f"common pattern{suffix} {name}: {r['images_per_s']} img/s")
        if "pipeline" in sections:
            results["pipeline"] = {}
            for name in inputs:
                # The keras engine is the reference, not a contender: the shared sets suffice.
                for engine in ("tflite", "keras") if name in DATASETS else ("tflite",):
                    r = pipeline(name, engine)
                    results["pipeline"][f"{name}/{engine}"] = r
                    save()
                    log(
                        f"pipeline {name} {engine}: {r['images_per_s']} img/s "
                        f"(worker peak {r['peak_python_worker_rss_mib']} MiB)"
                    )
        if "decode" in sections:
            default = results.get("pipeline", {}).get("photos/tflite") or pipeline("photos")
            fast = pipeline("photos", fast=True)
            a, b = read_features(Path(default["output"])), read_features(Path(fast["output"]))
            cos = cosine_rows(np.stack([a[k] for k in a]), np.stack([b[k] for k in a]))
            rd = raw("photos", "tflite", threads=1, batch=1)
            rf = raw("photos", "tflite", threads=1, batch=1, fast=True)
            record(
                "fast_decode",
                {
                    "pipeline_default": default["images_per_s"],
                    "pipeline_fast": fast["images_per_s"],
                    "pipeline": fast,
                    "raw_1core_default": rd,
                    "raw_1core_fast": rf,
                    "cosine_vs_default": {
                        "mean": round(float(cos.mean()), 5),
                        "min": round(float(cos.min()), 5),
                    },
                },
            )
            log(
                f"fast_decode photos: {default['images_per_s']} -> {fast['images_per_s']} img/s,"
                f" cosine mean {cos.mean():.5f} min {cos.min():.5f}"
            )
        if "scaling" in sections:
            # Cores, not task slots: the 1-core run is pinned to one CPU with everything it
            # starts (driver, JVM, Python workers); local[1] on an unpinned 2-CPU machine
            # would get the JVM's share of the work done on the second CPU for free.
            two = results.get("pipeline", {}).get("fruit360/tflite") or pipeline("fruit360")
            one = pipeline("fruit360", master="local[1]", cpus=[0])
            slot = pipeline("fruit360", master="local[1]")
            record(
                "scaling",
                {
                    "1 core: local[1] pinned to 1 CPU": one,
                    "2 cores: local[2]": two,
                    "local[1] unpinned (1 task slot, 2 CPUs)": slot,
                    "speedup": round(two["images_per_s"] / one["images_per_s"], 2),
                },
            )
            log(
                f"scaling: 1 core {one['images_per_s']}, 2 cores {two['images_per_s']} "
                f"(local[1] unpinned {slot['images_per_s']})"
            )
        if "levers" in sections:
            lever_files = subset(files["fruit360"], args.lever_limit)
            variants = [
                ("keras TF default (onednn unset) tf-default-threads b64", "keras", None, 0, 64),
                ("keras onednn=0 tf-default-threads b64", "keras", "0", 0, 64),
                ("keras onednn=1 tf-default-threads b64", "keras", "1", 0, 64),
                ("keras onednn=1 1 thread b64", "keras", "1", 1, 64),
                ("tflite 1 thread b1", "tflite", None, 1, 1),
                ("tflite 1 thread b8", "tflite", None, 1, 8),
                ("tflite 2 threads b1", "tflite", None, 2, 1),
                ("tflite 2 threads b32", "tflite", None, 2, 32),
            ]
            results["levers"] = {"images": len(lever_files), "dataset": "fruit360", "runs": {}}
            for label, engine, onednn, threads, batch in variants:
                r = raw(
                    "fruit360",
                    engine,
                    onednn=onednn,
                    threads=threads,
                    batch=batch,
                    file_list=lever_files,
                )
                results["levers"]["runs"][label] = r
                save()
                log(f"lever {label}: {r['images_per_s']} img/s")
        if "sizes" in sections:
            nn_files = [p for p in list_files(DATASETS["photos"]) if p.parent.name in NN_CLASSES]
            labels = np.array([p.parent.name for p in nn_files])
            results["sizes"] = {}
            for size in (224, 160, 128):
                thr = (
                    pipeline("fruit360", size=size)
                    if size != 224
                    else (
                        results.get("pipeline", {}).get("fruit360/tflite") or pipeline("fruit360")
                    )
                )
                saved = workdir / f"nn-{size}.npy"
                r1 = raw(
                    "photos",
                    "tflite",
                    threads=1,
                    batch=1,
                    size=size,
                    file_list=nn_files,
                    save=str(saved),
                )
                nn = nearest_neighbour(np.load(saved), labels)
                results["sizes"][str(size)] = {
                    "pipeline_fruit360_images_per_s": thr["images_per_s"],
                    "raw_1core_photos_images_per_s": r1["images_per_s"],
                    "nn_photos": nn,
                }
                save()
                log(f"size {size}: {thr['images_per_s']} img/s, 1-NN {nn}")
        if "pca" in sections:
            rows = [int(x) for x in args.pca_rows.split(",")]
            r = bench.child({"kind": "pca", "master": master, "rows": rows})
            record("pca", r)
            log(f"PCA fit: {r}")
    finally:
        results["uptime_after"] = subprocess.run(
            ["uptime"], capture_output=True, text=True
        ).stdout.strip()
        results["ratios"] = ratios(results)
        save()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(results)
    return 0


def ratios(results: dict) -> dict:
    """The issue's target ratios, computed from this run's numbers only."""
    out = {}
    pipe = results.get("pipeline", {})

    def rate(key: str, name: str, field: str = "images_per_s"):
        return results.get(key, {}).get(name, {}).get(field)

    for name in results.get("images", DATASETS):
        for field, unit in (("images_per_s", ""), ("images_per_cpu_s", ", per CPU-second")):
            tflite = pipe.get(f"{name}/tflite", {}).get(field)
            keras = pipe.get(f"{name}/keras", {}).get(field)
            for suffix, label in (("", "TF default"), ("_onednn_off", "oneDNN off")):
                raw, common = (
                    rate(f"raw_baseline{suffix}", name, field),
                    rate(f"common_pattern{suffix}", name, field),
                )
                if tflite and raw:
                    out[f"{name}: pipeline(tflite) / raw baseline ({label}){unit}"] = round(
                        tflite / raw, 2
                    )
                if keras and raw:
                    out[f"{name}: pipeline(keras) / raw baseline ({label}){unit}"] = round(
                        keras / raw, 2
                    )
                if tflite and common:
                    out[f"{name}: pipeline(tflite) / common pattern ({label}){unit}"] = round(
                        tflite / common, 2
                    )
    if "scaling" in results:
        out["fruit360: 2 cores / 1 core"] = results["scaling"]["speedup"]
    return out


def print_summary(results: dict) -> None:
    print("\n== images/s ==")
    for suffix in ("", "_onednn_off"):
        for name, r in results.get(f"raw_baseline{suffix}", {}).items():
            print(f"raw baseline{suffix:12s} (keras, b64)   {name:10s} {r['images_per_s']:8.1f}")
        for name, r in results.get(f"common_pattern{suffix}", {}).items():
            print(f"common pattern{suffix:12s} (Spark)     {name:10s} {r['images_per_s']:8.1f}")
    for key, r in results.get("pipeline", {}).items():
        name, engine = key.split("/")
        print(f"pipeline engine={engine:6s}                    {name:10s} {r['images_per_s']:8.1f}")
    print("\n== ratios ==")
    for key, value in results.get("ratios", {}).items():
        print(f"{key:75s} {value:6.2f}x")
    print(f"\nload: {results.get('uptime_before')}\n  ->  {results.get('uptime_after')}")


if __name__ == "__main__":
    sys.exit(main())
