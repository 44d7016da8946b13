"""Patient-level splits of a manifest, the small-group rule, and the folds of each protocol.

:func:`assign_splits` fills empty ``split`` values by patient, stratified by site and an endpoint;
:func:`check_no_patient_leak` refuses a patient in two splits; :func:`small_groups` lists the sites and
(site, class) groups too small to split or to weight; :func:`fold_rows` (and :func:`loso_folds`, as frames) builds
the folds of ``pooled`` and ``loso``, the one fold builder every stage uses.

Example::

    df = assign_splits(read_manifest(Path("cohort/manifest.csv")), seed=0, endpoint="idh")
    name, train, val, test = fold_rows(df, "pooled")[0]
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nrfm.config import PROTOCOLS
from nrfm.errors import LeakageError, ManifestError
from nrfm.schema import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS, SPLITS


# ------------------------------------------------------------------------------------------------ splits
def check_no_patient_leak(df: pd.DataFrame, where: str = "manifest") -> None:
    """Raise :class:`LeakageError` if one ``patient_id`` has rows in two different (non-empty) splits."""
    assigned = df[df["split"].isin(SPLITS)]
    per_patient = assigned.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    leaking = per_patient[per_patient.map(len) > 1]
    if len(leaking):
        pid, splits = leaking.index[0], leaking.iloc[0]
        subjects = assigned.loc[assigned["patient_id"] == pid, "subject_id"].tolist()
        more = f" (and {len(leaking) - 1} more patients)" if len(leaking) > 1 else ""
        raise LeakageError(f"{where}: patient {pid!r} is in splits {', '.join(splits)} "
                           f"(exams {', '.join(subjects)}){more}")


def assign_splits(df: pd.DataFrame, seed: int, endpoint: str = "idh",
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), min_val_patients: int = 0) -> pd.DataFrame:
    """Fill empty ``split`` values by patient, stratified by site and ``endpoint``, deterministic by seed.

    Rows that already have a split keep it; a patient's other exams follow it. The remaining patients of each
    site are grouped by their label (first known label over their exams; unknown is its own stratum),
    shuffled within the stratum, laid out stratum after stratum, and each position takes the split that is
    furthest below its target share so far (largest-deficit rounding): every stratum and the site as a whole
    get the fractions to within one patient. A site with >= 3 patients then gets at least one in each split;
    a site with fewer (:data:`MIN_SPLIT_PATIENTS`) cannot be split and is kept for evaluation only: its
    patients go to ``test`` (``nrfm validate`` warns about it, :func:`small_groups` lists it).

    A site whose manifest already marks test patients (a fixed held-out set, as ``nrfm synth`` writes) keeps
    exactly those as test: its other patients are split into train and val only, in the ratio of the train
    and val fractions, with at least ``min_val_patients`` in val (at most half of them), so that
    worst-group model selection has enough validation patients at a small site.

    Args:
        df: manifest as from :func:`read_manifest`.
        seed: random seed (same seed and table, same splits).
        endpoint: binary endpoint to stratify by.
        fractions: train, val, test shares (positive, summing to 1).
        min_val_patients: validation floor per site with a fixed test set (0 = none).

    Returns:
        A copy of ``df`` with ``split`` filled.

    Raises:
        ValueError: unknown endpoint or bad fractions. LeakageError: pre-assigned splits already leak.
    """
    if endpoint not in BINARY_ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; valid: {list(BINARY_ENDPOINTS)}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive shares summing to 1, got {fractions}")
    check_no_patient_leak(df, where="manifest before assigning splits")
    out = df.copy()
    given = out[out["split"].isin(SPLITS)].groupby("patient_id")["split"].first()
    out.loc[out["split"] == "", "split"] = out["patient_id"].map(given).fillna("")
    todo = out[out["split"] == ""]
    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}
    evaluation_only = set(evaluation_only_sites(out))
    fixed_test_sites = set(out.loc[df["split"] == "test", "site"])
    for site in sorted(todo["site"].unique()):
        part = todo[todo["site"] == site]
        if site in evaluation_only and site not in fixed_test_sites:  # too few patients to split: evaluation only
            chosen.update({pid: "test" for pid in part["patient_id"].unique()})
            continue
        target = np.asarray(fractions)
        if site in fixed_test_sites:  # the held-out set is given: only train and val among the rest
            n_rest = part["patient_id"].nunique()
            val = fractions[1] / (fractions[0] + fractions[1])
            if min_val_patients > 0 and n_rest > 0:
                val = max(val, min(0.5, min_val_patients / n_rest))
            target = np.array([1.0 - val, val, 0.0])
        labels = part.groupby("patient_id", sort=True)[endpoint].agg(
            lambda s: s.dropna().iloc[0] if s.notna().any() else -1.0)
        order: list[str] = []
        for stratum in sorted(labels.unique()):
            patients = sorted(labels.index[labels == stratum])
            order += [patients[k] for k in rng.permutation(len(patients))]
        counts = np.zeros(3)
        assignment: list[int] = []
        for t, _ in enumerate(order, start=1):
            k = int(np.argmax(target * t - counts))
            counts[k] += 1
            assignment.append(k)
        fixed = out.loc[(out["site"] == site) & (out["split"] != ""), ["patient_id", "split"]].drop_duplicates()
        total = counts + np.array([(fixed["split"] == s).sum() for s in SPLITS])
        if len(order) + len(fixed) >= 3 and site not in fixed_test_sites:
            for empty in [k for k in range(3) if total[k] == 0]:
                # move the last-placed patient of the fullest split that can spare one
                donors = [k for k in np.argsort(-total, kind="stable") if counts[k] > 0 and total[k] > 1]
                if not donors:
                    break
                pos = max(p for p, k in enumerate(assignment) if k == donors[0])
                counts[donors[0]] -= 1
                total[donors[0]] -= 1
                assignment[pos] = empty
                counts[empty] += 1
                total[empty] += 1
        chosen.update({pid: SPLITS[k] for pid, k in zip(order, assignment)})
    mask = out["split"] == ""
    out.loc[mask, "split"] = out.loc[mask, "patient_id"].map(chosen)
    return out


# ------------------------------------------------------------------------------------------- small groups
# The rule for groups too small to split or to weight, in one place (validate warns with it, assign_splits
# follows it, nrfm.train.finetune_data.build_groups applies the group part):
#   * a site with fewer than MIN_SPLIT_PATIENTS patients cannot have a train, a validation and a test patient:
#     it is kept for evaluation only (every exam of it goes to the test split; it is never trained on);
#   * a (site, class) group of an endpoint with fewer than MIN_GROUP_TRAIN training exams is too small to
#     weight on its own: it is merged with the other small groups of the endpoint and class (still trained on).
MIN_SPLIT_PATIENTS = 3
MIN_GROUP_TRAIN = 3
EVALUATION_ONLY = "kept for evaluation only: all its exams go to the test split and it is never trained on"
NOT_WEIGHTED = ("merged with the other small groups of the same endpoint and class into one group (too few to "
                "weight alone; its exams are still trained on and scored)")


def evaluation_only_sites(df: pd.DataFrame, min_patients: int = MIN_SPLIT_PATIENTS) -> list[str]:
    """Sites with fewer than ``min_patients`` patients: test split only (see :data:`EVALUATION_ONLY`)."""
    patients = df.groupby("site")["patient_id"].nunique()
    return sorted(str(s) for s in patients.index[patients < min_patients])


def small_groups(df: pd.DataFrame, endpoint: str | None = None, min_train: int = MIN_GROUP_TRAIN,
                 cuts: dict[str, float] | None = None, train_fraction: float = 0.6) -> pd.DataFrame:
    """What the small-group rule leaves out of splitting and of the DRO grouping.

    Args:
        df: a manifest (with or without splits).
        endpoint: report (site, class) groups of this endpoint (binary, or continuous with its cut in ``cuts``);
            None reports sites only.
        min_train: a group with fewer training exams than this (but at least one) is not weighted.
        cuts: binarization cut in percent per continuous endpoint.

    Returns:
        One row per site or group left out: ``kind`` (``site`` or ``site_class``), ``site``, ``endpoint``,
        ``label`` (class, NaN for sites), ``count`` (patients for a site; training exams for a group: the
        ``train`` rows when every row has a split, else the expected number, ``train_fraction`` of the
        labelled exams rounded down), ``line`` (first manifest line, when known) and ``action``.
    """
    columns = ["kind", "site", "endpoint", "label", "count", "line", "action"]
    lines = np.asarray(df.attrs.get("lines", np.arange(len(df)) + 2))
    rows = []
    excluded = evaluation_only_sites(df)
    patients = df.groupby("site")["patient_id"].nunique()
    for site in excluded:
        first = int(lines[np.flatnonzero(df["site"].to_numpy() == site)[0]])
        rows.append({"kind": "site", "site": site, "endpoint": "", "label": np.nan, "count": int(patients[site]),
                     "line": first, "action": EVALUATION_ONLY})
    if endpoint is not None:
        values = df[endpoint].to_numpy(dtype=float)
        if endpoint in CONTINUOUS_ENDPOINTS:
            if not cuts or endpoint not in cuts:
                raise ValueError(f"endpoint {endpoint!r} is continuous: give its cut in cuts")
            values = np.where(np.isnan(values), np.nan, (values >= cuts[endpoint]).astype(float))
        elif endpoint not in BINARY_ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; valid: {list(ENDPOINTS)}")
        has_splits = bool(df["split"].isin(SPLITS).all())
        in_train = df["split"].to_numpy() == "train"
        site_of = df["site"].to_numpy()
        for site in sorted(set(site_of) - set(excluded)):
            for label in (0.0, 1.0):
                members = np.flatnonzero((site_of == site) & (values == label))
                count = int(in_train[members].sum()) if has_splits else int(len(members) * train_fraction)
                if 0 < count < min_train:
                    rows.append({"kind": "site_class", "site": str(site), "endpoint": endpoint, "label": label,
                                 "count": count, "line": int(lines[members[0]]), "action": NOT_WEIGHTED})
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------- folds
LOSO_PRETRAIN = ("unseen_only", "exclude")


@dataclass(frozen=True)
class Fold:
    """One fold of a protocol: integer row positions (into the manifest as given) of each role.

    ``notes`` say what the builder left out and why (also shown in tables); rows in no role are not used.
    A fold unpacks as ``name, train, val, test = fold``.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    notes: tuple[str, ...] = ()

    def __iter__(self):
        return iter((self.name, self.train, self.val, self.test))


def fold_rows(df: pd.DataFrame, protocol: str, pretrained_subjects: "set[str] | list[str] | None" = None) -> list[Fold]:
    """The folds of ``pooled`` or ``loso``: the one fold builder every stage uses.

    ``pooled``: one fold, the manifest's train / val / test splits. ``loso``: one fold per site, in site order:
    train on the other sites' ``train`` rows, select on their ``val`` rows, test on the held-out site's rows,
    except

    * an exam of a patient who also has exams used for training or validation in this fold (a patient scanned
      at two sites): left out of the test set, with a warning naming the patient, so no patient is ever on
      both sides of a fold;
    * with ``pretrained_subjects`` (``analyses.loso_pretrain = unseen_only``): an exam of a patient any of
      whose exams self-supervised pretraining used; the fold scores only what pretraining never saw, and a
      note gives the count.

    The other sites' ``test`` rows are not used (the held-out site is the only test set).

    Raises:
        ValueError: unknown protocol. ManifestError: rows without a split; loso with fewer than two sites.
        LeakageError: a patient in two splits (pooled), or on both sides of a fold (never after the rules above).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    split, site = df["split"].astype(str).to_numpy(), df["site"].astype(str).to_numpy()
    patient = df["patient_id"].astype(str).to_numpy()
    if not np.isin(split, SPLITS).all():
        n = int((~np.isin(split, SPLITS)).sum())
        raise ManifestError(f"{n} rows have no split; call assign_splits before building folds")
    check_no_patient_leak(df, where="manifest")
    if protocol == "pooled":
        return [Fold("pooled", *(np.flatnonzero(split == s) for s in SPLITS))]
    sites = sorted(set(site))
    if len(sites) < 2:
        raise ManifestError(f"leave-one-site-out needs at least two sites, found {sites}")
    seen = None
    if pretrained_subjects is not None:
        seen = set(patient[np.isin(df["subject_id"].astype(str).to_numpy(), [str(s) for s in pretrained_subjects])])
    folds = []
    for held in sites:
        train = np.flatnonzero((split == "train") & (site != held))
        val = np.flatnonzero((split == "val") & (site != held))
        candidates = np.flatnonzero(site == held)
        used = set(patient[train]) | set(patient[val])
        notes = []
        cross = candidates[np.isin(patient[candidates], list(used))]
        for pid in sorted(set(patient[cross])):
            others = sorted(set(site[(patient == pid) & (site != held)]))
            exams = ", ".join(df["subject_id"].astype(str).to_numpy()[cross[patient[cross] == pid]])
            message = (f"leave-one-site-out fold holding out {held!r}: patient {pid!r} also has exams at "
                       f"{', '.join(others)} used for training or validation; its exams at {held} ({exams}) are "
                       "left out of the test set")
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        test = np.setdiff1d(candidates, cross)
        if seen is not None:
            pretrained = test[np.isin(patient[test], list(seen))]
            test = np.setdiff1d(test, pretrained)
            notes.append(f"held-out site {held}: {len(test)} of {len(candidates)} exams scored, those pretraining "
                         f"never saw ({len(pretrained)} pretraining exams left out; analyses.loso_pretrain=unseen_only)")
        if not len(test):
            notes.append(f"held-out site {held}: no exam left to score after the rules above")
        both = set(patient[test]) & used
        if both:  # the rule above makes this impossible; kept as the guarantee's last line
            raise LeakageError(f"leave-one-site-out fold holding out {held!r}: patients {sorted(both)} on both sides")
        folds.append(Fold(held, train, val, test, tuple(notes)))
    return folds


def loso_folds(df: pd.DataFrame, pretrained_subjects: "set[str] | list[str] | None" = None) -> list[tuple[str, pd.DataFrame]]:
    """Leave-one-site-out folds as frames: one ``(held_out_site, frame)`` per site, in site order.

    Built by :func:`fold_rows` (the rules there): in each frame ``split`` is the row's role in the fold
    (``train``, ``val``, ``test``) and empty for rows the fold does not use (the other sites' test rows,
    exams of patients seen on the training side or, with ``pretrained_subjects``, in pretraining).

    Raises:
        ManifestError: fewer than two sites, or rows without a split.
    """
    out = []
    for fold in fold_rows(df, "loso", pretrained_subjects):
        frame = df.copy()
        role = np.full(len(frame), "", dtype=object)
        for name in SPLITS:
            role[getattr(fold, name)] = name
        frame["split"] = role
        check_no_patient_leak(frame, where=f"leave-one-site-out fold holding out {fold.name!r}")
        out.append((fold.name, frame))
    return out
