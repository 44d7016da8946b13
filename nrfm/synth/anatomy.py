"""Rendering of one synthetic exam: MNI152 anatomy, tumour phenotype and scanner effects.

Anatomy: nilearn's bundled MNI152 (ICBM 2009) grey- and white-matter maps and brain mask at 2 mm, loaded
offline; CSF = brain mask - GM - WM (clipped at 0). Each site has its own voxel grid (orientation codes and
spacing from its template) covering the brain's world bounding box; the template maps are pre-smoothed
once per grid (slice-profile anti-aliasing) and cached in-process (:func:`site_grid`). Intensities are
tissue mixtures with contrast-appropriate values (:data:`TISSUE`): T1 WM > GM > CSF; T1c as T1 plus
enhancement; T2 CSF brightest, WM darkest; FLAIR like T2 with CSF suppressed.

Per-subject anatomy (nuisance, independent of markers): global scale N(1, 0.035), a smooth displacement
field (three random cosines, 1.5 mm each), tissue-contrast jitter (3 %), and atrophy a = sigmoid(f_atrophy)
(age-driven): ventricles magnified around their centre (up to 30 %) and 25 % * a of cortical GM turned
into CSF.

Tumour (latent -> image, each map strictly monotone in its latent):

- location: target anterior-posterior world y = -18 + 50 tanh(0.5 f_location) mm (frontal for 1p/19q and
  IDH-mutant); the centre is a random supratentorial white-matter voxel within 5 mm of that y, hemisphere
  at random, deep enough for the tumour.
- size: core radius 15 exp(0.25 f_size) mm (clipped 7-30), shape irregularity +-15 % (random cosines).
- necrosis: necrotic radius 0.85 sigmoid(1.5 f_necrosis - 0.5) r_core - 2 mm (label 1).
- enhancement: strength sigmoid(1.5 f_enhancement), strongest in the outer 6 mm rim; voxels with local
  enhancement > 0.4 are label 4, other non-necrotic core is non-enhancing tumour (label 1).
- heterogeneity (Ki-67): enhancement multiplied by 1 + 0.6 sigmoid(f_heterogeneity) * texture.
- edema (EGFR): radius r_core (1.2 + sigmoid(1.2 f_edema)), weighted by white-matter affinity (label 2
  where inside that radius, outside the core and mostly WM/GM).
- mismatch (IDH-mutant, non-codeleted): FLAIR of the inner core suppressed by 55 % sigmoid(2 f - 2), T2 up.
- calcification (1p/19q): six dark foci (Gaussian sd 3 mm, so visible on the pipeline's 3 mm grid) in the
  core, depth 0.8 sigmoid(2 f_calcification - 2.5).
- margin (ATRX, TP53, TP53-IHC): boundary width 3.5 exp(-0.5 f_margin) mm (clipped 1.5-8: at 3 mm voxels
  narrower margins would all look alike).
- core_t2 (MGMT, weak): core T2 times 1 + 0.08 tanh(f / 1.5); core_t1 (TERT, weak): core T1 times
  1 - 0.08 tanh(f / 1.5).

Protocol (per exam, drawn from the site's distributions, :func:`draw_protocol`): tissue contrast (spread of
the tissue intensities around grey matter), contrast-agent enhancement gain (dose and timing), FLAIR CSF
signal (suppression), slice-profile FWHM (through-plane blur of anatomy and tumour), noise level and
bias-field strength. These overlap between sites and survive a z-score.

Scanner (per site): a ghost artifact when drawn (a copy of the head at :data:`GHOST` amplitude shifted by half
the field of view along the phase-encoding axis, as an N/2 or motion ghost: a structure inside every
tumour-centred crop that survives z-scoring and that the pretrained embeddings carry; a fainter cue, a 10 %
sinusoidal stripe, was invisible to them, probe AUC 0.46-0.49), in-plane Gaussian blur,
multiplicative bias field exp(bias * smooth polynomial), Rician noise, gain and offset per contrast; the
background outside the (warped) brain is 0, as in skull-stripped data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nrfm.synth.sites import CONTRASTS, SiteTemplate

# Relative intensities (t1, t1c, t2, flair) of healthy tissue and tumour compartments.
TISSUE = {
    "csf": (0.30, 0.30, 1.60, 0.12), "gm": (0.62, 0.65, 0.95, 0.95), "wm": (1.00, 1.00, 0.62, 0.70),
    "edema": (0.62, 0.62, 1.30, 1.30), "solid": (0.55, 0.58, 1.20, 1.22), "necrosis": (0.32, 0.34, 1.45, 0.85),
}
ENHANCEMENT_GAIN = 1.3  # added to T1c per unit of local enhancement
# The ghost's amplitude relative to the image. Chosen for salience, as the background of Waterbirds is: a
# cross-validated probe for it on the four pretrained embeddings of a run without it read 0.81-0.97 at 0.4 and
# 0.90-0.99 at 0.6 (275 exams, 2026-12-01).
GHOST = {"amplitude": 0.5, "shift": "half the field of view along the phase-encoding axis"}
# Per-exam protocol draws around the site means (SiteTemplate.tissue_contrast, .enhancement, .flair_csf):
# normal with these sds; slice profile FWHM uniform in the site's range; noise and bias-field strength the
# site's value times uniform factors. Sites overlap, and none of these is undone by a z-score.
# Cue sizes chosen to be resolvable on the pipeline's 3 mm grid (see the module docstring).
FOCUS_SD_MM = 3.0
MARGIN_MM, MARGIN_CLIP_MM = 3.5, (1.5, 8.0)
PROTOCOL_SD = {"tissue_contrast": 0.06, "enhancement": 0.15, "flair_csf": 0.25}
PROTOCOL_FACTOR = {"noise": (0.75, 1.25), "bias": (0.6, 1.4)}
_TEMPLATE_MM = 2.0
_BBOX = (np.array([-84.0, -118.0, -84.0]), np.array([84.0, 84.0, 94.0]))  # MNI brain +- 12 mm
_VENTRICLE_MM = np.array([0.0, -15.0, 13.0])
_CENTRE_MM = np.array([0.0, -22.0, 10.0])
_AXIS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
_TEMPLATE: dict = {}
_GRIDS: dict = {}


def _template() -> dict:
    """GM, WM, CSF probability maps of MNI152 at 2 mm (loaded once per process, offline)."""
    if not _TEMPLATE:
        from nilearn import datasets

        gm = datasets.load_mni152_gm_template(resolution=2)
        wm = datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
        mask = datasets.load_mni152_brain_mask(resolution=2).get_fdata(dtype=np.float32) > 0.5
        g = np.clip(gm.get_fdata(dtype=np.float32), 0, 1) * mask
        w = np.clip(wm, 0, 1) * mask
        total = np.maximum(g + w, 1.0)  # keep GM + WM <= 1
        g, w = g / total, w / total
        _TEMPLATE.update(gm=g, wm=w, csf=np.clip(mask - g - w, 0, 1).astype(np.float32), affine=gm.affine.copy())
    return _TEMPLATE


def grid_affine(orientation: str, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of a grid with ``orientation`` codes and ``spacing`` covering the MNI brain box."""
    lo, hi = _BBOX
    affine, shape = np.eye(4), []
    for k, (code, sp) in enumerate(zip(orientation, spacing)):
        axis, sign = _AXIS[code]
        n = int(np.ceil((hi[axis] - lo[axis]) / sp)) + 1
        affine[:, k] = 0.0
        affine[axis, k] = sign * sp
        affine[axis, 3] = lo[axis] if sign > 0 else lo[axis] + (n - 1) * sp
        shape.append(n)
    return affine, tuple(shape)


@dataclass
class SiteGrid:
    """A site's voxel grid with the template pre-smoothed for it (cached per orientation and spacing)."""

    affine: np.ndarray  # (4, 4) voxel -> world (mm, RAS+)
    shape: tuple[int, int, int]
    world: np.ndarray  # (3, X, Y, Z) float32 world coordinates of every voxel
    maps: dict  # "gm", "wm", "csf": template-space (2 mm) maps smoothed for this grid
    candidates: np.ndarray  # (M, 4) world xyz of possible tumour centres and their depth in the brain (mm)
    inside: np.ndarray  # flat indices of voxels within 14 mm of the template brain (all a warp can reach)


def site_grid(orientation: str, spacing: tuple[float, float, float]) -> SiteGrid:
    """Build (once per process) the grid of a site; see :class:`SiteGrid`."""
    key = (orientation, tuple(float(s) for s in spacing))
    if key in _GRIDS:
        return _GRIDS[key]
    tpl = _template()
    affine, shape = grid_affine(orientation, spacing)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:4].astype(np.float32)).reshape(3, *shape)
    sigma = np.zeros(3)  # per world axis, template voxels: slice-profile anti-aliasing
    for code, sp in zip(orientation, spacing):
        sigma[_AXIS[code][0]] = np.sqrt(max(sp ** 2 - _TEMPLATE_MM ** 2, 0.0)) / 2.355 / _TEMPLATE_MM
    maps = {k: ndimage.gaussian_filter(tpl[k], sigma, mode="constant") for k in ("gm", "wm", "csf")}
    outside = ~ndimage.binary_dilation(sum(maps.values()) > 0.05, iterations=7)  # 7 x 2 mm
    tpl_idx = (world.reshape(3, -1) - tpl["affine"][:3, 3:4]) / _TEMPLATE_MM
    far = ndimage.map_coordinates(outside.astype(np.float32), tpl_idx, order=0, mode="constant", cval=1.0)
    inside = np.flatnonzero(far < 0.5)
    # Candidate tumour centres: supratentorial, off the midline, white matter, with depth in the brain.
    brain = (tpl["gm"] + tpl["wm"] + tpl["csf"]) > 0.5
    depth = ndimage.distance_transform_edt(brain) * _TEMPLATE_MM
    vox = np.argwhere((tpl["wm"] > 0.6) & (depth > 8))
    xyz = vox * _TEMPLATE_MM + tpl["affine"][:3, 3]
    keep = (xyz[:, 2] > -15) & (np.abs(xyz[:, 0]) > 8)
    cand = np.column_stack([xyz[keep], depth[tuple(vox[keep].T)]])
    grid = SiteGrid(affine, shape, world, maps, cand, inside)
    _GRIDS[key] = grid
    return grid


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _cosine_field(points: np.ndarray, rng: np.random.Generator, n: int, wavelength: float) -> np.ndarray:
    """Smooth random field with unit sd at ``points`` (3, ...): sum of ``n`` random plane cosines."""
    k = rng.standard_normal((n, 3))
    k *= (2 * np.pi / wavelength) / np.linalg.norm(k, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, n)
    flat = points.reshape(3, -1).astype(np.float32)  # float32: twice as fast, precision is irrelevant here
    field = np.cos(k.astype(np.float32) @ flat + phase.astype(np.float32)[:, None]).sum(0) * np.float32(np.sqrt(2.0 / n))
    return field.reshape(points.shape[1:])


def _warp_tissues(grid: SiteGrid, atrophy: float, rng: np.random.Generator) -> dict:
    """Template tissue maps sampled through the subject's deformation, on the site grid."""
    p = grid.world.reshape(3, -1)[:, grid.inside].astype(np.float64)
    scale = float(np.clip(rng.normal(1.0, 0.035), 0.92, 1.08))
    c = _CENTRE_MM[:, None]
    q = c + (p - c) / scale
    v = q - _VENTRICLE_MM[:, None]
    q = q - 0.3 * atrophy * np.exp(-(v ** 2).sum(0) / (2 * 22.0 ** 2)) * v
    for _ in range(3):  # smooth displacement, 1.5 mm per component
        direction = rng.standard_normal(3)
        q = q + 1.5 * (direction / np.linalg.norm(direction))[:, None] * _cosine_field(p, rng, 1, 70.0)[None]
    tpl_aff = _template()["affine"]
    idx = (q - tpl_aff[:3, 3:4]) / _TEMPLATE_MM
    out = {}
    for k in ("gm", "wm", "csf"):
        full = np.zeros(int(np.prod(grid.shape)), np.float32)
        full[grid.inside] = ndimage.map_coordinates(grid.maps[k], idx, order=1, mode="constant", cval=0.0)
        out[k] = full.reshape(grid.shape)
    shrink = 0.25 * atrophy * out["gm"]
    out["gm"], out["csf"] = out["gm"] - shrink, out["csf"] + shrink
    return out


def _tumour_centre(grid: SiteGrid, f: dict, r_core: float, rng: np.random.Generator) -> np.ndarray:
    y_target = -18.0 + 50.0 * np.tanh(0.5 * f["location"])
    cand = grid.candidates
    side = cand[:, 0] > 0 if rng.random() < 0.5 else cand[:, 0] < 0
    ok = side & (cand[:, 3] >= min(0.7 * r_core, 24.0))
    near = ok & (np.abs(cand[:, 1] - y_target) < 5.0)
    if near.sum() == 0:  # no voxel that deep near the target: take the 20 closest in y
        order = np.argsort(np.abs(cand[:, 1] - y_target) + 1e6 * ~ok)
        near = np.zeros(len(cand), bool)
        near[order[:20]] = True
    pick = np.flatnonzero(near)[rng.integers(near.sum())]
    return cand[pick, :3] + rng.uniform(-1.0, 1.0, 3)  # sub-voxel jitter


def draw_protocol(site: SiteTemplate, rng: np.random.Generator) -> dict:
    """This exam's acquisition settings, drawn from the site's distributions (see :data:`PROTOCOL_SD`)."""
    return {"tissue_contrast": float(max(0.6, rng.normal(site.tissue_contrast, PROTOCOL_SD["tissue_contrast"]))),
            "enhancement": float(max(0.2, rng.normal(site.enhancement, PROTOCOL_SD["enhancement"]))),
            "flair_csf": float(max(0.2, rng.normal(site.flair_csf, PROTOCOL_SD["flair_csf"]))),
            "slice_fwhm_mm": float(rng.uniform(*site.slice_fwhm_mm)),
            "noise": float(site.noise * rng.uniform(*PROTOCOL_FACTOR["noise"])),
            "bias": float(site.bias * rng.uniform(*PROTOCOL_FACTOR["bias"]))}


def protocol_tissue(protocol: dict) -> dict:
    """:data:`TISSUE` under this exam's tissue contrast (spread around grey matter) and FLAIR CSF signal."""
    k = protocol["tissue_contrast"]
    out = {t: tuple(TISSUE["gm"][c] + k * (v[c] - TISSUE["gm"][c]) for c in range(4)) for t, v in TISSUE.items()}
    csf = list(out["csf"])
    csf[3] = TISSUE["csf"][3] * protocol["flair_csf"]
    out["csf"] = tuple(csf)
    return out


def render_subject(site: SiteTemplate, grid: SiteGrid, f: dict, artifact: bool, rng: np.random.Generator,
                   tumour_rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Render one exam.

    Args:
        site: scanner model (blur, noise, bias, gain, offset, phase axis).
        grid: the site's grid from :func:`site_grid`.
        f: phenotype latents by name (``location``, ``size``, ... as in ``synth_markers.FEATURES``).
        artifact: whether the ghost artifact (the scenario's cue) is present.
        rng: this exam's nuisance generator (deformation, contrast jitter, scanner).
        tumour_rng: this patient's tumour generator (centre, shape, texture, foci), shared by the
            patient's exams so a follow-up shows the same tumour in the same place.
    Returns:
        ({contrast: (X, Y, Z) float32}, seg (X, Y, Z) uint8 with labels 0/1/2/4).
    """
    tis = _warp_tissues(grid, float(_sigmoid(f["atrophy"])), rng)
    brain = tis["gm"] + tis["wm"] + tis["csf"]
    mask = brain > 0.5
    safe = np.maximum(brain, 1e-6)
    jitter = 1.0 + 0.03 * rng.standard_normal((3, 4))
    protocol = draw_protocol(site, rng)
    tissue = protocol_tissue(protocol)
    img = np.stack([sum(tis[t] * tissue[t][c] * jitter[i, c] for i, t in enumerate(("csf", "gm", "wm"))) / safe
                    for c in range(4)])  # (4, X, Y, Z)
    seg = np.zeros(grid.shape, np.uint8)

    r_core = float(np.clip(15.0 * np.exp(0.25 * f["size"]), 7.0, 30.0))
    width = float(np.clip(MARGIN_MM * np.exp(-0.5 * f["margin"]), *MARGIN_CLIP_MM))
    r_ed = r_core * (1.2 + _sigmoid(1.2 * f["edema"]))
    centre = _tumour_centre(grid, f, r_core, tumour_rng)
    half = r_ed * 1.15 + 3 * width + 6.0
    corners = centre[:, None] + half * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1)
    vox = np.linalg.solve(grid.affine[:3, :3], corners - grid.affine[:3, 3:4])
    lo = np.clip(np.floor(vox.min(1)).astype(int), 0, None)
    hi = np.minimum(np.ceil(vox.max(1)).astype(int) + 1, grid.shape)
    blk = tuple(slice(a, b) for a, b in zip(lo, hi))
    q = grid.world[(slice(None),) + blk].astype(np.float64) - centre[:, None, None, None]
    dist = np.sqrt((q ** 2).sum(0)) / (1.0 + 0.15 * _cosine_field(q, tumour_rng, 4, 35.0))
    core = _sigmoid((r_core - dist) / width)
    r_nec = 0.85 * _sigmoid(1.5 * f["necrosis"] - 0.5) * r_core - 2.0
    nec = core * _sigmoid((r_nec - dist) / width)
    b_brain = safe[blk]
    affinity = (tis["wm"][blk] + 0.5 * tis["gm"][blk] + 0.05 * tis["csf"][blk]) / b_brain
    lesion = _sigmoid((r_ed - dist) / (width + 2.0))
    edema = np.clip(lesion - core, 0, None) * np.clip(affinity, 0, 1)
    solid = core - nec
    texture = _cosine_field(q, tumour_rng, 8, 12.0)
    shell = _sigmoid((dist - (r_core - 6.0)) / 2.0)
    local = _sigmoid(1.5 * f["enhancement"]) * (0.35 + 0.65 * shell)
    local = np.clip(local * (1.0 + 0.6 * _sigmoid(f["heterogeneity"]) * texture), 0, None)
    mismatch = _sigmoid(2.0 * f["mismatch"] - 2.0) * _sigmoid((r_core - 4.0 - dist) / width)
    foci = 0.9 * r_core * tumour_rng.uniform(-1, 1, (6, 3)) / np.sqrt(3)
    blob = np.max([np.exp(-((q - foci[j][:, None, None, None]) ** 2).sum(0) / (2 * FOCUS_SD_MM ** 2)) for j in range(6)], 0)
    calc = 0.8 * _sigmoid(2.0 * f["calcification"] - 2.5) * blob * core
    grain = 1.0 + 0.05 * _cosine_field(q, tumour_rng, 8, 8.0)
    mgmt_t2 = 1.0 + 0.08 * np.tanh(f["core_t2"] / 1.5)
    tert_t1 = 1.0 - 0.08 * np.tanh(f["core_t1"] / 1.5)
    for c in range(4):
        solid_val = tissue["solid"][c] * np.ones_like(dist)
        if c == 0:
            solid_val = solid_val * tert_t1
        if c == 1:
            solid_val = solid_val + ENHANCEMENT_GAIN * protocol["enhancement"] * local
        if c == 2:
            solid_val = solid_val * (1.0 + 0.12 * mismatch) * mgmt_t2
        if c == 3:
            solid_val = solid_val * (1.0 - 0.55 * mismatch)
        nec_val = tissue["necrosis"][c] * (mgmt_t2 if c == 2 else 1.0)
        mix = (1.0 - core - edema) * img[c][blk] + solid * solid_val + nec * nec_val + edema * tissue["edema"][c]
        mix = mix * (1.0 + 0.2 * calc if c == 0 else 1.0 - calc) * np.where(core + edema > 0.05, grain, 1.0)
        img[c][blk] = mix
    is_edema = (lesion >= 0.5) & (affinity > 0.4)
    labels = np.where(core >= 0.5, np.where((nec < 0.5 * core) & (local > 0.4), 4, 1), np.where(is_edema, 2, 0))
    seg[blk] = np.where(mask[blk], labels, 0).astype(np.uint8)
    return _scanner(site, grid, img, mask, artifact, rng, protocol), seg


def _scanner(site: SiteTemplate, grid: SiteGrid, img: np.ndarray, mask: np.ndarray, artifact: bool,
             rng: np.random.Generator, protocol: dict) -> dict:
    """Artifact, in-plane and slice-profile blur, bias field, Rician noise, gain and offset; 0 outside the brain."""
    spacing = np.abs(grid.affine[:3, :3]).sum(0)
    if artifact:  # N/2 ghost: the head plus a fainter copy of itself shifted by half the phase-encoding FOV
        axis = site.phase_axis + 1  # img is (contrast, X, Y, Z)
        img = img + GHOST["amplitude"] * np.roll(img, grid.shape[site.phase_axis] // 2, axis=axis)
    sigma = [0.0] + [site.blur_mm / 2.355 / spacing[a] for a in range(2)] \
        + [protocol["slice_fwhm_mm"] / 2.355 / spacing[2]]  # voxel axis 2 = the slice axis
    if max(sigma) > 0:
        img = ndimage.gaussian_filter(img, sigma, mode="nearest")
    w = (grid.world - _CENTRE_MM[:, None, None, None]) / 80.0
    coef = rng.standard_normal(6) / np.sqrt(6)
    log_bias = coef[0] * w[0] + coef[1] * w[1] + coef[2] * w[2] + coef[3] * w[0] * w[1] + coef[4] * w[2] ** 2 \
        + coef[5] * w[1] * w[2]
    img = img * np.exp(protocol["bias"] * log_bias)[None]
    out, n = {}, int(mask.sum())
    for c, name in enumerate(CONTRASTS):
        noise = protocol["noise"] * rng.standard_normal((2, n))
        vol = np.zeros(grid.shape, np.float32)
        vol[mask] = site.scale[c] * np.sqrt((img[c][mask] + noise[0]) ** 2 + noise[1] ** 2) + site.offset[c]
        out[name] = vol
    return out
