"""Model-only TFLite throughput per CPU-second at 224/160/128 px (1 thread, batch 1).

CPU time rather than wall time, so the number holds on a shared, loaded machine::

    .venv/bin/python benchmarks/model_only.py
"""

from __future__ import annotations

import os
import time

import numpy as np
from featurize import WEIGHTS  # noqa: E402  (same folder)

from imagepca.features import tflite_model


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    for size in (224, 160, 128):
        interpreter = Interpreter(model_content=tflite_model(WEIGHTS, size), num_threads=1)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        pixels = (np.random.default_rng(0).random((1, size, size, 3)) * 255).astype(np.float32)
        interpreter.set_tensor(index, pixels)
        interpreter.invoke()
        cpu0, start, n = sum(os.times()[:2]), time.perf_counter(), 0
        while sum(os.times()[:2]) - cpu0 < 3.0:
            interpreter.set_tensor(index, pixels)
            interpreter.invoke()
            n += 1
        cpu = sum(os.times()[:2]) - cpu0
        per_cpu_s = n / cpu
        print(
            f"{size}px: {per_cpu_s:.1f} images per CPU-second, "
            f"{n / (time.perf_counter() - start):.1f} images/s wall, "
            f"{per_cpu_s * 0.6 * (size / 224) ** 2:.1f} GFLOP/s per busy core"
        )


if __name__ == "__main__":
    main()
