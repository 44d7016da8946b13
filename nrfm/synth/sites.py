"""Site templates of the synthetic cohort and the ``--sites`` spec parser.

A :class:`SiteTemplate` holds everything that differs between the synthetic acquisition sites: the
population (IDH-mutant fraction, 1p/19q codeletion among IDH-mutant, grade mix, MGMT methylation in
IDH-wildtype), the labels a site reports (missing fractions per endpoint, follow-up exams, censoring), the
scanner (NIfTI orientation, voxel spacing, in-plane blur, noise, bias field, intensity scale and offset per
contrast), the site means of the per-exam protocol settings (tissue contrast, enhancement, FLAIR CSF
suppression, slice profile) and the artifact model. The templates' artifact model is label-free; the
scenario (:mod:`nrfm.synth.scenarios`) decides how the artifact (the cue) relates to the labels.

The three known templates follow the published cohorts (see data_manifests/ucsf-pdgm.md, upenn-gbm.md and brats.md):

- ``UCSF``: UCSF-PDGM-like, mixed grade (grade 2/3/4 about 11/9/80 %), IDH-mutant about 20 %, MGMT
  methylated in about 60 % of grade 4; LPS orientation, 2.0 x 2.0 x 3.0 mm (anisotropic).
- ``UPenn``: UPenn-GBM-like, glioblastoma only (IDH-wildtype about 97 %), MGMT unknown in about half of
  the rows, about 6 % follow-up exams; RAS orientation, 2.5 mm isotropic.
- ``CUIMC``: a smaller mixed-grade site; PSR orientation (sagittal slices), 2.2 x 2.2 x 5.0 mm thick
  slices with slice blur.

Any other name gets the *generic* template: CUIMC's population and label model with scanner settings
drawn deterministically from the site name (orientation, spacing, scale, offset), so two generic sites
still differ as two scanners would.

Site spec grammar (``nrfm synth --sites``): comma-separated ``NAME:COUNT`` entries, e.g.
``"UCSF:120,UPenn:110,CUIMC:40"``. NAME starts with a letter and holds letters, digits, ``_`` or ``-``
(matched case-insensitively to the known templates); COUNT is the number of patients (1 to 100000);
names must be unique.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from nrfm.errors import ConfigError
from nrfm.schema import CONTRASTS, ENDPOINTS
ORIENTATIONS = ("RAS", "LPS", "PSR", "LAS", "RPI")  # generic sites pick from these


@dataclass(frozen=True)
class SiteTemplate:
    """Population, labelling and scanner model of one synthetic site (units: mm, days, fractions)."""

    name: str
    p_idh_mutant: float
    p_codel_given_idh: float
    # P(grade 2, 3, 4 | class) for the classes IDH-wildtype, IDH-mutant non-codeleted, IDH-mutant codeleted
    grade_given_class: tuple[tuple[float, float, float], ...]
    p_mgmt_idh_wildtype: float
    missing: dict[str, float]  # endpoint -> fraction of exams whose label is reported unknown (MCAR)
    followup_fraction: float  # fraction of patients with a second exam (same patient_id)
    censor_days: tuple[float, float]  # administrative follow-up ~ Uniform(low, high)
    loss_mean_days: float  # loss to follow-up ~ Exponential(mean)
    orientation: str  # NIfTI axis codes of the voxel axes, e.g. "LPS"
    spacing: tuple[float, float, float]  # mm along the voxel axes
    blur_mm: float  # extra in-plane Gaussian blur (FWHM, mm)
    noise: float  # Rician noise sigma relative to white matter
    bias: float  # bias-field strength (log-amplitude)
    scale: tuple[float, float, float, float]  # scanner gain per contrast (t1, t1c, t2, flair)
    offset: tuple[float, float, float, float]  # scanner offset per contrast (inside the brain)
    phase_axis: int  # voxel axis of the phase-encoding direction (the ghost is shifted along it)
    artifact_endpoint: str = "egfr"
    artifact_p: tuple[float, float] = (0.1, 0.1)  # P(artifact | label 0), P(artifact | label 1)
    generic: bool = field(default=False)
    # Per-exam protocol settings, drawn around these site means (sd in synth_anatomy.PROTOCOL_SD), so sites
    # overlap and the differences survive a z-score: tissue contrast (1 = the TISSUE table), contrast-agent
    # enhancement (dose and timing), FLAIR CSF signal (1 = TISSUE; higher = poorer suppression), and the
    # through-plane slice profile (FWHM range in mm, blurs anatomy and tumour alike along the slice axis).
    tissue_contrast: float = 1.0
    enhancement: float = 1.0
    flair_csf: float = 1.0
    slice_fwhm_mm: tuple[float, float] = (0.0, 2.0)
    # Set by a scenario (nrfm.synth.scenarios), empty in the templates: (latent, term, coefficient) overrides
    # of the phenotype model and (term, weight) overrides of the survival model at this site.
    phenotype_shift: tuple = ()
    hazard_shift: tuple = ()

    def as_dict(self) -> dict:
        return {k: ([list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


_MISSING_UCSF = {"mgmt": 0.15, "idh": 0.0, "codel_1p19q": 0.3, "egfr": 0.45, "atrx": 0.2, "tp53": 0.45,
                 "cdkn2ab": 0.5, "tert": 0.5, "ki67": 0.35, "tp53_ihc": 0.6}
_MISSING_UPENN = {"mgmt": 0.5, "idh": 0.16, "codel_1p19q": 0.9, "egfr": 0.6, "atrx": 0.7, "tp53": 0.55,
                  "cdkn2ab": 0.6, "tert": 0.6, "ki67": 0.6, "tp53_ihc": 0.8}
_MISSING_CUIMC = {"mgmt": 0.25, "idh": 0.05, "codel_1p19q": 0.3, "egfr": 0.4, "atrx": 0.4, "tp53": 0.4,
                  "cdkn2ab": 0.4, "tert": 0.4, "ki67": 0.2, "tp53_ihc": 0.4}

KNOWN_SITES: dict[str, SiteTemplate] = {
    "UCSF": SiteTemplate(
        name="UCSF", p_idh_mutant=0.21, p_codel_given_idh=0.25,
        grade_given_class=((0.04, 0.04, 0.92), (0.35, 0.30, 0.35), (0.55, 0.45, 0.0)),
        p_mgmt_idh_wildtype=0.60, missing=_MISSING_UCSF, followup_fraction=0.01,
        censor_days=(200.0, 2500.0), loss_mean_days=3000.0,
        orientation="LPS", spacing=(2.0, 2.0, 3.0), blur_mm=0.0, noise=0.035, bias=0.15,
        scale=(300.0, 360.0, 460.0, 240.0), offset=(40.0, 40.0, 20.0, 30.0), phase_axis=1,
        artifact_endpoint="egfr", artifact_p=(0.2, 0.2),
        tissue_contrast=1.08, enhancement=1.15, flair_csf=0.9, slice_fwhm_mm=(1.0, 3.5)),
    "UPenn": SiteTemplate(
        name="UPenn", p_idh_mutant=0.03, p_codel_given_idh=0.0,
        grade_given_class=((0.0, 0.0, 1.0), (0.0, 0.0, 1.0), (0.0, 0.0, 1.0)),
        p_mgmt_idh_wildtype=0.40, missing=_MISSING_UPENN, followup_fraction=0.06,
        censor_days=(600.0, 3000.0), loss_mean_days=8000.0,
        orientation="RAS", spacing=(2.5, 2.5, 2.5), blur_mm=2.0, noise=0.025, bias=0.08,
        scale=(250.0, 300.0, 420.0, 200.0), offset=(0.0, 0.0, 0.0, 0.0), phase_axis=0,
        artifact_endpoint="egfr", artifact_p=(0.2, 0.2),
        tissue_contrast=0.95, enhancement=0.9, flair_csf=1.3, slice_fwhm_mm=(0.5, 2.5)),
    "CUIMC": SiteTemplate(
        name="CUIMC", p_idh_mutant=0.28, p_codel_given_idh=0.30,
        grade_given_class=((0.08, 0.10, 0.82), (0.35, 0.35, 0.30), (0.50, 0.50, 0.0)),
        p_mgmt_idh_wildtype=0.45, missing=_MISSING_CUIMC, followup_fraction=0.0,
        censor_days=(300.0, 2000.0), loss_mean_days=2500.0,
        orientation="PSR", spacing=(2.2, 2.2, 5.0), blur_mm=1.0, noise=0.05, bias=0.25,
        scale=(600.0, 780.0, 900.0, 540.0), offset=(100.0, 150.0, 50.0, 80.0), phase_axis=0,
        artifact_endpoint="egfr", artifact_p=(0.2, 0.2),
        tissue_contrast=1.0, enhancement=1.0, flair_csf=1.1, slice_fwhm_mm=(3.0, 6.0)),
}


def generic_site(name: str) -> SiteTemplate:
    """CUIMC's population model with scanner settings drawn deterministically from ``name``."""
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    in_plane = float(np.round(rng.uniform(2.0, 2.6), 1))
    slice_mm = float(np.round(rng.uniform(2.0, 4.0), 1))
    scale = tuple(float(np.round(s, 0)) for s in rng.uniform(150.0, 800.0, size=4))
    offset = tuple(float(np.round(s, 0)) for s in rng.uniform(0.0, 100.0, size=4))
    return replace(KNOWN_SITES["CUIMC"], name=name, orientation=orientation,
                   spacing=(in_plane, in_plane, slice_mm), blur_mm=float(np.round(rng.uniform(0, 2), 1)),
                   noise=float(np.round(rng.uniform(0.02, 0.05), 3)), scale=scale, offset=offset,
                   phase_axis=int(rng.integers(2)), generic=True,
                   tissue_contrast=float(np.round(rng.uniform(0.92, 1.08), 2)),
                   enhancement=float(np.round(rng.uniform(0.85, 1.15), 2)),
                   flair_csf=float(np.round(rng.uniform(0.8, 1.3), 2)),
                   slice_fwhm_mm=(0.5, float(np.round(rng.uniform(2.0, 5.0), 1))))


def site_template(name: str) -> SiteTemplate:
    """The known template whose name matches ``name`` (case-insensitive), else the generic one."""
    for key, template in KNOWN_SITES.items():
        if key.lower() == name.lower():
            return template
    return generic_site(name)


_ENTRY = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):(\d+)$")


def parse_site_spec(spec: str) -> list[tuple[SiteTemplate, int]]:
    """Parse ``"NAME:COUNT,NAME:COUNT"`` into (template, number of patients) pairs.

    Raises:
        ConfigError: one line naming the entry at fault and the expected format.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--sites {spec!r}: empty site spec; expected NAME:COUNT[,NAME:COUNT...], "
                          "e.g. 'UCSF:120,UPenn:110,CUIMC:40'")
    out: list[tuple[SiteTemplate, int]] = []
    seen: set[str] = set()
    for i, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        match = _ENTRY.match(entry)
        if not match:
            raise ConfigError(f"--sites {spec!r}: entry {i} {entry!r} is not NAME:COUNT (NAME starts with a "
                              "letter; letters, digits, _ or -; COUNT a whole number), e.g. 'UCSF:120'")
        template, count = site_template(match.group(1)), int(match.group(2))
        if not 1 <= count <= 100_000:
            raise ConfigError(f"--sites {spec!r}: entry {i} {entry!r}: COUNT must be in [1, 100000]")
        if template.name.lower() in seen:
            raise ConfigError(f"--sites {spec!r}: entry {i} {entry!r}: site {template.name!r} given twice")
        seen.add(template.name.lower())
        out.append((template, count))
    return out


def check_template(template: SiteTemplate) -> None:
    """Internal consistency of a template (a bug, not user input, if this fails)."""
    assert set(template.missing) == set(ENDPOINTS), template.name
    assert len(template.orientation) == 3 and len(template.spacing) == 3
    for row in template.grade_given_class:
        assert abs(sum(row) - 1.0) < 1e-9, template.name
