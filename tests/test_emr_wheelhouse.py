"""The offline-wheels recipe, run for real: ``imagepca emr wheelhouse`` downloads from PyPI
every wheel an EMR 7 node of each architecture installs, from this x86_64 machine, and the
bootstrap's offline install (``pip --no-index --find-links``) resolves from that folder.

Network: PyPI only (a package registry); the wheels go to a temporary folder (pip's own
HTTP cache makes a second run fast).
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from imagepca.aws import stage

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "bootstrap" / "requirements-emr.txt"


def runs_on_node(wheel: Path, arch: str) -> bool:
    """Whether a wheel's tags fit CPython 3.11 on glibc 2.34 (Amazon Linux 2023) ``arch``."""
    platforms = stage.platform_tags(arch)
    supported = set(tags.cpython_tags((3, 11), abis=["cp311"], platforms=platforms))
    supported |= set(tags.compatible_tags((3, 11), "cp311", platforms=platforms))
    return bool(parse_wheel_filename(wheel.name)[3] & supported)


@pytest.mark.parametrize("arch", stage.ARCHES)
def test_wheelhouse_holds_every_wheel_a_node_installs_offline(arch, tmp_path):
    wheels = stage.download_wheelhouse(arch, tmp_path / arch, out=io.StringIO())
    names = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
    # Row 9: the same TensorFlow and LiteRT on Graviton as on x86_64.
    assert names["tensorflow"].name.startswith("tensorflow-2.21.0-cp311-cp311-manylinux_2_27_")
    assert names["ai-edge-litert"].name.startswith("ai_edge_litert-2.3.0-")
    assert names["numpy"].name.startswith("numpy-1.26.4-")
    wrong = [w.name for w in wheels if not runs_on_node(w, arch)]
    assert not wrong, f"wheels that do not run on an {arch} EMR 7 node: {wrong}"

    # What the bootstrap does with --offline, evaluated for that node (markers included).
    check = [
        sys.executable, "-c", stage.PIP_WITH_MACHINE, arch, "install", "--dry-run",
        "--no-index", "--find-links", str(tmp_path / arch), "--only-binary", ":all:",
        "--ignore-installed", "--target", str(tmp_path / "target"),
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        *[f"--platform={tag}" for tag in stage.platform_tags(arch)],
        "--requirement", str(REQUIREMENTS), "--disable-pip-version-check",
    ]  # fmt: skip
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_one_manylinux_tag_misses_tensorflow(tmp_path):
    """Row 8: the former recipe's single ``--platform manylinux_2_28_x86_64`` finds no
    TensorFlow wheel (2.21 is tagged manylinux_2_27), which pip does not expand to; the
    same resolution with :func:`stage.platform_tags` finds it (so the index answered)."""

    def resolve(platforms: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
             "--ignore-installed", "--target", str(tmp_path / "target"), "--only-binary",
             ":all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
             *[f"--platform={tag}" for tag in platforms], "tensorflow==2.21.0",
             "--disable-pip-version-check"],
            capture_output=True, text=True,
        )  # fmt: skip

    found = resolve(stage.platform_tags("x86_64"))
    assert found.returncode == 0, found.stdout[-2000:] + found.stderr[-2000:]
    assert "Would install tensorflow-2.21.0" in found.stdout
    missed = resolve(["manylinux_2_28_x86_64"])
    assert missed.returncode != 0
    assert "No matching distribution found for tensorflow==2.21.0" in missed.stderr
