"""The embedded synthetic multi-site glioma cohort (``nrfm synth``): realistic enough to mean something,
with known ground truth (a latent bound to compare models with) and a planted, controlled experiment for
group DRO (two scenarios, :mod:`nrfm.synth.scenarios`).

``generate_cohort(out, profile, seed, sites, scenario=...)`` writes, via a temporary folder renamed at the end:

- ``manifest.csv``: the canonical manifest (data-formats.md), image paths relative. ``split`` is ``test`` for
  the profile's fixed held-out patients (all their exams) and empty for the rest, which a run splits into
  train and val (:func:`nrfm.data.splits.assign_splits`), so every run and seed scores the same test exams.
- ``images/<subject_id>/{t1,t1c,t2,flair,seg}.nii.gz``: int16 with scl_slope (seg uint8, labels 0/1/2/4),
  each site with its own orientation and voxel spacing in the header; gzip with mtime 0 (byte-stable).
- ``oracle.csv`` (subject_id, endpoint, value): for every exam, the exact posterior P(label = 1 | what the
  generator put into the image, site) for the eight binary endpoints, the true Ki-67 and TP53-IHC values
  (%, also where the manifest masks them), and ``artifact`` (1 = the ghost artifact, the scenario's cue, is in
  the images).
- ``oracle_auc.csv`` (endpoint, site incl. ``all``, n, n_pos, auc, bound, n_test, n_pos_test, auc_test): AUC
  of the oracle against the labels the manifest reports (masked labels excluded, as in the kit's metrics).
  A *latent* bound: the oracle sees the generator's latents, a model only the images (noise, resampling to
  the pipeline's 3 mm grid and sub-voxel cues such as 1.5 mm calcification foci lose information).
- ``oracle_cindex.csv`` (site, subset all/test, n, events, c_index, bound): c-index of the true log-hazard.
- ``cohort.json``: every generator parameter, the seed, the nrfm version, the profile, per-site counts,
  ``scenario``, its plan and ``latent_dro_gain`` (the latent ERM-vs-group-DRO check).

The rules, in detail in the helper modules' docstrings:

- Population and labels (:mod:`nrfm.synth.markers`, :mod:`nrfm.synth.sites`): class (IDH-wildtype,
  astrocytoma, 1p/19q-codeleted oligodendroglioma; so codeletion only with IDH mutation), grade from the
  class, six markers from (class, grade) with real dependencies (ATRX/TP53 mostly astrocytoma,
  EGFR/CDKN2A/B/TERT mostly IDH-wildtype, MGMT higher with IDH mutation), Ki-67 by grade (medians 3/6/27 %),
  TP53-IHC by TP53 status, age by IDH; CDKN2A/B only where WHO 2021 allows it, ATRX and TP53 coupled in
  astrocytoma; per-site prevalences, missing labels (at random per site and endpoint, except 1p/19q, tested
  mainly in IDH-mutant tumours), follow-up exams sharing a patient_id.
- Phenotype (:mod:`nrfm.synth.anatomy`): location (frontal for 1p/19q and IDH-mutant), size (grade, EGFR),
  necrosis (grade 4, CDKN2A/B, less with IDH mutation), enhancement (less with IDH mutation), edema (EGFR),
  T2-FLAIR mismatch (astrocytoma), calcification-like foci (1p/19q), enhancement heterogeneity (Ki-67),
  margin sharpness (ATRX, TP53, TP53-IHC), weak core T2 shift (MGMT, hard) and core T1 shift (TERT, weak),
  atrophy (age). Every endpoint leaves some signal in or around the tumour (the kit crops around it).
- Site: orientation, spacing, blur, bias field, Rician noise, gain and offset per contrast, and per-exam
  protocol settings drawn from per-site distributions that overlap (tissue contrast, enhancement, FLAIR
  suppression, slice profile, noise and bias strength): site effects that survive the z-score.
- Scenario (:mod:`nrfm.synth.scenarios`): ``site-shift`` plants a ghost artifact (a copy of the head shifted by
  half the phase-encoding field of view; survives crop and z-scoring) that agrees with EGFR at the large sites
  and is reversed at the smallest, whose EGFR phenotype and size hazard also differ; ``no-shift`` keeps the
  same cue label-free.
- Survival: Weibull proportional hazards in age, IDH, MGMT, grade, size and necrosis; site censoring;
  reported on each patient's first exam only.

Determinism: patient, exam and tumour generators are seeded from (seed, site name, patient index), so the
bytes of the manifest and images do not depend on the number of worker processes.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.config import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS
from nrfm.errors import ConfigError, RunError
from nrfm.files import atomic_write_csv, atomic_write_json
from nrfm.synth.oracle import held_out_floor_table, oracle_auc_table, oracle_cindex_table, oracle_table
from nrfm.synth.scenarios import CUE_ENDPOINT, SCENARIOS, apply_scenario, check_scenario, latent_dro_check
from nrfm.synth.sites import CONTRASTS, KNOWN_SITES, SiteTemplate, parse_site_spec
from nrfm.synth.anatomy import (ENHANCEMENT_GAIN, FOCUS_SD_MM, MARGIN_CLIP_MM, MARGIN_MM, PROTOCOL_FACTOR,
                                 PROTOCOL_SD, GHOST, TISSUE, render_subject, site_grid)
from nrfm.synth.exams import (CODEL_TESTED_IDH_MUTANT, CODEL_TESTED_IDH_WILDTYPE_MAX, MIN_NON_TEST_SHARE,  # noqa: F401
                              exam_table, fixed_test_counts)
from nrfm.synth.markers import FEATURES, MODEL, marginal_prevalence, marker_latents, site_survival

MANIFEST_COLUMNS = ("subject_id", "patient_id", "site", "split", "t1", "t1c", "t2", "flair", "seg", "age", "sex",
                    "grade") + ENDPOINTS + ("os_days", "os_event")
_GZIP_LEVEL = 1  # noisy images: level 4 saves about 3 % more at twice the time, 6-9 under 2 % beyond that


@dataclass(frozen=True)
class Profile:
    """A cohort size and resolution preset."""

    name: str
    sites: str  # site spec used when ``sites`` is not given
    spacing_scale: float  # multiplies each site's voxel spacing (coarser = faster)
    max_spacing_mm: float  # cap per axis after scaling
    description: str
    test_per_site: int = 0  # patients per site marked split=test in the manifest (the fixed held-out set)
    test_min_positives: int = 0  # reported positives per marker and site in the test set (nrfm.synth.exams)
    test_by_site: tuple[tuple[str, int], ...] = ()  # (site, patients): a test set of another size than test_per_site

    def test_counts(self, site_list: list[tuple[SiteTemplate, int]]) -> dict[str, int]:
        """Fixed test patients per site of ``site_list`` (:func:`nrfm.synth.exams.fixed_test_counts`)."""
        return fixed_test_counts(site_list, self.test_per_site, dict(self.test_by_site))

    def exams(self, site_list: list[tuple[SiteTemplate, int]], seed: int) -> tuple[pd.DataFrame, list[SiteTemplate]]:
        """:func:`nrfm.synth.exams.exam_table` with this profile's fixed test sets and test enrichment."""
        return exam_table(site_list, int(seed), self.test_per_site, self.test_min_positives, dict(self.test_by_site))


# Default: 160 test patients per site, 280 at CUIMC (fixed in the manifest); the rest is train/val for the run
# to split, so training stays imbalanced as in the paper (CUIMC: 65 non-test patients, e.g. 35 train + 30 val).
# CUIMC, the smallest training site, is the site every molecular DRO claim names: its test set sets the claims'
# power (280 patients: a DRO gain of about +0.13 AUC on the planted marker clears Holm's correction, projected
# from the 160-patient runs in docs/results.md). The grid is 1.3 x the scanners' native spacing (2.6-3.3 mm
# in-plane), about the pipeline's 3 mm: finer voxels would only be averaged away by the preprocessing and cost
# generation time.
PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", "UCSF:16,UPenn:14,CUIMC:10", 1.6, 6.0,
                     "about 40 exams on a coarse ~4 mm grid: tests and the smoke config, seconds", 4),
    "default": Profile("default", "UCSF:330,UPenn:305,CUIMC:345", 1.3, 6.0,
                       "about 1030 exams (160 test patients per site, 280 at the smallest training site CUIMC, "
                       "enriched to 15 positives per marker) at about 3 mm: the kit's default data", 160, 15,
                       (("CUIMC", 280),)),
    "large": Profile("large", "UCSF:640,UPenn:600,CUIMC:300", 1.0, 6.0,
                     "about 1550 exams (200 test patients per site) at native 2-5 mm", 200),
}


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate_cohort` made."""

    manifest_path: Path
    oracle_auc: pd.DataFrame  # endpoint, site (each site and "all"), n, n_pos, auc
    seconds: float


def generator_fingerprint() -> str:
    """First 8 hex digits of the SHA-256 of the generator's source (``nrfm/synth/*.py``): it names the cohort
    folder of a run (``nrfm.pipeline.context.cohort_manifest_path``), so a changed generator makes a new cohort
    instead of silently reusing one drawn by older code, and older runs keep the images they were scored on."""
    digest = hashlib.sha256()
    for source in sorted((f for f in files("nrfm.synth").iterdir() if f.name.endswith(".py")), key=lambda f: f.name):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:8]


def _version() -> str:
    try:
        import nrfm

        if getattr(nrfm, "__version__", None):
            return str(nrfm.__version__)
        from importlib.metadata import version

        return version("nrfm")
    except Exception:  # not installed (running from a checkout): the version is unknown, not an error
        return "unknown"


def _site_spacing(site: SiteTemplate, profile: Profile) -> tuple[float, float, float]:
    return tuple(round(min(s * profile.spacing_scale, profile.max_spacing_mm), 3) for s in site.spacing)


def _check_args(out: Path, profile: str, seed: int, force: bool) -> Profile:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    if profile not in PROFILES:
        raise ConfigError(f"profile: unknown profile {profile!r}; valid: {list(PROFILES)}")
    if out.exists():
        if not out.is_dir():
            raise RunError(f"{out}: exists and is not a folder")
        entries = list(out.iterdir())
        holds_cohort = (out / "cohort.json").exists() or (out / "manifest.csv").exists()
        if entries and not holds_cohort:
            raise RunError(f"{out}: folder is not empty and holds no synthetic cohort; choose a new or empty folder")
        if holds_cohort and not force:
            raise RunError(f"{out}: already holds a cohort (manifest.csv / cohort.json); pass --force to replace it")
    return PROFILES[profile]


def _nifti_gz(data: np.ndarray, affine: np.ndarray, dtype: type) -> bytes:
    """NIfTI-1 bytes, gzip-compressed with mtime 0 (nibabel's own gzip writes a timestamp)."""
    import nibabel as nib

    if np.issubdtype(data.dtype, np.floating):  # scanner-like integer units, as real MR exports
        data = np.round(data)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=_GZIP_LEVEL, mtime=0)


def _render_task(task: tuple) -> tuple[str, dict]:
    """Render and write one exam (runs in a worker); returns per-label voxel counts."""
    root, sid, site, spacing, latents, artifact, tumour_seed, scan_seed = task
    grid = site_grid(site.orientation, spacing)
    images, seg = render_subject(site, grid, latents, artifact, np.random.default_rng(scan_seed),
                                 np.random.default_rng(tumour_seed))
    folder = Path(root) / "images" / sid
    folder.mkdir(parents=True, exist_ok=True)
    for name in CONTRASTS:
        (folder / f"{name}.nii.gz").write_bytes(_nifti_gz(images[name], grid.affine, np.int16))
    (folder / "seg.nii.gz").write_bytes(_nifti_gz(seg, grid.affine, np.uint8))
    return sid, {int(k): int((seg == k).sum()) for k in (1, 2, 4)}


def _manifest(exams: pd.DataFrame) -> pd.DataFrame:
    man = pd.DataFrame({"subject_id": exams["subject_id"], "patient_id": exams["patient_id"],
                        "site": exams["site"], "split": exams["split"]})
    for c in CONTRASTS + ("seg",):
        man[c] = "images/" + exams["subject_id"] + f"/{c}.nii.gz"
    man["age"], man["sex"], man["grade"] = exams["age"], exams["sex"], exams["grade"]
    for e in BINARY_ENDPOINTS:
        man[e] = exams[e].astype("Int64").where(exams[f"observed_{e}"])
    for e in CONTINUOUS_ENDPOINTS:
        man[e] = exams[e].round(1).where(exams[f"observed_{e}"])
    man["os_days"], man["os_event"] = exams["os_days"].astype("Int64"), exams["os_event"].astype("Int64")
    return man[list(MANIFEST_COLUMNS)]


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _cohort_json(exams, sites, profile, seed, spec, spacings, plan, check) -> dict:
    per_site = []
    for site in sites:
        rows = exams[exams["site"] == site.name]
        grid = site_grid(site.orientation, spacings[site.name])
        per_site.append({
            "template": site.as_dict(), "patients": int(rows["patient_id"].nunique()), "exams": int(len(rows)),
            "grid": {"orientation": site.orientation, "spacing_mm": list(spacings[site.name]),
                     "shape": list(grid.shape), "affine": grid.affine.round(4).tolist()},
            "configured_prevalence": marginal_prevalence(site),
            "realised_prevalence": {e: round(float(rows[e].mean()), 4) for e in BINARY_ENDPOINTS},
            "labelled": {e: int(rows[f"observed_{e}"].sum()) for e in ENDPOINTS},
            "artifact_rate": round(float(rows["artifact"].mean()), 4) if len(rows) else None,
            "splits": {k: int((rows["split"] == k).sum()) for k in ("test", "")},
            "test_set": {"exams": int((rows["split"] == "test").sum()),
                         "survival_events": int(rows.loc[rows["split"] == "test", "os_event"].fillna(0).sum()),
                         "labelled_positives": {e: int(rows.loc[(rows["split"] == "test") & rows[f"observed_{e}"], e].sum())
                                                for e in BINARY_ENDPOINTS},
                         "enrichment_exams": {e: int((rows["enriched_for"] == e).sum()) for e in BINARY_ENDPOINTS
                                              if (rows["enriched_for"] == e).any()}},
            "survival_exams": int(rows["os_days"].notna().sum()),
            "hazard": site_survival(site),
        })
    return _plain({
        "generator": "nrfm.synth.generate", "nrfm_version": _version(), "generator_fingerprint": generator_fingerprint(),
        "profile": profile.__dict__, "seed": int(seed),
        "scenario": plan["name"], "scenario_plan": plan, "latent_dro_gain": check["latent_dro_gain"],
        "latent_dro_check": check,
        "sites_spec": spec, "n_subjects": int(len(exams)), "n_patients": int(exams["patient_id"].nunique()),
        "sites": per_site, "marker_model": MODEL, "phenotype_latents": list(FEATURES),
        "anatomy": {"template": "nilearn MNI152 (ICBM 2009) GM/WM/brain mask, 2 mm", "tissue_intensity": TISSUE,
                    "enhancement_gain": ENHANCEMENT_GAIN, "protocol_sd": PROTOCOL_SD, "protocol_factor": PROTOCOL_FACTOR,
                    "calcification_focus_sd_mm": FOCUS_SD_MM, "margin_mm": MARGIN_MM, "margin_clip_mm": MARGIN_CLIP_MM,
                    "resolution_note": "cues sized to be resolvable on a 3 mm grid; the weak core T1/T2 shifts "
                                       "(TERT, MGMT) are intensity cues, not sub-voxel, but small against noise"},
        "artifact": {"kind": "ghost: a copy of the head added at the given amplitude, shifted along the "
                             "phase-encoding axis", **GHOST,
                     "per_site": {s.name: {"endpoint": s.artifact_endpoint, "p_if_label0": s.artifact_p[0],
                                           "p_if_label1": s.artifact_p[1]} for s in sites},
                     "recorded_in": "oracle.csv endpoint 'artifact'"},
        "oracle": "latent bound: exact posterior over the 576 (class, grade, marker) configurations given the "
                  "phenotype latents, the artifact and the site (not the best achievable from the images: noise, "
                  "resampling and sub-voxel cues lose information); oracle_auc.csv uses labels reported in the "
                  "manifest; oracle_cindex.csv: c-index of the true log-hazard",
    })


def generate_cohort(out: Path, profile: str = "default", seed: int = 0, sites: str | None = None,
                    force: bool = False, progress: bool = True, workers: int | None = None,
                    scenario: str = "site-shift") -> SynthResult:
    """Generate the synthetic cohort into ``out`` (see the module docstring for the files and the rules).

    Args:
        out: target folder; created, or replaced when it already holds a cohort and ``force`` is set.
        profile: ``smoke``, ``default`` or ``large`` (:data:`PROFILES`).
        seed: non-negative integer; the same seed gives the same bytes.
        sites: site spec ``"NAME:COUNT,..."`` (patients per site); None = the profile's.
        force: replace an existing cohort in ``out``.
        progress: show a progress bar and print the oracle AUC table.
        workers: rendering processes; None = min(2, CPU count). Output does not depend on it.
        scenario: ``site-shift`` or ``no-shift`` (:mod:`nrfm.synth.scenarios`).
    Raises:
        ConfigError: bad profile, seed or site spec. RunError: ``out`` unusable or already a cohort.
    """
    start = time.perf_counter()
    out = Path(out).resolve()  # a name to build the temp folder beside it, also for "." or "dir/"
    prof = _check_args(out, profile, seed, force)
    check_scenario(scenario)
    spec = sites if sites is not None else prof.sites
    site_list, plan = scenario_sites(spec, scenario, prof)
    spacings = {s.name: _site_spacing(s, prof) for s, _ in site_list}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        exams, templates = prof.exams(site_list, seed)
        check = latent_dro_check(exams, plan, marker_latents(plan["affected_endpoints"]))
        for s in templates:  # build grids before forking so workers inherit them
            site_grid(s.orientation, spacings[s.name])
        by_name = {s.name: s for s in templates}
        tasks = [(str(tmp), r.subject_id, by_name[r.site], spacings[r.site], {n: float(getattr(r, f"f_{n}"))
                  for n in FEATURES}, bool(r.artifact), r.tumour_seed, r.scan_seed) for r in exams.itertuples()]
        _render_all(tasks, workers, progress)
        atomic_write_csv(tmp / "manifest.csv", _manifest(exams))
        atomic_write_csv(tmp / "oracle.csv", oracle_table(exams))
        table = oracle_auc_table(exams, [s.name for s in templates])
        atomic_write_csv(tmp / "oracle_auc.csv", table)
        atomic_write_csv(tmp / "oracle_cindex.csv", oracle_cindex_table(exams, [s.name for s in templates]))
        atomic_write_json(tmp / "cohort.json", _cohort_json(exams, templates, prof, seed, spec, spacings, plan, check))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    if progress:
        print(f"synthetic cohort ({scenario}): {len(exams)} exams at {[s.name for s in templates]} in "
              f"{seconds:.1f} s -> {out}")
        print(f"latent_dro_gain (smallest site, group DRO minus ERM AUC on the latents): {check['latent_dro_gain']}")
        print("oracle AUC (latent bound: given the generator's latents, reported labels):")
        print(table.pivot(index="endpoint", columns="site", values="auc").loc[list(BINARY_ENDPOINTS)].to_string())
    return SynthResult(manifest_path=out / "manifest.csv", oracle_auc=table, seconds=seconds)


def scenario_sites(spec: str, scenario: str, profile: Profile | None = None) -> tuple[list[tuple[SiteTemplate, int]], dict]:
    """Parse a site spec and apply the scenario (:func:`nrfm.synth.scenarios.apply_scenario`); ``profile``
    gives the fixed test sets, which decide the smallest training site (None: no test sets)."""
    site_list = parse_site_spec(spec)
    prevalence = {s.name: marginal_prevalence(s)[CUE_ENDPOINT] for s, _ in site_list}
    test = profile.test_counts(site_list) if profile is not None else None
    return apply_scenario(site_list, scenario, prevalence, test)


def latent_experiment(profile: str = "default", seed: int = 0, scenario: str = "site-shift",
                      sites: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The exam table and the latent ERM-vs-DRO check of a cohort, without rendering (seconds)."""
    prof = PROFILES[profile]
    site_list, plan = scenario_sites(sites if sites is not None else prof.sites, check_scenario(scenario), prof)
    exams, _ = prof.exams(site_list, seed)
    return exams, latent_dro_check(exams, plan, marker_latents(plan["affected_endpoints"]))


def _render_all(tasks: list, workers: int | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    n_workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bar = tqdm(total=len(tasks), desc="synth images", unit="exam", disable=not progress, file=sys.stderr)
    if n_workers == 1 or len(tasks) < 8:
        for task in tasks:
            _render_task(task)
            bar.update()
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(n_workers) as pool:
            for _ in pool.imap_unordered(_render_task, tasks, chunksize=2):
                bar.update()
    bar.close()


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished cohort into place; an old cohort is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def site_intensity_table(manifest_path: Path, contrast: str = "t1") -> pd.DataFrame:
    """Mean and sd of the raw intensity inside the brain (non-zero voxels) per exam, with its site.

    A helper for checking that site effects are present in the raw images (and, applied to preprocessed
    arrays by the caller, that they shrink after preprocessing).
    """
    import nibabel as nib

    if contrast not in CONTRASTS:
        raise ConfigError(f"contrast: unknown contrast {contrast!r}; valid: {list(CONTRASTS)}")
    manifest_path = Path(manifest_path)
    man = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    rows = []
    for r in man.itertuples():
        data = np.asarray(nib.load(manifest_path.parent / getattr(r, contrast)).dataobj, dtype=np.float32)
        brain = data[data != 0]
        rows.append({"subject_id": r.subject_id, "site": r.site, "mean": float(brain.mean()), "sd": float(brain.std())})
    return pd.DataFrame(rows)


__all__ = ["PROFILES", "KNOWN_SITES", "SCENARIOS", "Profile", "SynthResult", "generate_cohort",
           "latent_experiment", "oracle_auc_table", "oracle_cindex_table", "parse_site_spec", "scenario_sites",
           "site_intensity_table", "held_out_floor_table"]
