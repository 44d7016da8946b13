"""Packaging: pyproject.toml and environment.yml agree, every imported package is declared, the console script."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def _name(requirement: str) -> str:
    return re.split(r"[<>=~!\[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_matches_pyproject():
    extras = [d for group in PROJECT["optional-dependencies"].values() for d in group]
    pip_deps = {_normalise(d) for d in PROJECT["dependencies"] + extras}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_deps = {_normalise(d) for d in pip_section if not d.startswith("-e")}
    assert pip_deps == conda_deps, (pip_deps ^ conda_deps)
    assert "torch==2.14.1" in pip_deps and "torchvision==0.29.1" in pip_deps
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))


def test_tools_are_extras_not_runtime_requirements():
    runtime = {_name(d) for d in PROJECT["dependencies"]}
    assert not runtime & {"pytest", "jupyterlab"}, runtime & {"pytest", "jupyterlab"}
    assert {"pytest"} <= {_name(d) for d in PROJECT["optional-dependencies"]["test"]}


def test_every_imported_package_is_declared():
    """Each third-party top-level module imported anywhere in nrfm/ belongs to a declared runtime requirement."""
    imported = set()
    for path in (ROOT / "nrfm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "nrfm"}
    providers = metadata.packages_distributions()
    declared = {_name(d) for d in PROJECT["dependencies"]}
    undeclared = {m: providers.get(m) for m in third_party
                  if not {_name(p) for p in providers.get(m, [m])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_pinned_minor_versions_of_libraries_whose_internals_are_used():
    pins = {_name(d): d for d in PROJECT["dependencies"]}
    for name in ("monai", "lightly", "grad-cam"):
        assert "~=" in pins[name] or "==" in pins[name], pins[name]


def test_console_script():
    assert PROJECT["scripts"]["nrfm"] == "nrfm.cli:main"


def test_importing_the_models_builds_no_parser():
    """monai imports jsonschema; jsonschema 4.24+ would import rfc3987-syntax (installed with jupyterlab), which
    compiles an Earley grammar at import, seconds in every notebook kernel. The pin in pyproject.toml keeps it out."""
    import subprocess

    code = ("import sys, nrfm.models.backbones, nrfm.ssl.views; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rfc3987_syntax', 'lark')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
