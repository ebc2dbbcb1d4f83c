"""How a whole run's cost grows with the number of images, next to a single-process reference.

One command, one run, one machine (about 40 minutes on an idle 2-core machine)::

    .venv/bin/python benchmarks/scale.py
    .venv/bin/python benchmarks/scale.py --sizes 2000 --reference-sizes 2000 --pca-rows 10000

Measures, each in a fresh child process, after the once-per-machine work into the benchmark's
empty cache (timed and reported apart): converting the TFLite model (which ``imagepca emr
stage`` takes off EMR runs altogether) and a first small run, which writes the local JVM's
class archive:

- ``imagepca run`` (all three notebooks, papermill, ``local[2]``) on n Fruits-360-size images:
  copies of ``../shared/datasets/fruit360-shapes`` under distinct names (hard links when the
  file system allows) in a temporary folder; per stage seconds from ``metrics.json`` and the
  executed notebooks, images/s, peak RSS of the kernel (driver Python), the JVM and each
  Python worker;
- the single-process reference at the smaller sizes: Keras ``predict_on_batch`` with
  TensorFlow's defaults (oneDNN state recorded), numpy standardization + float64 Gram +
  ``eigh``, the multinomial logistic regression scikit-learn's ``lbfgs`` solver finds (scipy's
  L-BFGS-B with its settings, ``imagepca.logistic.fit_multinomial``: reduced, full, the same
  k sweep);
- the PCA fit alone (``imagepca.reduction.fit_pca``, ``local[2]`` with a 2 GiB driver, which
  in local mode is the executor) on synthetic 1280-d rows read from Parquet, next to numpy's
  float64 Gram + ``eigh`` of the same rows.

Writes ``benchmarks/scale.json``, the log-log plot ``docs/scale.png`` and the "How cost grows"
table between the markers in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from imagepca import runner
from imagepca.config import ExtractParams
from imagepca.session import QUICK_JIT_ENV

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize import REPO, SHARED, WEIGHTS, load_average, machine_info, onednn_enabled  # noqa: E402

FRUIT360 = SHARED / "datasets" / "fruit360-shapes"
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
MIB = 1 << 20
FIRST_RUN_IMAGES = 240  # the once-per-machine first run: as many images as the demo's sample


class TreeSampler:
    """Peak RSS per kind of descendant process, sampled every 0.2 s (psutil)."""

    KINDS = (("pyspark.daemon", "python_worker"), ("bin/java", "jvm"), ("ipykernel", "kernel"))

    def __init__(self, root_pid: int | None = None) -> None:
        import psutil

        self.process = psutil.Process(root_pid) if root_pid else psutil.Process()
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                children = self.process.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    cmd, rss = " ".join(child.cmdline()), child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                program = cmd.split(" ", 1)[0]
                kind = next(
                    (k for marker, k in self.KINDS if marker in (program if k == "jvm" else cmd)),
                    "other",
                )
                self.peaks[kind] = max(self.peaks.get(kind, 0), rss)
            self._stop.wait(0.2)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {f"peak_{kind}_rss_mib": round(rss / MIB, 1) for kind, rss in self.peaks.items()}


def stage_copies(n: int, target: Path) -> Path:
    """n images: the shared Fruits-360-size set repeated under distinct names."""
    from imagepca.images import IMAGE_EXTENSIONS

    files = sorted(p for p in FRUIT360.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    for i in range(n):
        # Evenly over the sorted listing, so every class keeps its share at any n.
        source = files[(i * len(files)) // n if n <= len(files) else i % len(files)]
        dest = target / source.parent.name / f"{i:07d}-{source.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
    return target


def child_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        IMAGEPCA_CACHE=str(cache),
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        MPLBACKEND="Agg",
    )
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's own default
    return env


# -- the pipeline ---------------------------------------------------------------------------


def notebook_seconds(output: Path) -> dict[str, float]:
    """Each executed notebook's wall time as papermill recorded it (kernel start included)."""
    times = {}
    for path in sorted((output / "notebooks").glob("*.ipynb")):
        meta = json.loads(path.read_text())["metadata"].get("papermill", {})
        if meta.get("duration") is not None:
            times[path.stem] = round(meta["duration"], 2)
    return times


def run_pipeline(n: int, input_dir: Path, output: Path, cache: Path) -> dict:
    command = [
        sys.executable, "-m", "imagepca", "run", "--input", str(input_dir),
        "--output", str(output), "--weights", str(WEIGHTS), "--master", "local[2]",
    ]  # fmt: skip
    before = load_average()
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, env=child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"imagepca run failed on {n} images:\n{stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    timings = metrics["timings_s"]
    notebooks = notebook_seconds(output)
    featurize = timings["featurize_s"]
    stages = {
        "featurize": featurize,
        "extract_other": round(
            sum(timings.get(k, 0) for k in ("weights_s", "list_s", "model_s", "write_s")), 2
        ),
        "pca_fit": timings["fit_s"],
        # reduced/'s write, the plot's sample, and the wait for the models saved beside them.
        "reduce_write": round(
            sum(timings.get(k, 0) for k in ("reduce_write_s", "projection_s", "models_wait_s")), 2
        ),
        "classify": timings.get("classify_s", 0.0),
    }
    stages["fixed_other"] = round(wall - sum(stages.values()), 2)
    # After featurization: notebook 01's writes, then notebooks 02 and 03 whole (papermill's
    # own durations, so their kernels' start-up counts too).
    after = timings.get("write_s", 0) + sum(
        seconds for name, seconds in notebooks.items() if not name.startswith("01")
    )
    return {
        "n": n,
        "wall_s": round(wall, 2),
        # What `imagepca run` chose for its JVM.
        "jvm_c1_only": os.environ.get(QUICK_JIT_ENV) == "1"
        or bool(
            runner.jvm_environment(
                ExtractParams(input=str(input_dir), output=str(output)),
                master="local[2]",
                kernel=runner.LOCAL_KERNEL,
            )
        ),
        "images_per_s_whole_run": round(n / wall, 2),
        "featurize_images_per_s": metrics.get("images_per_s"),
        "stages_s": stages,
        "notebooks_s": notebooks,
        "after_featurization_s": round(after, 2),
        "after_over_featurize": round(after / featurize, 3),
        "k": metrics["k"],
        "accuracy_reduced": metrics.get("classification", {}).get("reduced", {}).get("accuracy"),
        "accuracy_full": metrics.get("classification", {}).get("full", {}).get("accuracy"),
        "memory": sampler.summary(),
        "load_before_after": [before, load_average()],
        "summary": stdout.strip().splitlines()[-8:],
    }


# -- the single-process reference -------------------------------------------------------------


def child_reference(job: dict) -> dict:
    """Keras (TF defaults) + numpy PCA + scipy's L-BFGS-B, in one process, same images."""
    start_all = time.perf_counter()
    files = sorted(Path(job["input"]).rglob("*.jpg"))
    labels = np.array([p.parent.name for p in files])
    from imagepca.features import build_keras_model
    from imagepca.images import decode_image

    timings = {}
    t0 = time.perf_counter()
    model = build_keras_model(224, WEIGHTS)
    timings["model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = []
    for first in range(0, len(files), 64):
        pixels = np.stack(
            [decode_image(p.read_bytes(), 224) for p in files[first : first + 64]]
        ).astype(np.float32)
        batches.append(np.asarray(model.predict_on_batch(pixels)))
    features = np.concatenate(batches)
    timings["featurize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = features.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    scaled = (x - mean) / np.where(std > 0, std, 1)
    gram = scaled.T @ scaled / (len(x) - 1)
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    explained = values / values.sum()
    k = int(np.searchsorted(np.cumsum(explained), 0.95) + 1)
    reduced = scaled @ vectors[:, : max(k, 100)]
    timings["pca_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from imagepca.logistic import fit_multinomial, predict

    rng = np.random.default_rng(42)
    is_test = np.zeros(len(x), bool)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        is_test[rng.permutation(index)[: max(1, round(len(index) * 0.25))]] = True
    classes, y = np.unique(labels, return_inverse=True)
    accuracy = {}
    for name, matrix in [("reduced", reduced[:, :k]), ("full", scaled)] + [
        (f"k={kk}", reduced[:, :kk]) for kk in sorted({2, 5, 10, 20, 50, 100} - {k})
    ]:
        coefficients, intercepts, _ = fit_multinomial(
            matrix[~is_test], y[~is_test], len(classes), reg_param=0.01, max_iter=100
        )
        accuracy[name] = float(
            (predict(coefficients, intercepts, matrix[is_test]) == y[is_test]).mean()
        )
    timings["classify_s"] = time.perf_counter() - t0
    import resource

    return {
        "n": len(files),
        "wall_s": round(time.perf_counter() - start_all, 2),
        "stages_s": {key: round(value, 2) for key, value in timings.items()},
        "featurize_images_per_s": round(len(files) / timings["featurize_s"], 2),
        "k": k,
        "accuracy_reduced": accuracy["reduced"],
        "accuracy_full": accuracy["full"],
        "onednn_enabled": onednn_enabled(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "what": "Keras predict_on_batch (batches of 64, TF defaults) + numpy float64 Gram/eigh "
        "+ scipy L-BFGS-B logistic regression with scikit-learn's lbfgs settings "
        "(reduced, full, sweep)",
    }


# -- PCA fit alone ------------------------------------------------------------------------------


def child_pca(job: dict) -> dict:
    """Synthetic rows to Parquet, then fit_pca on them (2 GiB driver = local executor)."""
    import pandas as pd

    from imagepca.reduction import fit_pca
    from imagepca.session import get_spark

    spark = get_spark("local[2]", driver_memory="2g", conf={"spark.ui.enabled": "false"})
    rows, path, dim = job["rows"], job["path"], 1280

    def generate(batches):
        mixing = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
        offset = np.linspace(0, 50, dim, dtype=np.float32)  # large means, as ReLU features
        for frame in batches:
            rng = np.random.default_rng(int(frame["id"].iloc[0]))
            latent = rng.standard_normal((len(frame), 64)).astype(np.float32)
            noise = 0.5 * rng.standard_normal((len(frame), dim)).astype(np.float32)
            values = latent @ mixing + noise + offset
            yield pd.DataFrame({"features": list(values)})

    if not Path(path).exists():
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2000")
        spark.range(rows, numPartitions=max(2, rows // 20000)).mapInPandas(
            generate, "features array<float>"
        ).write.parquet(path)
    features = spark.read.parquet(path)
    start = time.perf_counter()
    fit = fit_pca(features, k=None, variance=0.95)
    seconds = time.perf_counter() - start
    spark.stop()
    return {"rows": rows, "fit_s": round(seconds, 2), "k_at_95pct": fit.k}


def child_numpy_gram(job: dict) -> dict:
    """numpy's float64 Gram + eigh of the same Parquet rows (read in chunks, not timed)."""
    import pyarrow.parquet as pq

    chunks = []
    for fragment in sorted(Path(job["path"]).glob("*.parquet")):
        column = pq.read_table(fragment, columns=["features"]).column(0).combine_chunks()
        values = column.flatten().to_numpy()
        chunks.append(values.reshape(len(column), -1))
    rows = np.concatenate(chunks)
    start = time.perf_counter()
    gram = np.zeros((rows.shape[1], rows.shape[1]))
    mean = rows.mean(axis=0, dtype=np.float64)
    for first in range(0, len(rows), 50_000):
        block = rows[first : first + 50_000].astype(np.float64) - mean
        gram += block.T @ block
    std = np.sqrt(np.diag(gram) / (len(rows) - 1))
    np.linalg.eigh(gram / np.outer(std, std))
    return {"rows": len(rows), "gram_eigh_s": round(time.perf_counter() - start, 2)}


def child_convert(job: dict) -> dict:
    """The once-per-machine TFLite conversion into the benchmark's model cache."""
    from imagepca.features import tflite_model_path

    start = time.perf_counter()
    tflite_model_path(WEIGHTS, job["image_size"])
    return {"tflite_conversion_s": round(time.perf_counter() - start, 2)}


CHILDREN = {
    "reference": child_reference,
    "pca": child_pca,
    "numpy_gram": child_numpy_gram,
    "convert": child_convert,
}


def child(job: dict, cache: Path, workdir: Path) -> dict:
    spec = workdir / f"job-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(job))
    before = load_average()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(spec)],
        env=child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {job['kind']} failed:\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["memory"] = sampler.summary()
    result["load_before_after"] = [before, load_average()]
    return result


# -- report ---------------------------------------------------------------------------------


def plot(results: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["pipeline"]
    ns = [run["n"] for run in runs]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for stage in runs[0]["stages_s"]:
        values = [max(run["stages_s"][stage], 1e-2) for run in runs]
        ax.plot(ns, values, "o-", label=stage)
    ax.plot(ns, [run["wall_s"] for run in runs], "k^-", label="whole run (wall)")
    references = results.get("reference", [])
    if references:
        ax.plot(
            [r["n"] for r in references], [r["wall_s"] for r in references], "s--",
            color="grey", label="single-process reference (wall)",
        )  # fmt: skip
    lo, hi = min(ns), max(ns)
    base = runs[0]["stages_s"]["featurize"]
    ax.plot([lo, hi], [base, base * hi / lo], ":", color="lightgrey", label="linear in n")
    ax.set(
        xscale="log", yscale="log", xlabel="images (n)", ylabel="seconds",
        title=f"imagepca run, stage time against n ({results['machine']['cpu_model']}, 2 cores)",
    )  # fmt: skip
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


def table(results: dict) -> str:
    references = {r["n"]: r for r in results.get("reference", [])}
    lines = [
        "| n | whole run | featurize | PCA fit | projection + writes | classify | fixed and other "
        "| after featurization / featurize | images/s (run) | reference | run vs reference "
        "| featurize vs Keras | peak RSS kernel / JVM / worker (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["pipeline"]:
        s, m = run["stages_s"], run["memory"]
        ref = references.get(run["n"])
        lines.append(
            f"| {run['n']:,} | {run['wall_s']:.1f} s | {s['featurize']:.1f} s | "
            f"{s['pca_fit']:.1f} s | {s['reduce_write']:.1f} s | {s['classify']:.1f} s | "
            f"{s['fixed_other'] + s['extract_other']:.1f} s | {run['after_over_featurize']:.0%} | "
            f"{run['images_per_s_whole_run']:.1f} | "
            + (
                f"{ref['wall_s']:.1f} s | {ref['wall_s'] / run['wall_s']:.2f}x | "
                f"{run['featurize_images_per_s'] / ref['featurize_images_per_s']:.2f}x"
                if ref
                else "- | - | -"
            )
            + f" | {m.get('peak_kernel_rss_mib', 0):.0f} / {m.get('peak_jvm_rss_mib', 0):.0f} / "
            f"{m.get('peak_python_worker_rss_mib', 0):.0f} |"
        )
    lines += [
        "",
        "| rows | PCA fit (Spark) | numpy Gram + eigh | ratio | peak JVM / worker (MiB) |",
    ]
    lines.append("|---|---|---|---|---|")
    for fit, gram in zip(results.get("pca", []), results.get("numpy_gram", []), strict=False):
        m = fit["memory"]
        lines.append(
            f"| {fit['rows']:,} | {fit['fit_s']:.1f} s | {gram['gram_eigh_s']:.1f} s | "
            f"{fit['fit_s'] / gram['gram_eigh_s']:.2f}x | {m.get('peak_jvm_rss_mib', 0):.0f} / "
            f"{m.get('peak_python_worker_rss_mib', 0):.0f} |"
        )
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    text = DOC.read_text()
    body = (
        f"{BEGIN}\nOne run of `benchmarks/scale.py` ({results['started']}, "
        f"{results['machine']['cpu_model']}, {results['machine']['cpus']} cores, TensorFlow "
        f"oneDNN by default: {(results.get('reference') or [{}])[0].get('onednn_enabled')}; "
        f"numpy's BLAS kernels: {', '.join(results['machine']['blas']['kernels'])}, "
        f"environment {results['machine']['blas']['environment'] or 'none'}). "
        + (
            f"Before the runs, the TFLite model was converted "
            f"({results['one_time']['tflite_conversion_s']:.1f} s) and a first run on "
            f"{FIRST_RUN_IMAGES} images wrote the JVM's class archive "
            f"({results['one_time'].get('first_run_s', 0):.1f} s for that whole run): "
            "once-per-machine costs no row includes. `imagepca run` gave runs on up to "
            f"{runner.QUICK_JIT_MAX_IMAGES:,} images a JVM compiling with C1 only, larger ones "
            "both compilers (`imagepca.runner.jvm_environment`).\n\n"
            if results.get("one_time")
            else "\n\n"
        )
        + f"{table(results)}\n{END}"
    )
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## How cost grows\n\n" + body + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000, 100000])
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=[2000, 10000])
    parser.add_argument("--pca-rows", type=int, nargs="*", default=[10000, 100000, 1000000])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "scale.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "scale.png"))
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/performance.md")
    parser.add_argument("--workdir", help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(Path(args.child).read_text())
        print("RESULT " + json.dumps(CHILDREN[job["kind"]](job)), flush=True)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imagepca-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "pipeline": [],
        "reference": [],
        "pca": [],
        "numpy_gram": [],
    }
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    try:
        if args.sizes:
            # Converted once, before any timed run: every later run on a machine (and every
            # EMR run, from `imagepca emr stage`) reads the cached model.
            print(f"[{time.strftime('%H:%M:%S')}] TFLite conversion into the cache", flush=True)
            conversion = child({"kind": "convert", "image_size": 224}, cache, workdir)
            # A user's first run also writes the local JVM's class archive into the cache
            # (imagepca.session.class_archive_options); every later run maps it.
            print(f"[{time.strftime('%H:%M:%S')}] first run (JVM class archive)", flush=True)
            first = run_pipeline(
                FIRST_RUN_IMAGES,
                stage_copies(FIRST_RUN_IMAGES, workdir / "images-first"),
                workdir / "out-first",
                cache,
            )
            conversion["first_run_s"] = first["wall_s"]
            results["one_time"] = conversion
            print(json.dumps(conversion), flush=True)
        for n in sorted(args.sizes):
            images = stage_copies(n, workdir / f"images-{n}")
            print(f"[{time.strftime('%H:%M:%S')}] imagepca run on {n} images", flush=True)
            results["pipeline"].append(run_pipeline(n, images, workdir / f"out-{n}", cache))
            print(json.dumps(results["pipeline"][-1]["stages_s"]), flush=True)
            if n in args.reference_sizes:
                print(f"[{time.strftime('%H:%M:%S')}] reference on {n} images", flush=True)
                result = child({"kind": "reference", "input": str(images)}, cache, workdir)
                results["reference"].append(result)
                print(json.dumps(result["stages_s"]), flush=True)
            shutil.rmtree(workdir / f"out-{n}", ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)
            save()
        for rows in sorted(args.pca_rows):
            path = str(workdir / f"synthetic-{rows}")
            print(f"[{time.strftime('%H:%M:%S')}] PCA fit on {rows} rows", flush=True)
            results["pca"].append(
                child({"kind": "pca", "rows": rows, "path": path}, cache, workdir)
            )
            results["numpy_gram"].append(
                child({"kind": "numpy_gram", "path": path}, cache, workdir)
            )
            print(results["pca"][-1], results["numpy_gram"][-1], flush=True)
            shutil.rmtree(path, ignore_errors=True)
            save()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if results["pipeline"]:
        plot(results, Path(args.plot))
    print(table(results))
    if not args.no_doc:
        write_doc(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
