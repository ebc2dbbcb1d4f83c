"""The EMR bootstrap action: shellcheck-clean, dry-run prints the right commands, and
the pinned requirements agree with pyproject.toml and never include pyspark."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "bootstrap"
SCRIPT = BOOTSTRAP / "install-python-deps.sh"
REQUIREMENTS = BOOTSTRAP / "requirements-emr.txt"


def test_shellcheck_passes_on_every_bootstrap_script():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:  # CI installs it; a missing linter must not look like a pass
        pytest.fail("shellcheck is not installed (apt-get install -y shellcheck)")
    scripts = sorted(BOOTSTRAP.glob("*.sh"))
    assert scripts
    result = subprocess.run(
        [shellcheck, "--severity=style", *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_dry_run_prints_every_install_command():
    artifacts = "s3://my bucket/artifacts/0.1.0"  # odd characters must survive quoting
    result = run_script("--artifacts", artifacts, "--version", "0.1.0", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines)
    text = result.stdout
    assert "aws s3 cp s3://my\\ bucket/artifacts/0.1.0/bootstrap/requirements-emr.txt" in text
    assert "aws s3 sync --only-show-errors s3://my\\ bucket/artifacts/0.1.0/wheels/" in text
    pip = [line for line in lines if " -m pip install " in line]
    assert len(pip) == 2
    assert pip[0].startswith("+ sudo python3.11 -m pip install")
    assert "--requirement /mnt/imagepca-bootstrap/requirements-emr.txt" in pip[0]
    assert "--find-links /mnt/imagepca-bootstrap/wheels" in pip[0]
    assert "--no-index" not in pip[0]
    assert "--no-deps" in pip[1] and "imagepca-0.1.0-" in pip[1]
    # requirements first, then the project wheel without dependencies
    assert lines.index(pip[0]) < lines.index(pip[1])
    assert any("ipykernel install --name python3" in line for line in lines)
    assert any("emr_pyspark.pth" in line for line in lines)
    assert "pyspark is present" in text  # verification refuses a pip pyspark
    assert "[imagepca-bootstrap] done" in result.stderr


def test_offline_mode_and_environment_switch():
    result = run_script(
        "--artifacts", "s3://b/artifacts/1", "--offline", env={"IMAGEPCA_BOOTSTRAP_DRY_RUN": "1"}
    )
    assert result.returncode == 0, result.stderr
    pip = [line for line in result.stdout.splitlines() if " -m pip install " in line]
    assert all("--no-index" in line for line in pip) and len(pip) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--artifacts s3://BUCKET/artifacts/VERSION is required"),
        (("--artifacts", "/local/dir"), "--artifacts must be an s3:// URI"),
        (("--artifacts", "s3://b/a", "--bogus"), "unknown argument: --bogus"),
    ],
)
def test_fails_loudly_on_bad_arguments(args, message):
    result = run_script(*args, "--dry-run")
    assert result.returncode != 0
    assert f"[imagepca-bootstrap] ERROR: {message}" in result.stderr


def test_script_is_strict_and_executable():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK)


def requirement_lines() -> list[Requirement]:
    lines = []
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(Requirement(line))
    return lines


def test_requirements_are_exact_pins_without_pyspark():
    requirements = requirement_lines()
    assert requirements
    for requirement in requirements:
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {requirement}"
        assert canonicalize_name(requirement.name) != "pyspark"
    assert not re.search(r"^\s*pyspark", REQUIREMENTS.read_text(), re.M | re.I)


def test_pins_satisfy_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]
    }
    pinned: dict[str, list[str]] = {}
    for requirement in requirement_lines():
        version = next(iter(requirement.specifier)).version
        pinned.setdefault(canonicalize_name(requirement.name), []).append(version)
    missing = sorted(set(wanted) - set(pinned))
    assert not missing, f"pyproject dependencies without a pin in requirements-emr.txt: {missing}"
    for name, versions in pinned.items():
        if name in wanted:
            for version in versions:
                assert wanted[name].specifier.contains(version, prereleases=True), (
                    f"{name}=={version} does not satisfy pyproject's {wanted[name]}"
                )


def fake_python(folder: Path, *, has_pip: bool) -> Path:
    """A ``python3.11`` whose ``-m pip`` works or not, as on an AL2023 image where the
    interpreter and ``python3.11-pip`` are separate packages."""
    folder.mkdir()
    path = folder / "python3.11"
    pip = "exit 0" if has_pip else "echo 'No module named pip' >&2; exit 1"
    path.write_text(
        '#!/usr/bin/env bash\nif [[ "$1" == "-m" && "$2" == "pip" ]]; then '
        + pip
        + "; fi\nexit 0\n"
    )
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("interpreter", "expected"),
    [
        ("missing", "+ sudo dnf install -y python3.11 python3.11-pip python3.11-devel"),
        ("without-pip", "+ sudo dnf install -y python3.11-pip"),
        ("with-pip", None),
    ],
)
def test_python_and_its_pip_installed_only_when_missing(tmp_path, interpreter, expected):
    """Row 10: on Amazon Linux 2023 pip is the separate python3.11-pip package, so an
    existing python3.11 is not enough to skip dnf."""
    python = {
        "missing": str(tmp_path / "no-such-python3.11"),
        "without-pip": str(fake_python(tmp_path / "a", has_pip=False)),
        "with-pip": str(fake_python(tmp_path / "b", has_pip=True)),
    }[interpreter]
    result = run_script(
        "--artifacts", "s3://b/artifacts/1", "--dry-run", env={"IMAGEPCA_PYTHON": python}
    )
    assert result.returncode == 0, result.stderr
    dnf = [line for line in result.stdout.splitlines() if "dnf install" in line]
    assert dnf == ([expected] if expected else [])
    if expected is None:
        assert "and its pip are installed" in result.stderr


def test_pins_keep_numpy_below_2_for_emr_spark():
    """Row 11: EMR 7's Spark 3.5 declares numpy<2 (SPARK-48710); pins must agree."""
    pins = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in requirement_lines()}
    assert int(pins["numpy"].split(".")[0]) < 2
    assert "scikit-learn" in pins
    # One TensorFlow and one LiteRT for both architectures (row 9): no per-arch markers.
    assert all(r.marker is None for r in requirement_lines())
