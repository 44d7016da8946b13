"""The run machinery on tiny notebooks: fresh folders, provenance, failure reporting, interruption and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nrfm.cli import main
from nrfm.errors import ConfigError, RunError
from nrfm.pipeline.runner import list_notebooks, parse_sweep, resume_run, start_run

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('config = ""\nrun_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture()
def notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _notebook(folder / "00_first.ipynb",
              "from pathlib import Path\nPath(run_dir, 'first.txt').write_text(config)\nprint('first ran')")
    _notebook(folder / "01_second.ipynb",
              "import time, os\nfrom pathlib import Path\nPath(run_dir, 'second_started.txt').write_text('')\n"
              "time.sleep(float(os.environ.get('NRFM_TEST_SLEEP', '0')))\n"
              "Path(run_dir, 'second.txt').write_text('ok')")
    return folder


def test_two_runs_land_in_two_folders(tmp_path, notebooks):
    out = tmp_path / "reports"
    first = start_run(SMOKE, out=out, notebook_dir=notebooks, progress=False)
    second = start_run(SMOKE, out=out, notebook_dir=notebooks, progress=False)
    assert first.run_dir != second.run_dir
    for outcome in (first, second):
        record = json.loads((outcome.run_dir / "run.json").read_text())
        assert record["status"] == "complete"
        assert [s["notebook"] for s in record["stages"]] == ["00_first.ipynb", "01_second.ipynb"]
        assert len(record["config_sha256"]) == 64 and record["packages"]["torch"]
        assert (outcome.run_dir / "first.txt").read_text().endswith("config.yaml")
        html = outcome.report.read_text()
        assert "first ran" in html and "https://" not in html and "<script" not in html
    index = (out / "index.html").read_text()
    assert first.run_dir.name in index and second.run_dir.name in index


def test_failing_notebook_stops_the_run_and_shows_the_error(tmp_path, notebooks, capsys):
    _notebook(notebooks / "01_second.ipynb", "raise ValueError('planted failure 42')")
    _notebook(notebooks / "02_never.ipynb", "from pathlib import Path\nPath(run_dir, 'never.txt').write_text('x')")
    out = tmp_path / "reports"
    code = main(["run", "--config", str(SMOKE), "--out", str(out), "--notebooks", str(notebooks), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "planted failure 42" in err[0]
    run_dir = next(out.glob("*/run.json")).parent
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "01_second" in record["error"]
    assert not (run_dir / "never.txt").exists()
    assert "planted failure 42" in (run_dir / "index.html").read_text()


def test_sigterm_marks_incomplete_and_resume_continues(tmp_path, notebooks):
    out = tmp_path / "reports"
    env = {**os.environ, "NRFM_TEST_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "nrfm", "run", "--config", str(SMOKE), "--out", str(out),
                             "--notebooks", str(notebooks), "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/second_started.txt")):
        time.sleep(0.5)  # wait until the second notebook is inside its sleep (kernel start is slow on busy CI)
    assert list(out.glob("*/second_started.txt")), "the second notebook never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    run_dir = next(out.glob("*/run.json")).parent
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "incomplete" and "--resume" in record["error"]
    assert record["stages"][0]["status"] == "complete" and not (run_dir / "second.txt").exists()
    (run_dir / "first.txt").write_text("marker: must not be rewritten on resume")
    outcome = resume_run(run_dir.name, out=out, progress=False)
    assert outcome.status == "complete" and (run_dir / "second.txt").read_text() == "ok"
    assert (run_dir / "first.txt").read_text().startswith("marker")
    with pytest.raises(RunError, match="already complete"):
        resume_run(run_dir.name, out=out, progress=False)


def test_resume_refuses_changed_config(tmp_path, notebooks):
    _notebook(notebooks / "01_second.ipynb", "raise KeyboardInterrupt")
    out = tmp_path / "reports"
    with pytest.raises(RunError):
        start_run(SMOKE, out=out, notebook_dir=notebooks, progress=False)
    run_dir = next(out.glob("*/run.json")).parent
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 5"))
    with pytest.raises(RunError, match="config changed"):
        resume_run(run_dir.name, out=out, progress=False)


def test_only_and_sweep_parsing(notebooks):
    assert [p.name for p in list_notebooks(["01"], notebook_dir=notebooks)] == ["01_second.ipynb"]
    with pytest.raises(ConfigError, match="unknown notebook '07'"):
        list_notebooks(["07"], notebook_dir=notebooks)
    combos = parse_sweep(["backbone=byol,dino", "seed=0,1,2"])
    assert len(combos) == 6 and combos[0] == {"pretraining.methods": ["byol"], "seed": 0}
    with pytest.raises(ConfigError, match="seeds must be integers"):
        parse_sweep(["seed=a"])
