"""The notebooks' text: it renders, the generated facts match the code, and known errors stay out (no execution)."""
import dataclasses
import math
import re
from pathlib import Path

import nbformat
import pytest

from nrfm.config_loading import load_config
from nrfm.pipeline import notebook_text
from nrfm.pipeline.report import _MATH, _markdown, _math_image

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CONFIGS = ("configs/default.yaml", "configs/smoke.yaml")


def _cells(path: Path) -> list:
    return nbformat.read(str(path), as_version=4).cells


def _markdown_text(path: Path) -> str:
    return "\n\n".join(c.source for c in _cells(path) if c.cell_type == "markdown")


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(ROOT / name) for name in CONFIGS}


def _generated(cfg) -> list[str]:
    texts = [notebook_text.pretraining_description(cfg), notebook_text.monitor_description(cfg),
             notebook_text.finetuning_description(cfg), notebook_text.shortcut_description(cfg),
             notebook_text.verdict_rules_description()]
    return texts + [notebook_text.gradcam_layer_description(cfg, m) for m in cfg.pretraining.methods]


def _assert_renders(text: str, where: str) -> None:
    html = _markdown(text)
    assert html.strip(), where
    for match in _MATH.finditer(text):  # every formula is drawn, none falls back to its TeX source
        expr = match.group(1) or match.group(2)
        assert not _math_image(expr, display=False).startswith("<code>"), (where, expr)


def test_seven_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_renders(path):
    for i, cell in enumerate(_cells(path)):
        if cell.cell_type == "markdown":
            _assert_renders(cell.source, f"{path.name} cell {i}")


@pytest.mark.parametrize("name", CONFIGS)
def test_generated_markdown_renders(configs, name):
    for text in _generated(configs[name]):
        _assert_renders(text, name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_teaching_structure(path):
    cells = _cells(path)
    text = _markdown_text(path)
    assert "**What this notebook teaches**" in cells[0].source, path.name
    assert "**Exercises.**" in text, path.name
    for i, cell in enumerate(cells):  # every figure is followed by one line on how to read it
        if cell.cell_type == "code" and re.search(r"(_figure\(|\bplot_\w+\()", cell.source):
            following = cells[i + 1] if i + 1 < len(cells) else None
            assert following is not None and following.cell_type == "markdown" \
                and "How to read this figure" in following.source, (path.name, cell.id)


CITATIONS = {
    "01": ("Grill et al. 2020", "Caron et al. 2021", "He et al. 2022", "Chen et al. 2020", "He et al. 2020"),
    "02": ("Sagawa et al. 2020",),
    "03": ("McInnes et al. 2018", "Rousseeuw 1987"),
    "04": ("Harrell et al. 1982, 1996", "Cox 1972", "Kaplan & Meier 1958"),
    "05": ("Selvaraju et al. 2017",),
    "06": ("Holm 1979",),
}


@pytest.mark.parametrize("prefix", sorted(CITATIONS))
def test_original_papers_cited(prefix):
    text = _markdown_text(next(p for p in NOTEBOOKS if p.name.startswith(prefix)))
    for citation in CITATIONS[prefix]:
        assert citation in text, (prefix, citation)


FORBIDDEN = (
    "kNN", "k-nearest", "nearest-neighbour classifier",  # the monitor is a cross-validated logistic probe
    "fitted on training subjects and scored on validation",
    "should rise",  # the site probe should not rise
    "sharpened\n  (temperature warm-up)", "(temperature warm-up)",  # a warm-up raises the teacher temperature
    "He et al. 2020; v2",  # MoCo v2 is Chen et al. 2020
    "late convolutional layer",  # the default Grad-CAM layer of the kit's ResNets is layer1
    "best any model could reach", "Bayes limit", "no model can beat the oracle",  # the oracle is a latent bound
    "whose predicted risks are\nordered like their survival times",
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_forbidden_phrases(path):
    text = _markdown_text(path)
    flat = " ".join(text.split())
    for phrase in FORBIDDEN:
        assert phrase not in text and " ".join(phrase.split()) not in flat, (path.name, phrase)


def test_harrell_direction_is_stated():
    text = " ".join(_markdown_text(next(p for p in NOTEBOOKS if p.name.startswith("04"))).split())
    assert "shorter-lived patient has the **higher** predicted risk" in text
    assert "ties in predicted risk counting 1/2" in text


# ---- generated facts against the code ------------------------------------------------------------------------
def test_monitor_description_matches_the_monitor(configs):
    from nrfm.train.monitor import RepresentationMonitor
    import inspect

    folds = inspect.signature(RepresentationMonitor.__init__).parameters["folds"].default
    assert notebook_text.monitor_folds() == folds
    cfg = configs["configs/default.yaml"]
    text = notebook_text.monitor_description(cfg)
    assert f"{folds}-fold" in text and "grouped by patient" in text
    assert f"C = {cfg.pretraining.monitor_c:g}" in text and f"probe_{cfg.pretraining.monitor_endpoint}_auc" in text
    assert "lower = more site-invariant" in text


@pytest.mark.parametrize("mode", ["partial", "linear", "full"])
def test_finetuning_description_names_the_mode(configs, mode):
    cfg = configs["configs/default.yaml"]
    cfg = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, mode=mode))
    text = notebook_text.finetuning_description(cfg)
    assert f"`finetuning.mode = {mode}`" in text
    assert "no augmentation" in text
    assert f"lr x {cfg.finetuning.backbone_lr_scale:g}" in text
    for objective in cfg.finetuning.objectives:
        assert f"{objective}: {len(cfg.finetuning.settings(objective))} point(s)" in text
    if mode == "partial":  # the tumour readout pools layer1 (32^3 crops), so partial mode trains layer1
        assert "the pooled stage (`layer1`)" in text and "last transformer block" in text
        plain = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, readout="global"))
        assert "`layer4`" in notebook_text.finetuning_description(plain)
    assert "`finetuning.readout = tumour`" in text and "byol: `layer1`" in text and "mae: `norm`" in text
    plain = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, readout="global"))
    assert "`finetuning.readout = global`" in notebook_text.finetuning_description(plain)


def test_finetuning_description_follows_the_grid(configs):
    default = notebook_text.finetuning_description(configs["configs/default.yaml"])
    smoke = notebook_text.finetuning_description(configs["configs/smoke.yaml"])
    assert "successive halving: every point trains 5 epochs" in default and "dro: 6 point(s)" in default
    assert "head_l2=1" in default
    assert "every point trains all 2 epochs" in smoke and "dro: 1 point(s)" in smoke


def test_ssl_facts(configs):
    cfg = configs["configs/default.yaml"]
    facts = notebook_text.ssl_loss_facts(cfg)
    assert facts["dino"]["chance"] == pytest.approx(math.log(cfg.pretraining.dino_out_dim))
    assert facts["moco"]["chance"] == pytest.approx(math.log(cfg.pretraining.moco_memory_bank + 1))
    assert facts["mae"]["view"] == tuple(cfg.pretraining.mae_view_size)
    text = notebook_text.pretraining_description(cfg)
    assert "teacher temperature constant 0.02" in text and "*sharper*" in text  # default config: constant, sharp
    assert "whole volumes of 32^3" in text and f"(MAE {cfg.pretraining.mae_epochs})" in text
    smoke = notebook_text.pretraining_description(configs["configs/smoke.yaml"])
    assert "raised linearly from 0.04 to 0.07" in smoke and "crops of 16^3" in smoke


def test_gradcam_layer_is_the_stage_code_choice(configs):
    from nrfm.models.backbones import build_backbone
    from nrfm.models.readout import readout_backbone

    cfg = configs["configs/default.yaml"]
    assert cfg.finetuning.readout == "tumour"
    for method in cfg.pretraining.methods:
        info = notebook_text.gradcam_layer(cfg, method)
        backbone = readout_backbone(build_backbone(method, cfg.pretraining, cfg.preprocessing.crop_size), "tumour")
        layer, _ = backbone.gradcam_target()
        names = {id(m): n for n, m in backbone.named_modules()}
        assert info["name"] == "backbone." + names[id(layer)], method
        partial = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, mode="partial"))
        # the tumour readout pools the Grad-CAM stage, which partial mode trains (ResNet layer1; the ViT's last block)
        assert notebook_text.gradcam_layer(partial, method)["trained"]
        assert "tumour sub-region" in notebook_text.gradcam_layer_description(cfg, method)
        if method == "mae":
            assert info["name"] == "backbone.inner.vit.norm" and info["grid"] == (4, 4, 4)
            assert not info["trained"]  # the default config fine-tunes the heads alone (linear mode)
        else:  # 32^3 crops, stride-2 stem: layer1 (8^3) is the deepest stage with >= 8 voxels a side
            assert info["name"] == "backbone.inner.net.layer1" and info["stage_index"] == 1
            assert info["grid"] == (8, 8, 8)
            assert not info["trained"]  # linear trains no backbone layer
            assert "EARLIEST" in notebook_text.gradcam_layer_description(cfg, method)
    plain = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, readout="global"))
    assert notebook_text.gradcam_layer(plain, "byol")["name"] == "backbone.net.layer1"
    assert "tumour sub-region" not in notebook_text.gradcam_layer_description(plain, "byol")
    full = cfg.replace(finetuning=dataclasses.replace(cfg.finetuning, mode="full"))
    assert notebook_text.gradcam_layer(full, "byol")["trained"]


def test_gradcam_layer_follows_the_override(configs):
    cfg = configs["configs/default.yaml"]
    cfg = cfg.replace(analyses=dataclasses.replace(cfg.analyses, gradcam_target_layer="backbone.net.layer4"),
                      finetuning=dataclasses.replace(cfg.finetuning, mode="partial", readout="global"))
    info = notebook_text.gradcam_layer(cfg, "byol")
    assert info["name"] == "backbone.net.layer4" and info["trained"] and info["grid"] == (1, 1, 1)


def test_shortcut_and_verdict_text(configs):
    from nrfm.eval import claims
    from nrfm.synth import scenarios

    cfg = configs["configs/default.yaml"]
    text = notebook_text.shortcut_description(cfg)
    assert f"{scenarios.CUE_AGREEMENT:.0%}" in text and "reversed" in text
    control = cfg.replace(cohort=dataclasses.replace(cfg.cohort, synth_scenario="no-shift"))
    assert "`no-shift`" in notebook_text.shortcut_description(control)
    assert f"p < {claims.ALPHA:g}" in notebook_text.verdict_rules_description()


def test_notebooks_use_the_generated_text():
    sources = {p.name[:2]: "\n".join(c.source for c in _cells(p) if c.cell_type == "code") for p in NOTEBOOKS}
    assert "pretraining_description(ctx.config)" in sources["01"] and "monitor_description(ctx.config)" in sources["01"]
    assert "finetuning_description(ctx.config)" in sources["02"]
    assert "gradcam_layer_description(ctx.config" in sources["05"]
    assert "verdict_rules_description()" in sources["06"]
    assert "claims.rule_table()" in sources["06"] and "claims.wording_table()" in sources["06"]


def test_gradcam_layer_leaves_the_rng_alone(configs):
    """The notebook cell runs before the Grad-CAM stage: building the probe network must not move torch's RNG."""
    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for method in ("byol", "mae"):
        notebook_text.gradcam_layer(configs["configs/default.yaml"], method)
    assert torch.equal(torch.rand(3), expected)
