"""The kit outside its checkout: a non-editable install runs `nrfm synth` and the packaged smoke config from an
empty folder, and writes only under that folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """nrfm built as a wheel and installed (no dependencies: the test venv has them) into a target folder."""
    base = tmp_path_factory.mktemp("installed")
    target = base / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop(WORKDIR_ENV, None) if (WORKDIR_ENV := "NRFM_WORKDIR") in env else None
    workdir = base / "lab"
    workdir.mkdir()
    return target, env, workdir


def _nrfm(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "nrfm", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_installed_package_is_not_the_checkout(installed):
    target, env, workdir = installed
    where = subprocess.run([sys.executable, "-c", "import nrfm, nrfm.pipeline.workspace as w; "
                            "print(nrfm.__file__); print(w.resource_dir('notebooks')); print(w.source_checkout())"],
                           cwd=workdir, env=env, capture_output=True, text=True)
    package, notebooks, checkout = where.stdout.split()
    assert Path(package).is_relative_to(target)
    assert Path(notebooks).is_relative_to(target) and len(list(Path(notebooks).glob("*.ipynb"))) == 7
    assert checkout == "None"


def test_synth_and_smoke_run_from_an_empty_folder(installed):
    target, env, workdir = installed
    synth = _nrfm(["synth", "--profile", "smoke", "--out", "data/x", "--quiet"], env, workdir)
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert (workdir / "data" / "x" / "manifest.csv").is_file()
    # one backbone keeps this second end-to-end run short; every notebook still executes
    run = _nrfm(["run", "--config", "smoke", "--set", "pretraining.methods=[byol]", "--out", "rep", "--quiet"],
                env, workdir)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    (run_dir,) = [p for p in (workdir / "rep").iterdir() if p.is_dir()]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert Path(record["notebook_dir"]).is_relative_to(target)
    assert (run_dir / "index.html").is_file() and (run_dir / "metrics" / "molecular.csv").is_file()
    written = {p.relative_to(workdir).parts[0] for p in workdir.rglob("*")}
    assert written <= {"data", "rep", ".cache"}, written  # nothing outside the workspace's own folders
    assert not (ROOT / "rep").exists()
