"""What an incremental run costs next to a full run (issue 16), on the shared Fruits-360-size set.

One process, one local SparkSession. The input is a temporary copy of
``../shared/datasets/fruit360-shapes/`` minus ``--held-back`` images per class; then:

1. a full extraction of the copy (``--incremental`` on an empty output: a full run);
2. the held-back images are added and ``--removed`` images deleted;
3. an incremental extraction: only the added files are read and featurized;
4. an incremental extraction with nothing changed.

Printed and written to ``benchmarks/incremental.json``: seconds per step (list, plan,
featurize, write), files featurized, and the CPU. Featurization-only: PCA is the same work
either way (it always runs on the whole set).

    .venv/bin/python benchmarks/incremental.py [--held-back 2] [--removed 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEPCA_SHARED", REPO.parent / "shared"))
FRUIT360 = SHARED / "datasets" / "fruit360-shapes"
WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-back", type=int, default=2, help="images per class added later")
    parser.add_argument("--removed", type=int, default=20, help="images deleted before step 3")
    parser.add_argument("--result", default=str(REPO / "benchmarks" / "incremental.json"))
    args = parser.parse_args()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from imagepca.config import ExtractParams
    from imagepca.pipeline import extract_features
    from imagepca.session import get_spark

    spark = get_spark("local[2]", conf={"spark.ui.enabled": "false"})
    work = Path(tempfile.mkdtemp(prefix="imagepca-incremental-"))
    try:
        root, held = work / "input", []
        for folder in sorted(FRUIT360.iterdir()):
            files = sorted(folder.iterdir())
            (root / folder.name).mkdir(parents=True)
            for path in files[: -args.held_back]:
                shutil.copy(path, root / folder.name / path.name)
            held += files[-args.held_back :]
        params = dict(input=str(root), output=str(work / "out"), weights=str(WEIGHTS))
        steps = {}

        def extract(name: str) -> None:
            started = time.perf_counter()
            extraction = extract_features(spark, ExtractParams(**params, incremental=True))
            m = extraction.metadata
            steps[name] = {
                "wall_s": round(time.perf_counter() - started, 2),
                "timings_s": m["timings_s"],
                "n_files_found": m["n_files_found"],
                "n_images": m["n_images"],
                "incremental": m["incremental"],
            }
            print(f"{name}: {steps[name]['wall_s']} s  {extraction.summary()}", flush=True)

        extract("full")
        for path in held:
            shutil.copy(path, root / path.parent.name / path.name)
        for path in sorted(root.rglob("*.jpg"))[: args.removed]:
            path.unlink()
        extract("incremental")
        extract("unchanged")
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "held_back_per_class": args.held_back,
        "removed": args.removed,
        "steps": steps,
    }
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
