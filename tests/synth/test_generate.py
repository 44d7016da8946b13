"""Tests for the synthetic cohort (nrfm/synth*.py): files, determinism, planted structure, bad input.

The image cohort is the smoke profile, generated once per module; the statistical checks of the marker and
survival model use large marker-only samples (no images), so their tolerances can be tight.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from nrfm.config import BINARY_ENDPOINTS, ENDPOINTS
from nrfm.errors import ConfigError, NrfmError, RunError
from nrfm.synth import generate as synth
from nrfm.synth.generate import MANIFEST_COLUMNS, PROFILES, generate_cohort, parse_site_spec, site_intensity_table
from nrfm.synth.anatomy import GHOST, render_subject, site_grid
from nrfm.synth.markers import (AGE, FEATURES, KI67_LOG_SD, KI67_MEDIAN, MARKER_P, SURVIVAL, TP53_IHC, _Z,
                                configurations, marginal_prevalence, oracle_posterior, sample_patients)
from nrfm.synth.sites import KNOWN_SITES, check_template

COMMON = ("mgmt", "idh", "egfr", "tp53", "cdkn2ab", "tert")


@pytest.fixture(scope="module")
def cohort(smoke_cohort) -> Path:
    """The test run's shared smoke cohort (tests/conftest.py), generated with the default workers."""
    return smoke_cohort


@pytest.fixture(scope="module")
def big() -> dict:
    """20000 marker-only patients per known site."""
    return {name: sample_patients(site, 20000, np.random.default_rng(7)) for name, site in KNOWN_SITES.items()}


@pytest.fixture(scope="module")
def big_post(big) -> dict:
    return {name: oracle_posterior(df, KNOWN_SITES[name]) for name, df in big.items()}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_and_manifest_schema(cohort):
    assert sorted(p.name for p in cohort.iterdir()) == ["cohort.json", "images", "manifest.csv", "oracle.csv",
                                                        "oracle_auc.csv", "oracle_cindex.csv"]
    man = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    assert tuple(man.columns) == MANIFEST_COLUMNS
    assert man["subject_id"].is_unique and set(man["split"]) == {"", "test"}
    tests = man[man["split"] == "test"]  # the smoke profile fixes 4 test patients per site
    assert (tests.groupby("site")["patient_id"].nunique() == 4).all()
    assert 36 <= len(man) <= 48 and set(man["site"]) == {"UCSF", "UPenn", "CUIMC"}
    for col in ("t1", "t1c", "t2", "flair", "seg"):
        assert all(not Path(p).is_absolute() and (cohort / p).is_file() for p in man[col])
    for e in BINARY_ENDPOINTS:
        assert set(man[e]) <= {"0", "1", ""}
    first = man["subject_id"].str.endswith("_01")  # survival on each patient's first exam only
    assert (man.loc[first, "os_days"].astype(int) > 0).all() and set(man.loc[first, "os_event"]) <= {"0", "1"}
    assert (man.loc[~first, ["os_days", "os_event"]] == "").all().all()
    assert set(man["grade"]) <= {"2", "3", "4"} and set(man["sex"]) <= {"M", "F"}
    oracle = pd.read_csv(cohort / "oracle.csv")
    assert len(oracle) == len(man) * (len(ENDPOINTS) + 1)  # ten endpoints + the artifact flag
    wide = oracle.pivot(index="subject_id", columns="endpoint", values="value").loc[man["subject_id"]]
    assert wide[list(BINARY_ENDPOINTS)].stack().between(0, 1).all()
    known = man["ki67"] != ""  # the oracle's true value is what the manifest reports, where it reports it
    np.testing.assert_allclose(man.loc[known, "ki67"].astype(float), wide["ki67"].to_numpy()[known], atol=0.051)


def test_same_seed_same_bytes_regardless_of_workers(cohort, tmp_path):
    again = tmp_path / "again"
    generate_cohort(again, profile="smoke", seed=0, progress=False, workers=1)
    assert _digest(again) == _digest(cohort)


def test_different_seed_differs(tmp_path):
    a = generate_cohort(tmp_path / "a", profile="smoke", seed=1, sites="UCSF:3,CUIMC:2", progress=False)
    b = generate_cohort(tmp_path / "b", profile="smoke", seed=2, sites="UCSF:3,CUIMC:2", progress=False)
    assert a.manifest_path.read_bytes() != b.manifest_path.read_bytes()
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da.keys() == db.keys() and all(da[k] != db[k] for k in da if k.endswith("t1.nii.gz"))


def test_configured_prevalence_matches_hand_computation():
    """marginal_prevalence (enumeration) against a straight-line calculation from the tables."""
    for site in KNOWN_SITES.values():
        p_cls = [1 - site.p_idh_mutant, site.p_idh_mutant * (1 - site.p_codel_given_idh),
                 site.p_idh_mutant * site.p_codel_given_idh]
        expect = {"idh": site.p_idh_mutant, "codel_1p19q": p_cls[2]}
        for m in ("egfr", "atrx", "tp53", "cdkn2ab", "tert", "mgmt"):
            total = 0.0
            for k in range(3):
                for g in range(3):
                    q = site.p_mgmt_idh_wildtype if (m == "mgmt" and k == 0) else MARKER_P[m][k][g]
                    total += p_cls[k] * site.grade_given_class[k][g] * q
            expect[m] = total
        got = marginal_prevalence(site)
        for m, v in expect.items():
            assert got[m] == pytest.approx(v, abs=1e-12), (site.name, m)


def test_sampled_prevalence_within_tolerance(big):
    for name, df in big.items():
        cfg = marginal_prevalence(KNOWN_SITES[name])
        for e in BINARY_ENDPOINTS:
            se = np.sqrt(cfg[e] * (1 - cfg[e]) / len(df))
            assert abs(df[e].mean() - cfg[e]) < 4 * se + 1e-9, (name, e)
    # the published cohorts' shape (data-formats.md)
    assert 0.17 < big["UCSF"]["idh"].mean() < 0.24 and big["UPenn"]["idh"].mean() < 0.05
    assert 0.75 < (big["UCSF"]["grade"] == 4).mean() < 0.85 and (big["UPenn"]["grade"] == 4).all()
    for g, median in KI67_MEDIAN.items():
        assert big["UCSF"].loc[big["UCSF"]["grade"] == g, "ki67"].median() == pytest.approx(median, rel=0.1)


def test_codel_never_without_idh(big, cohort):
    x, prior = configurations(KNOWN_SITES["UCSF"])
    assert prior[(x[:, 2] == 1) & (x[:, 1] + x[:, 2] == 0)].sum() == 0
    for df in big.values():
        assert not ((df["codel_1p19q"] == 1) & (df["idh"] == 0)).any()
    man = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    assert not ((man["codel_1p19q"] == "1") & (man["idh"] == "0")).any()


def test_marker_dependencies(big):
    df = pd.concat(big.values())
    astro = (df["idh"] == 1) & (df["codel_1p19q"] == 0)
    assert df.loc[astro, "atrx"].mean() > 3 * df.loc[~astro, "atrx"].mean()
    for m in ("egfr", "cdkn2ab"):
        assert df.loc[df["idh"] == 0, m].mean() > 2.5 * df.loc[df["idh"] == 1, m].mean()
    assert df.loc[df["idh"] == 1, "mgmt"].mean() > df.loc[df["idh"] == 0, "mgmt"].mean()


def test_missing_labels_realistic():
    exams, _ = synth.exam_table(parse_site_spec("UPenn:3000"), seed=0)
    assert exams["observed_mgmt"].mean() == pytest.approx(0.5, abs=0.03)
    assert exams["patient_id"].nunique() == 3000 and len(exams) > 3000  # follow-up exams share patient_id
    assert exams.loc[exams["exam"] == 2, "os_days"].isna().all() and exams.loc[exams["exam"] == 1, "os_days"].notna().all()
    # 1p/19q is tested mainly in IDH-mutant tumours: missing not at random
    exams, _ = synth.exam_table(parse_site_spec("UCSF:4000"), seed=0)
    tested = exams.groupby("idh")["observed_codel_1p19q"].mean()
    assert tested[1] == pytest.approx(synth.CODEL_TESTED_IDH_MUTANT, abs=0.04)
    assert tested[0] == pytest.approx(synth.CODEL_TESTED_IDH_WILDTYPE_MAX, abs=0.03)


def test_survival_hazard_ordering_and_coefficients(big):
    from lifelines import CoxPHFitter

    df = big["UCSF"]
    assert df.loc[df["idh"] == 1, "os_days"].median() > df.loc[df["idh"] == 0, "os_days"].median()
    X = pd.DataFrame({"age10": df["age_latent"] / 10, "idh": df["idh"], "mgmt": df["mgmt"],
                      "grade2": (df["grade"] == 2) * 1, "grade3": (df["grade"] == 3) * 1, "size": df["f_size"],
                      "necrosis": df["f_necrosis"], "T": df["os_days"], "E": df["os_event"]})
    cph = CoxPHFitter().fit(X, "T", "E")
    truth = {"age10": SURVIVAL["age_per_10y"], "idh": SURVIVAL["idh"], "mgmt": SURVIVAL["mgmt"],
             "grade2": SURVIVAL["grade2"], "grade3": SURVIVAL["grade3"], "size": SURVIVAL["size"],
             "necrosis": SURVIVAL["necrosis"]}
    for k, v in truth.items():
        assert cph.params_[k] == pytest.approx(v, abs=0.12), k


def _posterior_by_hand(row: dict, site) -> dict[str, float]:
    """Straight-line Bayes rule over every configuration, from the published tables."""
    p_cls = [1 - site.p_idh_mutant, site.p_idh_mutant * (1 - site.p_codel_given_idh),
             site.p_idh_mutant * site.p_codel_given_idh]
    six = ("mgmt", "egfr", "atrx", "tp53", "cdkn2ab", "tert")
    joint = {(1, 1): 0.65, (1, 0): 0.05, (0, 1): 0.15, (0, 0): 0.15}  # P(atrx, tp53 | astrocytoma), module docs
    num, den = dict.fromkeys(BINARY_ENDPOINTS, 0.0), 0.0
    for k, g in itertools.product(range(3), range(3)):
        for bits in itertools.product((0, 1), repeat=6):
            prior = p_cls[k] * site.grade_given_class[k][g]
            for m, b in zip(six, bits):
                if k == 1 and m in ("atrx", "tp53"):
                    continue
                q = site.p_mgmt_idh_wildtype if (m == "mgmt" and k == 0) else MARKER_P[m][k][g]
                prior *= q if b else 1 - q
            if k == 1:
                prior *= joint[(bits[2], bits[3])]
            if prior == 0:
                continue
            labels = dict(zip(six, bits), idh=int(k > 0), codel_1p19q=int(k == 2))
            x = {"one": 1, "astro": k == 1, "oligo": k == 2, "grade3": g == 1, "grade4": g == 2, **labels}
            lik = 1.0
            for name, (coef, sd, cont) in FEATURES.items():
                mean, var = sum(w * x[c] for c, w in coef.items()), sd ** 2
                if cont is not None:
                    cname, w = cont
                    centre, scale = _Z[cname]
                    if cname == "ki67":
                        mu, s = np.log(KI67_MEDIAN[g + 2]), KI67_LOG_SD
                    elif cname == "tp53_ihc":
                        mu, s = np.log(TP53_IHC[labels["tp53"]][0]), TP53_IHC[labels["tp53"]][1]
                    else:
                        mu, s = AGE[int(k > 0)]
                    mean, var = mean + w * (mu - centre) / scale, var + (w * s / scale) ** 2
                lik *= math.exp(-0.5 * (row[f"f_{name}"] - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)
            p_art = site.artifact_p[labels[site.artifact_endpoint]]
            lik *= p_art if row["artifact"] == 1 else 1 - p_art
            den += prior * lik
            for e in BINARY_ENDPOINTS:
                num[e] += prior * lik * labels[e]
    return {e: num[e] / den for e in BINARY_ENDPOINTS}


def test_oracle_posterior_exact_and_calibrated(big, big_post):
    site = KNOWN_SITES["UCSF"]
    df, post = big["UCSF"], big_post["UCSF"]
    for i in (0, 1, 2):
        by_hand = _posterior_by_hand(df.iloc[i].to_dict(), site)
        for e in BINARY_ENDPOINTS:
            assert post[e].iloc[i] == pytest.approx(by_hand[e], rel=1e-6, abs=1e-12)
    for e in ("idh", "mgmt", "egfr"):  # a posterior is calibrated: mean label per probability decile
        bins = pd.qcut(post[e], 10, duplicates="drop")
        calib = pd.DataFrame({"p": post[e], "y": df[e]}).groupby(bins, observed=True).mean()
        assert (calib["p"] - calib["y"]).abs().max() < 0.04, e


def test_oracle_auc_strictly_between_half_and_one(big, big_post, cohort):
    for name, df in big.items():
        post = big_post[name]
        for e in COMMON:
            assert 0.5 < roc_auc_score(df[e], post[e]) < 1.0, (name, e)
    table = pd.read_csv(cohort / "oracle_auc.csv")
    assert set(table["site"]) == {"UCSF", "UPenn", "CUIMC", "all"}
    rows = table[(table["site"] == "all") & table["endpoint"].isin(COMMON)]
    assert len(rows) == len(COMMON) and (rows["auc"] > 0.5).all() and (rows["auc"] <= 1.0).all()


def test_templates_artifact_is_label_free(big):
    """The site templates carry no shortcut; the scenario plants it (tests below)."""
    for name, df in big.items():
        for e in ("mgmt", "egfr"):
            rate = df.groupby(e)["artifact"].mean()
            assert abs(rate[1] - rate[0]) < 0.03, (name, e)


def test_who2021_cdkn2ab_and_atrx_tp53_coupling(big):
    df = pd.concat(big.values())
    allowed = (df["grade"] == 4) & (df["codel_1p19q"] == 0)  # IDH-wt GBM or grade-4 IDH-mutant astrocytoma
    assert df.loc[~allowed, "cdkn2ab"].sum() == 0 and df.loc[allowed, "cdkn2ab"].mean() > 0.4
    astro = df[(df["idh"] == 1) & (df["codel_1p19q"] == 0)]
    assert astro["atrx"].mean() == pytest.approx(0.70, abs=0.03) and astro["tp53"].mean() == pytest.approx(0.80, abs=0.03)
    assert astro[["atrx", "tp53"]].corr().iloc[0, 1] > 0.4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latent_dro_gain_site_shift_vs_no_shift(seed):
    """The plant at the latent level (no rendering): group DRO beats ERM at the smallest site only under site-shift."""
    exams, check = synth.latent_experiment("default", seed, "site-shift")
    assert check["latent_dro_gain"] >= 0.05, check
    control, check0 = synth.latent_experiment("default", seed, "no-shift")
    assert abs(check0["latent_dro_gain"]) < 0.02, check0
    # same sizes, prevalences, splits and cue rate; only the mechanism differs
    assert exams.groupby(["site", "split"]).size().equals(control.groupby(["site", "split"]).size())
    for site in ("UCSF", "UPenn", "CUIMC"):
        a, b = exams[exams["site"] == site], control[control["site"] == site]
        assert abs(a["artifact"].mean() - b["artifact"].mean()) < 0.08
        assert abs(a["egfr"].mean() - b["egfr"].mean()) < 0.08
    # the cue agrees with EGFR at the large sites and is reversed at the smallest
    rate = exams.groupby(["site", "egfr"])["artifact"].mean()
    assert rate["UCSF", 1] - rate["UCSF", 0] > 0.5 and rate["UPenn", 1] - rate["UPenn", 0] > 0.5
    assert rate["CUIMC", 0] - rate["CUIMC", 1] > 0.5
    rate0 = control.groupby(["site", "egfr"])["artifact"].mean()
    assert all(abs(rate0[s, 1] - rate0[s, 0]) < 0.2 for s in ("UCSF", "UPenn", "CUIMC"))  # sampling noise only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_profile_fixed_test_sets_can_decide(seed):
    exams, _ = synth.latent_experiment("default", seed, "site-shift")
    floors = synth.held_out_floor_table(exams, ["UCSF", "UPenn", "CUIMC"])
    per_site = floors.groupby("site")[["test_exams", "test_events"]].first()
    assert (per_site["test_exams"] >= 150).all() and (per_site["test_events"] >= 40).all()
    occurring = floors[floors["exists"]]  # every marker reported positive at the site, rare ones included
    assert (occurring["n_pos"] >= 15).all(), occurring
    assert set(floors.loc[~floors["exists"], "endpoint"]) <= {"codel_1p19q"}  # UPenn: glioblastoma only
    if seed != 0:  # the rest once
        return
    train_pool = exams[exams["split"] != "test"].groupby("site")["patient_id"].nunique()
    enriched = exams[exams["enriched_for"] != ""]
    assert (enriched["split"] == "test").all() and (enriched["exam"] == 1).all()
    assert all(row[row["enriched_for"]] == 1 and row[f"observed_{row['enriched_for']}"]
               for _, row in enriched.iterrows())
    # the enrichment adds test exams and changes nothing else: the natural cohort is the one drawn without it
    prof = synth.PROFILES["default"]
    natural, _ = synth.exam_table(synth.scenario_sites(prof.sites, "site-shift", prof)[0], 0, 160,
                                  test_by_site={"CUIMC": 280})
    kept = exams[exams["enriched_for"] == ""].drop(columns="enriched_for").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, natural.drop(columns="enriched_for").reset_index(drop=True))
    assert train_pool["CUIMC"] <= 70 and train_pool["UCSF"] > 2 * train_pool["CUIMC"]  # imbalanced as in the paper
    test_patients = natural[natural["split"] == "test"].groupby("site")["patient_id"].nunique()
    assert test_patients.to_dict() == {"CUIMC": 280, "UCSF": 160, "UPenn": 160}  # the claims' site gets more
    cidx = synth.oracle_cindex_table(exams, ["UCSF", "UPenn", "CUIMC"])
    assert (cidx["c_index"] > 0.55).all()


def test_ghost_artifact_is_a_shifted_copy_of_the_head():
    """With the same generators, ghost - clean is the clean image shifted by half the phase-encoding field of view
    at GHOST's amplitude (before blur and noise, so compared by correlation), and the cohort's ghost score sees it."""
    from nrfm.data.cohort import _ghost_score

    site = replace(KNOWN_SITES["UPenn"], noise=0.0, bias=0.0)
    grid = site_grid(site.orientation, site.spacing)
    f = {n: 0.0 for n in FEATURES}
    clean, _ = render_subject(site, grid, f, False, np.random.default_rng(3), np.random.default_rng(4))
    ghost, _ = render_subject(site, grid, f, True, np.random.default_rng(3), np.random.default_rng(4))
    brain = clean["t1"] > 0
    axis = site.phase_axis
    shifted = np.roll(clean["t1"] - site.offset[0] * brain, grid.shape[axis] // 2, axis=axis)
    excess = (ghost["t1"] - clean["t1"])[brain]
    assert np.corrcoef(excess, shifted[brain])[0, 1] > 0.9
    ratio = np.median(excess[shifted[brain] > 0] / shifted[brain][shifted[brain] > 0])
    assert ratio == pytest.approx(GHOST["amplitude"], rel=0.3)
    assert _ghost_score(ghost["t1"], axis) > _ghost_score(clean["t1"], axis) + 0.2


def test_site_intensity_differences_in_raw_images(cohort):
    table = site_intensity_table(cohort / "manifest.csv", "t1")
    means = table.groupby("site")["mean"].mean()
    assert means.max() / means.min() > 1.5
    within = table.groupby("site")["mean"].std() / means
    assert (within < 0.2).all()  # the difference is the site, not noise between exams


def test_orientation_spacing_and_world_coordinates(cohort):
    man = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    codes, zooms = {}, {}
    for site, rows in man.groupby("site"):
        img = nib.load(cohort / rows["t1"].iloc[0])
        seg = nib.load(cohort / rows["seg"].iloc[0])
        assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, seg.affine)
        codes[site], zooms[site] = nib.aff2axcodes(img.affine), tuple(np.round(img.header.get_zooms(), 2))
        data = np.asarray(img.dataobj)
        ijk = np.argwhere(data > 0)
        centroid = nib.affines.apply_affine(img.affine, ijk).mean(0)
        assert np.linalg.norm(centroid - np.array([0.0, -22.0, 9.5])) < 6.0, (site, centroid)  # MNI brain centre
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels > 0).any()
        assert (data[labels > 0] > 0).all()  # the tumour lies inside the brain
    assert len(set(codes.values())) == 3 and len(set(zooms.values())) == 3


def test_phenotype_signal_in_images(cohort):
    man = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    rows = man[man["idh"] != ""]
    enhancing = []
    for p in rows["seg"]:
        seg = np.asarray(nib.load(cohort / p).dataobj)
        enhancing.append((seg == 4).sum() / max(1, np.isin(seg, (1, 4)).sum()))
    enhancing = np.array(enhancing)
    idh = rows["idh"].to_numpy() == "1"
    assert idh.sum() >= 3 and enhancing[~idh].mean() > enhancing[idh].mean() + 0.2


@pytest.mark.parametrize("kwargs, match", [
    ({"profile": "huge"}, "unknown profile 'huge'"),
    ({"seed": -1}, "non-negative integer"),
    ({"seed": "3"}, "non-negative integer"),
    ({"seed": True}, "non-negative integer"),
    ({"sites": "UCSF=3"}, "is not NAME:COUNT"),
    ({"sites": "UCSF:0"}, r"COUNT must be in \[1, 100000\]"),
    ({"sites": "UCSF:3,ucsf:2"}, "given twice"),
    ({"sites": ""}, "empty site spec"),
])
def test_bad_input_one_clear_line_and_nothing_left(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        generate_cohort(tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_cohort_refused_unless_force(tmp_path):
    out = tmp_path / "c"
    first = generate_cohort(out, profile="smoke", sites="CUIMC:2", progress=False)
    before = first.manifest_path.read_bytes()
    with pytest.raises(RunError, match="already holds a cohort"):
        generate_cohort(out, profile="smoke", sites="CUIMC:3", progress=False)
    assert first.manifest_path.read_bytes() == before
    generate_cohort(out, profile="smoke", sites="CUIMC:3", progress=False, force=True)
    assert len(pd.read_csv(out / "manifest.csv")) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp or old folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty"):
        generate_cohort(other, profile="smoke", sites="CUIMC:2", progress=False, force=True)
    assert (other / "x.txt").read_text() == "mine"


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synth, "oracle_auc_table", boom)
    with pytest.raises(RuntimeError):
        generate_cohort(tmp_path / "out", profile="smoke", sites="CUIMC:2", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_profiles_and_generic_site():
    assert set(PROFILES) == {"smoke", "default", "large"}
    sizes = {k: sum(n for _, n in parse_site_spec(p.sites)) for k, p in PROFILES.items()}
    assert 36 <= sizes["smoke"] <= 48 and 950 <= sizes["default"] <= 1000 and 1400 <= sizes["large"] <= 1700
    (a, _), (b, _) = parse_site_spec("MGH:5, Mayo:4")
    assert a.generic and b.generic and (a.orientation, a.spacing, a.scale) != (b.orientation, b.spacing, b.scale)
    assert parse_site_spec("ucsf:3")[0][0].name == "UCSF"
    for template in list(KNOWN_SITES.values()) + [a, b]:
        check_template(template)
    assert issubclass(ConfigError, NrfmError)


def test_runs_keep_the_fixed_test_set_and_split_the_rest_by_patient():
    from nrfm.data.splits import assign_splits, check_no_patient_leak

    exams, _ = synth.latent_experiment("default", 0, "site-shift")
    man = synth._manifest(exams)
    man["split"] = man["split"].fillna("")
    fixed = man["split"] == "test"
    for seed in (0, 1):
        out = assign_splits(man, seed=seed, fractions=(0.6, 0.2, 0.2), min_val_patients=30)
        check_no_patient_leak(out)
        assert (out.loc[fixed, "split"] == "test").all() and set(out.loc[~fixed, "split"]) == {"train", "val"}
        val = out[out["split"] == "val"].groupby("site")["patient_id"].nunique()
        train = out[out["split"] == "train"].groupby("site")["patient_id"].nunique()
        assert val["CUIMC"] == 30 and 30 <= train["CUIMC"] <= 40  # a small, imbalanced training site
        assert val["UCSF"] == pytest.approx(0.25 * (val["UCSF"] + train["UCSF"]), abs=1)


def test_cli_scenario_recorded_in_cohort_json(tmp_path, capsys):
    import json

    from nrfm.cli import main

    for scenario in ("no-shift", "site-shift"):
        out = tmp_path / scenario
        assert main(["synth", "--out", str(out), "--profile", "smoke", "--sites", "UCSF:4,CUIMC:3",
                     "--scenario", scenario, "--quiet"]) == 0
        info = json.loads((out / "cohort.json").read_text())
        assert info["scenario"] == scenario and info["scenario_plan"]["smallest_site"] == "CUIMC"
        assert "latent_dro_gain" in info
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "x"), "--scenario", "both"])
    with pytest.raises(ConfigError, match="unknown scenario"):
        generate_cohort(tmp_path / "y", profile="smoke", scenario="both", progress=False)


def test_site_shift_changes_phenotype_and_hazard_at_the_smallest_site_only():
    from lifelines import CoxPHFitter

    shifted, plan = synth.scenario_sites("UCSF:10,UPenn:10,CUIMC:5", "site-shift")
    control, _ = synth.scenario_sites("UCSF:10,UPenn:10,CUIMC:5", "no-shift")
    assert plan["smallest_site"] == "CUIMC"
    # the plant goes to the smallest TRAINING site: the most patients, the fewest left once the test set is taken
    prof = synth.PROFILES["default"]
    assert synth.scenario_sites(prof.sites, "site-shift")[1]["smallest_site"] == "UPenn"  # by patients alone
    assert synth.scenario_sites(prof.sites, "site-shift", prof)[1]["smallest_site"] == "CUIMC"
    assert prof.test_counts(parse_site_spec(prof.sites)) == {"UCSF": 160, "UPenn": 160, "CUIMC": 280}
    for (site, _), (plain, _) in zip(shifted, control):
        df = sample_patients(site, 20000, np.random.default_rng(3))
        base = sample_patients(plain, 20000, np.random.default_rng(3))
        edema_gap = df.groupby("egfr")["f_edema"].mean().diff().iloc[-1]  # includes grade / class confounding
        base_gap = base.groupby("egfr")["f_edema"].mean().diff().iloc[-1]
        if site.name == "CUIMC":
            assert base_gap - edema_gap == pytest.approx(0.7, abs=0.05)  # EGFR without its oedema term there
            X = pd.DataFrame({"age10": df["age_latent"] / 10, "idh": df["idh"], "mgmt": df["mgmt"],
                              "grade2": (df["grade"] == 2) * 1, "grade3": (df["grade"] == 3) * 1,
                              "size": df["f_size"], "necrosis": df["f_necrosis"], "T": df["os_days"], "E": df["os_event"]})
            assert CoxPHFitter().fit(X, "T", "E").params_["size"] == pytest.approx(0.6, abs=0.1)
        else:
            assert edema_gap == pytest.approx(base_gap, abs=1e-9)  # same draws, same phenotype


def test_cohort_folder_is_named_by_the_generator_source(monkeypatch):
    """A changed generator draws a new cohort instead of silently reusing one made by older code."""
    from nrfm.config_loading import load_config
    from nrfm.pipeline import context
    from nrfm.synth.generate import generator_fingerprint

    fingerprint = generator_fingerprint()
    assert len(fingerprint) == 8 and int(fingerprint, 16) >= 0 and fingerprint == generator_fingerprint()
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
    path = context.cohort_manifest_path(cfg)
    assert path.parent.name.endswith(f"-seed{cfg.cohort.synth_seed}-g{fingerprint}")
    monkeypatch.setattr(context, "generator_fingerprint", lambda: "0123abcd")
    assert context.cohort_manifest_path(cfg).parent.name.endswith("-g0123abcd")


def test_fixed_test_sets_leave_patients_for_training():
    from nrfm.synth.exams import fixed_test_counts, fixed_test_size

    assert fixed_test_size(345, 280) == 280 and fixed_test_size(345, 0) == 0
    assert fixed_test_size(100, 280) == 85  # at least 15 % stay for train/val
    assert fixed_test_size(10, 4) == 4 and fixed_test_size(8, 4) == 3 and fixed_test_size(4, 4) == 0  # and five
    sites = parse_site_spec("UCSF:20,CUIMC:40")
    assert fixed_test_counts(sites, 4, {"CUIMC": 30}) == {"UCSF": 4, "CUIMC": 30}
    exams, _ = synth.exam_table(sites, 0, 4, test_by_site={"CUIMC": 30})
    first = exams[exams["exam"] == 1]
    assert first[first["split"] == "test"].groupby("site").size().to_dict() == {"CUIMC": 30, "UCSF": 4}
