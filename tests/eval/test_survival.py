"""Survival: c-index convention, Breslow partial likelihood, DRO Cox head, the survival table and KM figure."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from nrfm.config import Config
from nrfm.pipeline.context import RunContext
from nrfm.eval.survival import (RISK_COLUMNS, DROCoxHead, c_index, cox_partial_nll_per_sample, evaluate_risk,
                           run_survival_stage, site_cox_losses, survival_cohort, survival_risk_path)


def harrell_straight_line(time, event, risk):
    """Harrell's C by the definition: i died first (or died at the time j was censored); risk ties count 1/2."""
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_c_index_matches_lifelines_and_definition_on_random_data():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(0)
    time = rng.exponential(100, size=80).round()  # rounding makes some tied times
    event = rng.integers(0, 2, size=80)
    risk = rng.normal(size=80).round(1)  # and some tied risks
    assert c_index(time, event, risk) == pytest.approx(concordance_index(time, -risk, event))
    assert c_index(time, event, risk) == pytest.approx(harrell_straight_line(time, event, risk))


def test_c_index_hand_checked_example():
    # times 1,2,3,4 all events, risks 4,3,1,2: of the 6 pairs only (3,4) is discordant (t3 < t4 but r3 < r4),
    # so C = 5/6. Censoring subject 1 (time 1) removes its 3 pairs: 2 concordant of 3 left, C = 2/3.
    assert c_index([1, 2, 3, 4], [1, 1, 1, 1], [4, 3, 1, 2]) == pytest.approx(5 / 6)
    assert c_index([1, 2, 3, 4], [0, 1, 1, 1], [4, 3, 1, 2]) == pytest.approx(2 / 3)
    # a perfect risk score (higher risk dies first) is 1, not 0: the sign convention is handled
    assert c_index([1, 2, 3], [1, 1, 1], [3, 2, 1]) == 1.0
    assert np.isnan(c_index([1, 2], [0, 0], [1, 2]))  # no comparable pair


def breslow_straight_line(risk, time, event, groups):
    total = 0.0
    for i in range(len(time)):
        if event[i]:
            denominator = sum(np.exp(risk[j]) for j in range(len(time))
                              if groups[j] == groups[i] and time[j] >= time[i])
            total += np.log(denominator) - risk[i]
    return total


def test_partial_likelihood_matches_breslow_loop_with_ties():
    rng = np.random.default_rng(1)
    time = rng.integers(1, 8, size=30).astype(float)  # many ties
    event = rng.integers(0, 2, size=30)
    groups = rng.integers(0, 3, size=30)
    risk = rng.normal(size=30)
    per = cox_partial_nll_per_sample(torch.tensor(risk), torch.tensor(time), torch.tensor(event), torch.tensor(groups))
    assert float(per.sum()) == pytest.approx(breslow_straight_line(risk, time, event, groups))
    assert (per[torch.tensor(event) == 0] == 0).all()


def test_partial_likelihood_per_site_matches_lifelines_stratified_cox():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(2)
    n = 90
    x = rng.normal(size=(n, 2))
    groups = np.repeat([0, 1, 2], 30)
    time = rng.exponential(np.exp(-x @ [0.8, -0.5])) * 100 + rng.uniform(0, 1e-3, n)  # distinct times: Efron = Breslow
    event = (rng.uniform(size=n) < 0.7).astype(int)
    frame = pd.DataFrame(x, columns=["a", "b"]).assign(T=time, E=event, site=groups)
    cph = CoxPHFitter().fit(frame, "T", "E", strata=["site"])
    risk = torch.tensor(x @ cph.params_[["a", "b"]].to_numpy())
    per = cox_partial_nll_per_sample(risk, torch.tensor(time), torch.tensor(event), torch.tensor(groups))
    assert -float(per.sum()) == pytest.approx(cph.log_likelihood_, rel=1e-6)


def test_erm_baseline_is_lifelines_cox_stratified_by_site():
    from lifelines import CoxPHFitter

    from nrfm.eval.survival import _fit_coxph

    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 2))
    groups = np.repeat([0, 1, 2], 40)
    time = rng.exponential(np.exp(-x @ [0.7, 0.0]) * np.array([50, 200, 800])[groups])  # site baselines differ
    event = (rng.uniform(size=120) < 0.8).astype(int)
    risk = _fit_coxph(x, time, event, groups, penalizer=0.1)
    frame = pd.DataFrame(x, columns=["x0", "x1"]).assign(T=time, E=event, site=groups)
    stratified = CoxPHFitter(penalizer=0.1).fit(frame, "T", "E", strata=["site"]).params_.to_numpy()
    pooled = CoxPHFitter(penalizer=0.1).fit(frame.drop(columns="site"), "T", "E").params_.to_numpy()
    assert risk(x) == pytest.approx(x @ stratified)
    assert not np.allclose(stratified, pooled, atol=1e-3)


def test_dro_cox_head_with_one_site_is_the_cox_mle():
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 3))
    time = rng.exponential(np.exp(-x @ [1.0, -0.5, 0.0])) * 100
    event = (rng.uniform(size=120) < 0.8).astype(int)
    head = DROCoxHead(penalizer=0.0, steps=600, lr=0.05).fit(x, time, event, np.zeros(120, int))
    cph = CoxPHFitter().fit(pd.DataFrame(x, columns=list("abc")).assign(T=time, E=event), "T", "E")
    assert head.coef_ == pytest.approx(cph.params_.to_numpy(), abs=2e-3)
    assert head.group_weights_ == pytest.approx([1.0])


def test_dro_cox_head_upweights_the_hard_site():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 2))
    groups = np.repeat([0, 1], 100)
    beta = np.where(groups[:, None] == 0, [1.5, 0.0], [0.0, 0.3])  # site 1 is hard to rank
    time = rng.exponential(np.exp(-(x * beta).sum(1))) * 100
    event = np.ones(200, int)
    head = DROCoxHead(penalizer=0.01, steps=300, lr=0.05, eta=0.05).fit(x, time, event, groups)
    assert head.group_weights_.sum() == pytest.approx(1.0) and head.group_weights_[1] > 0.5
    assert np.isfinite(head.loss_history_).all()


def test_dro_weights_stay_near_uniform_for_sites_of_equal_difficulty_and_unequal_size():
    # 30 versus 300 subjects, the same hazard model and event rate: only the size differs. With the raw per-site
    # partial likelihood the big site took ~0.99 of the weight (its loss carries log|risk set| per event); the
    # size-free loss keeps each weight within 0.2 of 1/2 at every seed and their mean within 0.1 (the remaining
    # spread is the small site's sampling noise).
    small = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        groups = np.repeat([0, 1], [30, 300])
        x = rng.normal(size=(330, 3))
        time = rng.exponential(np.exp(-x @ [1.0, -0.5, 0.0])) * 100
        event = (rng.uniform(size=330) < 0.8).astype(int)
        head = DROCoxHead(penalizer=0.1, steps=300, lr=0.05, eta=0.01).fit(x, time, event, groups)
        assert abs(head.group_weights_[0] - 0.5) < 0.2, (seed, head.group_weights_)
        small.append(head.group_weights_[0])
    assert abs(np.mean(small) - 0.5) < 0.1


def test_site_cox_loss_is_the_per_event_likelihood_ratio_to_the_null_model():
    rng = np.random.default_rng(6)
    time = rng.exponential(100, size=40)
    event = rng.integers(0, 2, size=40)
    groups = np.repeat([0, 1], [10, 30])
    risk = rng.normal(size=40)
    loss = site_cox_losses(torch.tensor(risk), torch.tensor(time), torch.tensor(event), torch.tensor(groups))
    for g in (0, 1):
        keep = groups == g
        model = breslow_straight_line(risk[keep], time[keep], event[keep], groups[keep])
        null = breslow_straight_line(np.zeros(keep.sum()), time[keep], event[keep], groups[keep])
        assert float(loss[torch.tensor(keep)].mean()) == pytest.approx((model - null) / event[keep].sum())
    # at the null model every site's loss is 0, whatever its size
    zero = site_cox_losses(torch.zeros(40, dtype=torch.float64), torch.tensor(time), torch.tensor(event),
                           torch.tensor(groups))
    assert float(zero.abs().max()) == 0.0


def test_cohort_is_one_survival_exam_per_patient():
    # patient P1 has a baseline and a follow-up exam that both carry survival (as synthetic cohorts do): counted
    # once, at the baseline; P2's first exam has no survival (importers blank it on follow-ups listed first) and
    # its IDH is known only on its other exam
    man = pd.DataFrame({"patient_id": ["P1", "P1", "P2", "P2", "P3"], "idh": [0, 0, np.nan, 0, 0],
                        "grade": [4, 4, 4, np.nan, 4], "os_days": [300, 200, np.nan, 400, 100],
                        "os_event": [1, 1, np.nan, 0, 1]})
    assert survival_cohort(man).tolist() == [True, False, False, True, True]


def test_cohort_is_idh_wildtype_grade4_with_survival():
    man = pd.DataFrame({"idh": [0, 1, 0, 0, 0, np.nan], "grade": [4, 4, 3, np.nan, 4, 4],
                        "os_days": [100, 100, 100, 50, np.nan, 100], "os_event": [1, 1, 1, 0, 1, 1]})
    assert survival_cohort(man).tolist() == [True, False, False, True, False, False]


def test_too_few_events_is_a_note_not_a_crash():
    row = evaluate_risk(np.array([5.0, 6, 7]), np.array([1, 0, 0]), np.array([1.0, 2, 3]), 0.0, 3, 20)
    assert np.isnan(row["c_index"]) and np.isnan(row["logrank_p"]) and "1 events < survival_min_events=3" in row["note"]


def make_ctx(tmp_path) -> RunContext:
    """Three sites; site C censors almost everyone. The embedding carries the true log-hazard."""
    rng = np.random.default_rng(5)
    cfg = Config()
    cfg = cfg.replace(analyses=dataclasses.replace(cfg.analyses, bootstrap=30, survival_min_events=4,
                                                   survival_dro_steps=100, survival_penalizers=(0.1, 1.0)))
    rows, embs = [], []
    direction = rng.normal(size=12)
    for site, event_rate in (("A", 0.8), ("B", 0.8), ("C", 0.05)):
        for i in range(60):
            z = rng.normal()
            split = ("train", "train", "val", "test")[i % 4]
            rows.append({"subject_id": f"{site}{i}", "patient_id": f"P{site}{i}", "site": site, "split": split,
                         "idh": 0 if i % 10 else 1, "grade": 4 if i % 7 else np.nan, "age": 50 + 10 * rng.normal(),
                         "os_days": float(rng.exponential(300 * np.exp(-2 * z)) + 1),
                         "os_event": int(rng.uniform() < event_rate)})
            embs.append(z * direction + 0.3 * rng.normal(size=12))
    manifest = pd.DataFrame(rows)
    ctx = RunContext(config=cfg, run_dir=tmp_path, manifest=manifest, cohort_dir=tmp_path)
    for stage in ("erm", "dro"):
        np.savez(ctx.artifacts_dir / f"embeddings_cox_{stage}.npz",
                 subject_id=manifest["subject_id"].to_numpy().astype(str),
                 embedding=np.asarray(embs, np.float32))
    return ctx


def test_survival_stage_table_and_km_figure(tmp_path):
    from nrfm.plots.survival import plot_kaplan_meier

    ctx = make_ctx(tmp_path)
    table = run_survival_stage(ctx, ["cox"], progress=False)
    written = pd.read_csv(ctx.metrics_dir / "survival.csv")
    assert list(written.columns[:9]) == ["backbone", "objective", "site", "n", "events", "c_index", "ci_low",
                                         "ci_high", "logrank_p"]
    assert len(written) == 2 * 4
    by = table.set_index(["objective", "site"])
    for objective in ("erm", "dro"):
        for site in ("A", "B", "all"):
            assert by.loc[(objective, site), "c_index"] > 0.65  # the embedding carries the hazard
            row = by.loc[(objective, site)]
            assert row["ci_low"] <= row["c_index"] <= row["ci_high"]
        site_c = by.loc[(objective, "C")]
        assert np.isnan(site_c["c_index"]) and "survival_min_events" in site_c["note"]
    # every NaN metric has a note
    nan_rows = table[table[["c_index", "logrank_p"]].isna().any(axis=1)]
    assert (nan_rows["note"].str.len() > 0).all()
    assert set(table["model"]) == {"coxph_site_strata", "dro_cox_head"}
    risk = pd.read_csv(survival_risk_path(ctx, "cox", "dro"))
    assert list(risk.columns) == list(RISK_COLUMNS) and np.isfinite(risk["risk"]).all()
    assert len(risk) == by.loc[("dro", "all"), "n"] and risk["patient_id"].is_unique
    fig = plot_kaplan_meier(ctx, "cox")
    assert (ctx.figures_dir / "survival_km_cox.png").is_file() and len(fig.axes) >= 8


def test_follow_up_exams_do_not_count_twice(tmp_path):
    ctx = make_ctx(tmp_path)
    before = run_survival_stage(ctx, ["cox"], progress=False).set_index(["objective", "site"])
    # every test patient of site A gets a follow-up exam that repeats its survival (a later scan, same patient)
    man = ctx.manifest
    follow = man[(man["site"] == "A") & (man["split"] == "test")].assign(
        subject_id=lambda f: f["subject_id"] + "_fu")
    ctx.manifest = pd.concat([man, follow], ignore_index=True)
    for stage in ("erm", "dro"):
        path = ctx.artifacts_dir / f"embeddings_cox_{stage}.npz"
        with np.load(path) as data:
            ids, emb = data["subject_id"], data["embedding"]
        extra = emb[[list(ids).index(s[:-3]) for s in follow["subject_id"]]]
        np.savez(path, subject_id=np.concatenate([ids, follow["subject_id"].to_numpy().astype(str)]),
                 embedding=np.concatenate([emb, extra]))
    after = run_survival_stage(ctx, ["cox"], progress=False).set_index(["objective", "site"])
    for objective in ("erm", "dro"):
        for site in ("A", "all"):
            assert after.loc[(objective, site), "n"] == before.loc[(objective, site), "n"]
            assert after.loc[(objective, site), "events"] == before.loc[(objective, site), "events"]
    risk = pd.read_csv(survival_risk_path(ctx, "cox", "erm"))
    assert not risk["subject_id"].str.endswith("_fu").any()


def test_too_few_training_events_gives_note_rows(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.manifest.loc[ctx.manifest["split"] == "train", "os_event"] = 0
    table = run_survival_stage(ctx, ["cox"], progress=False)
    assert table["c_index"].isna().all() and table["note"].str.startswith("not fitted").all()


def test_evaluate_risk_ci_is_the_loop_over_resamples_with_lifelines():
    """The c-index CI is scored for all resamples at once; it equals metrics.bootstrap_ci over lifelines'
    concordance_index on the same resamples (ties in time and risk included)."""
    from nrfm.eval.metrics import bootstrap_ci
    from nrfm.eval.survival import c_index, evaluate_risk

    rng = np.random.default_rng(3)
    time = np.round(rng.exponential(300, 80))  # rounded: tied times
    event = (rng.random(80) < 0.7).astype(float)
    risk = np.round(-np.log(time + 1) + rng.normal(0, 1, 80), 1)  # rounded: tied risks
    row = evaluate_risk(time, event, risk, float(np.median(risk)), 5, 300, seed=4)
    low, high, _ = bootstrap_ci(c_index, time, event, risk, n_boot=300, seed=4)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert row["c_index"] == pytest.approx(c_index(time, event, risk))
