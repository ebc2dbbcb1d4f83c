"""What ``metrics.json`` records of a run besides its results: each stage's wall time and
the versions of the libraries that produced it (a rerun can tell what changed)."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager, suppress
from importlib import metadata

VERSIONED = (
    "imagepca", "pyspark", "tensorflow", "keras", "ai-edge-litert", "numpy", "pandas",
    "pyarrow", "pillow",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED:
        with suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Record the block's wall time, in seconds, as ``timings[name]`` (for metrics.json)."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
