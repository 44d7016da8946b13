"""The bad-input catalogue: what nrfm refuses and how it says so (README: "What nrfm refuses and why").

Each case goes through the user-facing layer (the ``nrfm`` command, or the library call a notebook makes) and
asserts a non-zero exit (or the exception type), one line naming what is wrong and where, no traceback, and
nothing half-written left behind.
"""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from nrfm.cli import main
from nrfm.errors import CheckpointError, ConfigError, NrfmError, RunError
from nrfm.data.manifest import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SHAPE = (8, 8, 6)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``nrfm argv``; return (exit code, stderr). argparse errors exit through SystemExit.

    ``run_cli.stdout`` keeps the last standard output (``nrfm validate`` lists problems there)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    run_cli.stdout = captured.out
    run_cli.errors = [ln.split(": ", 1)[1] for ln in captured.out.splitlines() if ln.startswith("error: ")]
    return code, captured.err.strip()


def assert_one_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith("  ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _nifti(path: Path, data: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path.name


def tiny_cohort(folder: Path, n: int = 4) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sid = f"S{i:03d}"
        paths = {}
        for contrast in ("t1", "t1c", "t2", "flair"):
            data = np.zeros(SHAPE, np.float32)
            data[1:7, 1:7, 1:5] = rng.uniform(50, 150, (6, 6, 4))
            paths[contrast] = f"img/{_nifti(folder / 'img' / f'{sid}_{contrast}.nii.gz', data)}"
        seg = np.zeros(SHAPE, np.uint8)
        seg[3:5, 3:5, 2:4] = 4
        paths["seg"] = f"img/{_nifti(folder / 'img' / f'{sid}_seg.nii.gz', seg)}"
        rows.append({"subject_id": sid, "patient_id": f"P{i}", "site": "AB"[i % 2], "split": "", **paths,
                     "age": 50, "sex": "F", "grade": 4, "idh": i % 2, "ki67": 10, "os_days": 100 + i,
                     "os_event": 1})
    return write_manifest(folder / "manifest.csv", rows), rows


def write_manifest(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


@pytest.fixture()
def cohort(tmp_path):
    return tiny_cohort(tmp_path)


# ---------------------------------------------------------------------------------------------- the CLI itself
@pytest.mark.parametrize("argv, fragment", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["synth", "--out", "x", "--seed", "abc"], "expected a non-negative integer, got 'abc'"),
    (["synth", "--out", "x", "--profile", "huge"], "invalid choice: 'huge'"),
    (["import", "oasis", "--out", "m.csv"], "invalid choice: 'oasis'"),
    (["run", "--seed", "-3"], "expected a non-negative integer, got -3"),
])
def test_argument_errors(capsys, argv, fragment):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, fragment)


def test_synth_bad_site_spec_leaves_nothing(capsys, tmp_path):
    out = tmp_path / "cohort"
    code, err = run_cli(capsys, "synth", "--out", str(out), "--sites", "UCSF:many", "--quiet")
    assert code == 2 and not out.exists()
    assert_one_line(err, "UCSF:many")


def test_synth_refuses_an_existing_cohort(capsys, tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "manifest.csv").write_text("subject_id\nkeep-me\n")
    code, err = run_cli(capsys, "synth", "--out", str(out), "--quiet")
    assert code == 2 and "--force" in err
    assert (out / "manifest.csv").read_text() == "subject_id\nkeep-me\n"


# ------------------------------------------------------------------------------------------------- run / config
def _config(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, fragment", [
    ("pretraining:\n  epochz: 3\n", "pretraining.epochz: unknown key"),
    ("finetuning:\n  epochs: two\n", "finetuning.epochs: expected an integer"),
    ("finetuning:\n  dro_eta: -1\n", "finetuning.dro_eta: must be > 0"),
    ("pretraining:\n  methods: [simclr]\n", "pretraining.methods: unknown value(s) ['simclr']"),
    ("seed: [1\n", "not valid YAML"),
])
def test_bad_configs(capsys, tmp_path, text, fragment):
    out = tmp_path / "reports"
    code, err = run_cli(capsys, "run", "--config", _config(tmp_path, text), "--out", str(out))
    assert code == 2 and not out.exists()
    assert_one_line(err, "bad.yaml", fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--config", "no/such.yaml"], "config file not found"),
    (["--only", "42_nothing"], "unknown notebook '42_nothing'"),
    (["--resume", "20990101-000000-nope"], "no such run"),
    (["--sweep", "seed=one,two"], "seeds must be integers"),
    (["--set", "pretraining.epochs"], "expected key=value"),
    (["--set", "pretraining.epochs=0"], "pretraining.epochs: must be >= 1"),
    (["--manifest", "no/such/manifest.csv"], "--manifest: file not found"),
])
def test_bad_run_arguments(capsys, tmp_path, extra, fragment):
    out = tmp_path / "reports"
    argv = ["run", "--out", str(out), *extra] if "--config" in extra else ["run", "--config", SMOKE, "--out",
                                                                           str(out), *extra]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, fragment)
    assert not list(out.glob("*/run.json"))


def test_reports_folder_that_cannot_be_created(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, "run", "--config", SMOKE, "--out", str(blocker / "reports"))
    assert code == 2
    assert_one_line(err, str(blocker / "reports"), "cannot create")


def test_leaking_manifest_is_refused_before_any_run_folder(capsys, tmp_path, cohort):
    path, rows = cohort
    rows[0]["split"], rows[1]["split"] = "train", "test"
    rows[1]["patient_id"] = rows[0]["patient_id"]
    write_manifest(path, rows)
    out = tmp_path / "reports"
    code, err = run_cli(capsys, "run", "--config", SMOKE, "--manifest", str(path), "--out", str(out))
    assert code == 2 and not list(out.glob("*/run.json"))
    assert_one_line(err, str(path), "P0")


# ---------------------------------------------------------------------------------------------- manifests
def _break_table(rows, kind):
    if kind == "duplicate id":
        rows[1]["subject_id"] = rows[0]["subject_id"]
        return 3, "subject_id"
    if kind == "binary label 2":
        rows[0]["idh"] = 2
        return 2, "idh"
    if kind == "negative survival":
        rows[2]["os_days"] = -5
        return 4, "os_days"
    if kind == "event 3":
        rows[2]["os_event"] = 3
        return 4, "os_event"
    if kind == "ki67 over 100":
        rows[3]["ki67"] = 150
        return 5, "ki67"
    if kind == "bad split":
        rows[0]["split"] = "holdout"
        return 2, "split"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["duplicate id", "binary label 2", "negative survival", "event 3",
                                  "ki67 over 100", "bad split"])
def test_bad_manifest_values(capsys, cohort, kind):
    path, rows = cohort
    line, column = _break_table(rows, kind)
    write_manifest(path, rows)
    code, _ = run_cli(capsys, "validate", str(path), "--no-images", "--quiet")
    assert code == 1
    problems = run_cli.errors
    assert any(ln.startswith(f"{path}:{line}:{column}:") for ln in problems), run_cli.stdout


def test_missing_column(capsys, cohort):
    path, rows = cohort
    write_manifest(path, rows, columns=[c for c in COLUMNS if c != "site"])
    code, err = run_cli(capsys, "validate", str(path), "--quiet")
    assert code != 0
    assert any("site" in ln and "missing" in ln and ln.startswith(str(path)) for ln in run_cli.errors + [err]), \
        run_cli.stdout + err


@pytest.mark.parametrize("kind, fragment", [
    ("missing file", "not found"), ("not nifti", "not a readable NIfTI"), ("4d", "4-D volume"),
    ("nan", "NaN or infinite"),
])
def test_bad_images(capsys, cohort, kind, fragment):
    path, rows = cohort
    target = path.parent / rows[1]["t2"]
    if kind == "missing file":
        target.unlink()
    elif kind == "not nifti":
        target.write_text("this is not an image")
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones(SHAPE + (3,), np.float32), np.eye(4)), str(target))
    else:
        data = np.ones(SHAPE, np.float32)
        data[2, 2, 2] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(target))
    code, _ = run_cli(capsys, "validate", str(path), "--quiet")
    assert code == 1
    errors = run_cli.errors
    assert len(errors) == 1 and errors[0].startswith(f"{path}:3:t2:") and fragment in errors[0], run_cli.stdout


def test_missing_manifest_file(capsys, tmp_path):
    code, err = run_cli(capsys, "validate", str(tmp_path / "nope.csv"))
    assert code != 0
    assert_one_line(err or "\n".join(run_cli.errors), "nope.csv")


# ---------------------------------------------------------------------------------------------- importers
def test_importer_pointed_at_the_wrong_folder(capsys, tmp_path):
    (tmp_path / "holiday-photos").mkdir()
    out = tmp_path / "m.csv"
    code, err = run_cli(capsys, "import", "upenn-gbm", "--root", str(tmp_path / "holiday-photos"), "--out", str(out),
                        "--quiet")
    assert code == 2 and not out.exists()
    assert_one_line(err, "holiday-photos")


@pytest.mark.parametrize("argv, fragment", [
    (["import", "merge", "--out", "m.csv"], "give the manifests to merge"),
    (["import", "ucsf-pdgm", "--out", "m.csv"], "--root DIR is required"),
])
def test_importer_arguments(capsys, argv, fragment):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, fragment)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_corrupt_checkpoint(tmp_path):
    from nrfm.files import safe_torch_load

    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="not a readable nrfm checkpoint") as info:
        safe_torch_load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is refused, never executed."""
    from nrfm.files import safe_torch_load

    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="not a readable nrfm checkpoint"):
        safe_torch_load(path)


def test_checkpoint_of_another_method(tmp_path):
    from nrfm.config_loading import load_config
    from nrfm.files import atomic_torch_save
    from nrfm.train.pretrain import CHECKPOINT_FORMAT, load_backbone

    path = tmp_path / "backbone.pt"
    atomic_torch_save(path, {"format": CHECKPOINT_FORMAT, "method": "byol", "arch": "resnet10",
                             "input_size": [16, 16, 16], "model": {}})
    with pytest.raises(CheckpointError, match="expected 'mae'"):
        load_backbone(path, load_config(SMOKE), "mae")


# ---------------------------------------------------------------------------------------------- notebooks, files
def test_unknown_notebook_parameter_value():
    from nrfm.pipeline.context import check_parameter

    with pytest.raises(ConfigError, match=r"notebook parameter backbone: unknown value 'simclr'; valid: \['byol'"):
        check_parameter("backbone", "simclr", ("byol", "dino", "mae", "moco"))
    assert check_parameter("backbone", "all", ("byol", "dino")) == ["byol", "dino"]


def test_disk_full_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    from nrfm import files

    target = tmp_path / "metrics.csv"
    target.write_text("old,complete\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(RunError, match="no space left on the device"):
        files.atomic_write_text(target, "new,partial\n")
    assert target.read_text() == "old,complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temp file left behind


def test_every_user_error_is_an_nrfm_error():
    """The CLI prints NrfmError subclasses as one line; anything else would be a traceback (a bug)."""
    for cls in (CheckpointError, ConfigError, RunError):
        assert issubclass(cls, NrfmError)


# ------------------------------------------------------------------- numbers read right or refused (issue 17)
@pytest.mark.parametrize("sep, value, column", [
    (",", "1,200", "os_days"),  # was read as 1.2 days: a thousands separator in a comma-separated file
    (",", "12,5", "ki67"),  # a decimal comma in a comma-separated file cannot be told from 1,200
    (",", "1_200", "os_days"),  # Python's float() would read 1200
])
def test_thousands_separators_are_refused_with_file_row_column(capsys, cohort, sep, value, column):
    path, rows = cohort
    rows[2][column] = value
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False, sep=sep)
    code, _ = run_cli(capsys, "validate", str(path), "--no-images", "--quiet")
    assert code == 1
    assert any(ln.startswith(f"{path}:4:{column}: not a number: {value!r}") for ln in run_cli.errors), run_cli.stdout


def test_decimal_commas_are_read_only_in_semicolon_files(cohort):
    from nrfm.errors import ManifestError
    from nrfm.data.manifest import read_manifest

    path, rows = cohort
    rows[2]["os_days"], rows[2]["ki67"] = "1200,5", "12,5"
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False, sep=";")
    df = read_manifest(path)
    assert df["os_days"].iloc[2] == 1200.5 and df["ki67"].iloc[2] == 12.5
    for value in ("1.200,5", "1,200,000"):  # thousands separators in a ';' file: refused too
        rows[2]["os_days"] = value
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False, sep=";")
        with pytest.raises(ManifestError, match=rf"^{path}:4:os_days: not a number"):
            read_manifest(path)
    rows[2]["os_days"] = 102
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)  # ',' file, the cell quoted "12,5"
    with pytest.raises(ManifestError, match=rf"^{path}:4:ki67: not a number: '12,5' \(a comma in a number"):
        read_manifest(path)


# --------------------------------------------------------------- small sites handled by design (issue 17)
def test_site_with_one_exam_is_a_warning_naming_it_and_evaluation_only(capsys, tmp_path):
    from nrfm.data.manifest import read_manifest
    from nrfm.data.splits import assign_splits, small_groups

    path, rows = tiny_cohort(tmp_path, n=9)
    for row in rows:
        row["site"] = "A" if row["subject_id"] != "S008" else "TINY"
        row["idh"] = int(row["subject_id"] in ("S000", "S001"))  # site A: 2 IDH-mutant patients, ~1 in training
    write_manifest(path, rows)
    code, _ = run_cli(capsys, "validate", str(path), "--no-images", "--quiet")
    assert code == 0, run_cli.stdout
    warnings = [ln for ln in run_cli.stdout.splitlines() if ln.startswith("warning: ")]
    assert [w for w in warnings if f"{path}:10:site: site 'TINY' has 1 patient" in w
            and "kept for evaluation only" in w], run_cli.stdout
    # (site, class) groups too small to weight are named too, with what happens to them
    assert [w for w in warnings if ":idh: site 'A', idh=" in w and "merged with the other small groups" in w], run_cli.stdout
    df = assign_splits(read_manifest(path), seed=0)
    assert df.loc[df["site"] == "TINY", "split"].tolist() == ["test"]  # the split assignment follows the rule
    table = small_groups(df, "idh")
    assert table[table["kind"] == "site"]["site"].tolist() == ["TINY"]


def test_loso_exclude_is_refused_as_not_implemented(capsys, tmp_path):
    out = tmp_path / "reports"
    code, err = run_cli(capsys, "run", "--config", _config(tmp_path, "analyses:\n  loso_pretrain: exclude\n"),
                        "--out", str(out))
    assert code == 2 and not out.exists()
    assert_one_line(err, "bad.yaml", "analyses.loso_pretrain", "not implemented")
