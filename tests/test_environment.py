"""environment.yml and pyproject.toml list the same packages with the same pins."""

from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement

from conftest import REPO


def _normalized(specs: list[str]) -> dict[str, str]:
    requirements = [Requirement(spec) for spec in specs]
    return {
        r.name.lower().replace("_", "-"): f"{sorted(r.extras)}{r.specifier}{r.marker or ''}"
        for r in requirements
    }


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _normalized(project["dependencies"] + project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = environment["dependencies"]
    assert "python=3.11" in conda and "openjdk=17" in conda
    pip = next(item["pip"] for item in conda if isinstance(item, dict))
    assert _normalized(pip) == wanted


def test_pyspark_matches_emr_7():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    pyspark = next(Requirement(s) for s in dev if s.startswith("pyspark"))
    assert pyspark.specifier.contains("3.5.9") and not pyspark.specifier.contains("3.6.0")
    assert "pyspark" not in " ".join(project["dependencies"])  # EMR brings its own Spark


def _path_without(tmp_path, *missing: str) -> str:
    """A PATH of links to this machine's tools, less ``missing``."""
    import shutil

    folder = tmp_path / "bin"
    folder.mkdir()
    tools = ("sh", "bash", "make", "id", "env", "java", "shellcheck", "krb5-config", "apt-get")
    tools += ("git",)
    for tool in tools:
        found = shutil.which(tool)
        if found and tool not in missing:
            (folder / tool).symlink_to(found)
    return str(folder)


def test_make_test_stops_before_any_work_when_it_cannot_install(tmp_path):
    """No krb5-config and no apt-get: the one command to run, and no venv or pip step."""
    import subprocess

    path = _path_without(tmp_path, "krb5-config", "apt-get")
    result = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "test"],
        env={"PATH": path, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        executable=str(tmp_path / "bin" / "make"),
    )
    assert result.returncode != 0
    lines = result.stdout.splitlines()
    assert (
        lines[0]
        == "error: missing system packages: libkrb5-dev. Install them first (Debian/Ubuntu):"
    )
    assert lines[1].strip().endswith("apt-get install -y --no-install-recommends libkrb5-dev")
    assert "pip" not in result.stdout + result.stderr and "venv" not in result.stdout


def test_make_lists_its_steps_in_order():
    """``make -n``: the package check comes before the venv, which comes before pytest."""
    import subprocess

    result = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "-n", "-B", "test"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for package in (
        "libkrb5-dev:krb5-config",
        "shellcheck:shellcheck",
        "chromium:/usr/bin/chromium",
    ):
        assert package in out
    assert (
        out.index("apt-get update")
        < out.index("-m venv")
        < out.index("pip install")
        < out.index("-m pytest")
    )
