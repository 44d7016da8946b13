"""Config loading: defaults, the shipped configs, and one clear error per kind of mistake."""
from pathlib import Path

import pytest
import yaml

from nrfm.config import Config
from nrfm.config_loading import load_config, parse_override
from nrfm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.source.endswith(f"{name}.yaml")
    assert len(cfg.sha256()) == 64


def _write(tmp_path, data) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, needle", [
    ({"pretraining": {"epochz": 3}}, "pretraining.epochz: unknown key"),
    ({"colour": 1}, "colour: unknown key"),
    ({"pretraining": {"epochs": "many"}}, "pretraining.epochs: expected an integer"),
    ({"pretraining": {"bf16": "yes"}}, "pretraining.bf16: expected true or false"),
    ({"preprocessing": {"spacing_mm": [1, 1]}}, "preprocessing.spacing_mm: expected a list of 3 values"),
    ({"pretraining": {"epochs": 0}}, "pretraining.epochs: must be >= 1"),
    ({"finetuning": {"dro_eta": 0}}, "finetuning.dro_eta: must be > 0"),
    ({"finetuning": {"mode": "partial", "selection": "per_endpoint"}}, "finetuning.selection: per_endpoint needs mode"),
    ({"finetuning": {"selection": "best"}}, "finetuning.selection: unknown selection 'best'"),
    ({"finetuning": {"objectives": ["erm", "irm"]}}, "finetuning.objectives: unknown value(s) ['irm']"),
    ({"pretraining": {"methods": ["simclr"]}}, "valid: ['byol', 'dino', 'mae', 'moco']"),
    ({"cohort": {"split_fractions": [0.5, 0.2, 0.2]}}, "cohort.split_fractions: must sum to 1"),
    ({"device": "tpu"}, "device: unknown device 'tpu'"),
    ({"analyses": "lots"}, "analyses: expected a mapping"),
])
def test_config_errors_name_file_and_key(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and needle in message
    assert "\n" not in message


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 0\npretraining: {epochs: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: not valid YAML"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/config.yaml")


def test_overrides_and_hash(tmp_path):
    path = _write(tmp_path, {"seed": 3})
    base = load_config(path)
    changed = load_config(path, {"pretraining.epochs": 7, "seed": 4})
    assert base.seed == 3 and changed.seed == 4 and changed.pretraining.epochs == 7
    assert base.sha256() != changed.sha256()
    assert load_config(path).sha256() == base.sha256()  # the hash ignores where the file lives
    assert parse_override("pretraining.methods=[byol, dino]") == ("pretraining.methods", ["byol", "dino"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("pretraining.epochs")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    path = tmp_path / "again.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
