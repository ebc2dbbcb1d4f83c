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
