"""pyproject.toml and environment.yml must list the same dependencies (conda users get what pip users get)."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = {_normalise(d) for d in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_deps = {_normalise(d) for d in pip_section if not d.startswith("-e")}
    assert pip_deps == conda_deps, (pip_deps ^ conda_deps)
    assert "torch==2.14.1" in pip_deps and "torchvision==0.29.1" in pip_deps
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))


def test_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["nrfm"] == "nrfm.cli:main"
