"""MONAI preprocessing shared by every cohort, with a content-keyed on-disk cache.

Each exam goes through the same chain (synthetic and real alike): MONAI ``LoadImaged`` and
``EnsureChannelFirstd`` for the four contrasts [t1, t1c, t2, flair] and the tumour mask, ``Orientationd``
to RAS, ``Spacingd`` to ``cfg.spacing_mm`` (trilinear for images, nearest for the mask), a z-score of each
contrast inside the brain (voxels where any contrast is non-zero; the public cohorts are skull-stripped),
and a ``cfg.crop_size`` box centred on the tumour's bounding box, zero-padded where it leaves the volume.
Without a mask (or with an empty one) the box is centred on the brain and a warning says so once.

Mask labels follow BraTS 2021: 1 necrotic core, 2 oedema, 4 enhancing. Label 3 (BraTS 2023's enhancing
tumour; possibly UCSF-PDGM's) is read as 4, so every cohort comes out with labels {0, 1, 2, 4}.

Cache: one folder per exam under ``<cfg.cache_dir>/volumes/<key>/`` holding ``image.npy``, ``seg.npy``,
``brain.npy``, ``affine.npy`` and ``meta.json``, written to a temporary folder and renamed into place. The key
is a SHA-256 over :data:`TRANSFORM_VERSION`, every preprocessing setting, and the SHA-256 of each input
file's bytes, so a changed file or setting can never be served a stale volume. Hashing ~40 MB per real exam
on every start would dominate a warm run, so content hashes are remembered in
``<cfg.cache_dir>/file_hashes.json`` against (size, mtime_ns, inode) and recomputed whenever any of those
change; only a rewrite keeping size, nanosecond mtime and inode could evade it (pass ``rehash=True`` to
:class:`VolumeDataset` to hash every file regardless, e.g. on file systems with coarse timestamps).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from nrfm.config import PreprocessingConfig
from nrfm.errors import DataError
from nrfm.files import atomic_write_json
from nrfm.data.manifest import IMAGE_COLUMNS, PATH_COLUMNS

TRANSFORM_VERSION = "1"  # bump whenever preprocessing changes what it outputs: invalidates every cache entry
AFFINE_TOL_MM = 1e-3  # contrasts of one exam must share their affine to this (co-registered public cohorts)
SEG_LABELS = (0, 1, 2, 3, 4)


def _first_line(err: BaseException) -> str:
    while err.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
        err = err.__cause__
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


# ------------------------------------------------------------------------------------- file-level checks
def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI with nibabel and check it: exists, readable to the end, 3-D, finite.

    Returns:
        (voxels as stored, shape (X, Y, Z); 4x4 voxel-to-world affine).

    Raises:
        DataError: ``<file>: <problem>`` for each failure above.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, OSError, ... for foreign files
        raise DataError(f"{path}: not a readable NIfTI file ({_first_line(err)})") from None
    if len(img.shape) != 3:
        raise DataError(f"{path}: {len(img.shape)}-D volume of shape {tuple(img.shape)} where a 3-D volume is expected")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # EOFError, zlib.error, ValueError for a short file
        raise DataError(f"{path}: truncated or corrupt NIfTI data ({_first_line(err)})") from None
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(f"{path}: {bad} NaN or infinite voxels")
    return data, np.asarray(img.affine, dtype=np.float64)


def check_subject_files(row: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """All file problems of one manifest row, as ``(level, column, message)``; level is error or warning.

    Used by :func:`nrfm.data.validation.validate_manifest`. Empty image paths are reported by the value checks.
    """
    problems: list[tuple[str, str, str]] = []
    ref: tuple[str, tuple, np.ndarray] | None = None
    for col in PATH_COLUMNS:
        path = row.get(col) or ""
        if not path:
            continue
        try:
            data, affine = read_volume(path)
        except DataError as err:
            problems.append(("error", col, str(err)))
            continue
        if ref is None:
            ref = (col, data.shape, affine)
        elif data.shape != ref[1]:
            problems.append(("error", col, f"{path}: shape {data.shape} differs from {ref[0]}'s {ref[1]}"))
        elif not np.allclose(affine, ref[2], rtol=0, atol=AFFINE_TOL_MM):
            diff = float(np.abs(affine - ref[2]).max())
            problems.append(("error", col, f"{path}: affine differs from {ref[0]}'s by up to {diff:.3g} "
                                           f"(tolerance {AFFINE_TOL_MM}); contrasts must be co-registered"))
        if col == "seg":
            values = np.unique(data)
            odd = [v for v in values.tolist() if v not in SEG_LABELS]
            if odd:
                problems.append(("error", col, f"{path}: mask labels {odd[:5]} outside {{0, 1, 2, 3, 4}}"))
            elif values.max(initial=0) == 0:
                problems.append(("warning", col, f"{path}: empty tumour mask; the crop falls back to the brain centre"))
        elif not np.any(data):
            problems.append(("error", col, f"{path}: every voxel is zero"))
    return problems


# --------------------------------------------------------------------------------------- preprocessing
def _crop(volume: np.ndarray, start: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Crop (C, X, Y, Z) at ``start`` with zero padding outside the volume, so the box keeps its centre."""
    out = np.zeros((volume.shape[0],) + tuple(size), dtype=volume.dtype)
    src = [slice(max(int(s), 0), min(int(s) + n, dim)) for s, n, dim in zip(start, size, volume.shape[1:])]
    if all(sl.stop > sl.start for sl in src):
        dst = tuple(slice(sl.start - int(s), sl.stop - int(s)) for sl, s in zip(src, start))
        out[(slice(None),) + dst] = volume[(slice(None),) + tuple(src)]
    return out


def _bbox_centre(mask: np.ndarray) -> np.ndarray:
    coords = np.nonzero(mask)
    return np.array([(int(c.min()) + int(c.max())) // 2 for c in coords])


def preprocess_subject(row: Mapping[str, Any], cfg: PreprocessingConfig) -> dict[str, np.ndarray]:
    """Preprocess one exam without the cache (tests, notebooks).

    Args:
        row: a manifest row with absolute paths ``t1, t1c, t2, flair`` and optional ``seg``.
        cfg: spacing and crop size.

    Returns:
        ``image`` float32 (4, D, H, W) in [t1, t1c, t2, flair] order, z-scored in the brain and 0 outside;
        ``seg`` uint8 (1, D, H, W) with labels {0, 1, 2, 4}; ``brain`` bool (1, D, H, W); ``affine`` float64
        (4, 4), voxel to RAS world (mm) of the crop; ``centred_on_mask`` 0-d bool. (D, H, W) = cfg.crop_size.

    Raises:
        DataError: naming the file that is missing, unreadable, not 3-D, non-finite, all zero, or whose
            shape/affine differ from the exam's t1.
    """
    from monai.transforms import Compose, ConcatItemsd, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    sid = row.get("subject_id", "?")
    for col in IMAGE_COLUMNS:
        if not row.get(col):
            raise DataError(f"subject {sid}: no {col} path in the manifest")
    keys = [c for c in PATH_COLUMNS if row.get(c)]
    data: dict[str, Any] = {k: str(row[k]) for k in keys}
    for key in keys:
        path = data[key]
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found (subject {sid}, column {key})")
        try:
            data = LoadImaged(keys=key, reader="NibabelReader", image_only=True, dtype=np.float32)(data)
        except Exception as err:  # reader errors arrive wrapped in MONAI's RuntimeError
            raise DataError(f"{path}: not a readable NIfTI file ({_first_line(err)})") from None
        volume = data[key].array  # plain numpy: MetaTensor dispatch would dominate these checks
        if volume.ndim != 3:
            raise DataError(f"{path}: {volume.ndim}-D volume of shape {tuple(volume.shape)} where a 3-D volume "
                            "is expected")
        finite = np.isfinite(volume)
        if not finite.all():
            raise DataError(f"{path}: {int(finite.size - finite.sum())} NaN or infinite voxels")
    ref = data["t1"]
    for key in keys[1:]:
        if tuple(data[key].shape) != tuple(ref.shape):
            raise DataError(f"{row[key]}: shape {tuple(data[key].shape)} differs from t1's {tuple(ref.shape)} "
                            f"({row['t1']})")
        if not torch.allclose(data[key].affine.double(), ref.affine.double(), rtol=0, atol=AFFINE_TOL_MM):
            raise DataError(f"{row[key]}: affine differs from t1's ({row['t1']}); contrasts must be co-registered")
        data[key].affine = ref.affine.clone()  # identical grids resample to identical shapes
    # The contrasts travel as one 4-channel image so the resampling grid is computed once, not four times.
    spatial = ["image", "seg"] if "seg" in data else ["image"]
    chain = Compose([
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        ConcatItemsd(keys=list(IMAGE_COLUMNS), name="image", dim=0),
        Orientationd(keys=spatial, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=spatial, pixdim=tuple(cfg.spacing_mm), mode=["bilinear", "nearest"][: len(spatial)],
                 padding_mode="zeros", dtype=np.float32),
    ])
    data = chain(data)
    image = np.asarray(data["image"].array, dtype=np.float32)
    affine = np.asarray(data["image"].affine, dtype=np.float64)
    if "seg" in data:
        seg = np.rint(np.asarray(data["seg"].array[0])).astype(np.int64)
        odd = sorted(set(np.unique(seg).tolist()) - set(SEG_LABELS))
        if odd:
            raise DataError(f"{row['seg']}: mask labels {odd[:5]} outside {{0, 1, 2, 3, 4}}")
        seg[seg == 3] = 4
    else:
        seg = np.zeros(image.shape[1:], dtype=np.int64)
    brain = np.any(image != 0, axis=0)
    if not brain.any():
        raise DataError(f"{row['t1']}: every voxel of the exam is zero")
    for c in range(image.shape[0]):
        inside = image[c][brain].astype(np.float64)
        image[c] = (image[c] - inside.mean()) / max(inside.std(), 1e-6)
    image[:, ~brain] = 0.0
    on_mask = bool(seg.any())
    centre = _bbox_centre(seg > 0) if on_mask else _bbox_centre(brain)
    start = centre - np.asarray(cfg.crop_size) // 2
    shift = np.eye(4)
    shift[:3, 3] = start
    return {
        "image": _crop(image, start, cfg.crop_size),
        "seg": _crop(seg[None].astype(np.uint8), start, cfg.crop_size),
        "brain": _crop(brain[None], start, cfg.crop_size),
        "affine": affine @ shift,
        "centred_on_mask": np.array(on_mask),
    }


# ----------------------------------------------------------------------------------------------- cache
class _ContentHashes:
    """SHA-256 of files' bytes, remembered against (size, mtime_ns, inode) in a small JSON file."""

    def __init__(self, memo: Path, rehash: bool = False):
        self.memo, self.rehash, self.dirty = memo, rehash, False
        try:
            self.table: dict[str, dict] = json.loads(memo.read_text()) if memo.is_file() and not rehash else {}
        except (OSError, ValueError):  # a damaged memo only costs re-hashing
            self.table = {}

    def digest(self, path: str, sid: str, col: str) -> str:
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"{path}: file not found (subject {sid}, column {col})") from None
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        entry = self.table.get(path)
        if entry and all(entry.get(k) == v for k, v in stamp.items()):
            return entry["sha256"]
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        self.table[path] = {**stamp, "sha256": sha.hexdigest()}
        self.dirty = True
        return sha.hexdigest()

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.memo, self.table)


def cache_key(row: Mapping[str, Any], cfg: PreprocessingConfig, hashes: _ContentHashes) -> str:
    """SHA-256 over the transform version, every preprocessing setting and each input file's content hash."""
    sid = str(row.get("subject_id", "?"))
    files = {c: hashes.digest(str(row[c]), sid, c) if row.get(c) else "" for c in PATH_COLUMNS}
    settings = {"version": TRANSFORM_VERSION, "spacing_mm": [float(s) for s in cfg.spacing_mm],
                "crop_size": [int(s) for s in cfg.crop_size], "files": files}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


_ARRAYS = ("image", "seg", "brain", "affine")
PARALLEL_MIN_EXAMS = 16  # preprocessing threads for at least this many missing exams
MAX_WORKERS = 4

def _store_entry(task: tuple) -> None:
    """Preprocess one exam into the cache folder ``root/key`` (written under a temporary name, then renamed)."""
    row, cfg, root, key = task
    root = Path(root)
    arrays = preprocess_subject(row, cfg)
    final = root / key
    tmp = root / f".{key}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        meta = {"subject_id": row["subject_id"], "version": TRANSFORM_VERSION,
                "centred_on_mask": bool(arrays["centred_on_mask"]), "files": {c: row[c] for c in PATH_COLUMNS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, final)
    except OSError as err:
        if not (final / "meta.json").is_file():  # not a concurrent writer finishing first: a real failure
            raise DataError(f"{root}: cannot write the preprocessing cache ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class VolumeDataset(Dataset):
    """Preprocessed exams of a manifest, in row order, served from the on-disk cache.

    ``__getitem__(i)`` returns ``{"image": float32 (4, D, H, W), "seg": uint8 (1, D, H, W), "brain": bool
    (1, D, H, W), "index": i}``. Items are read with ``np.load(mmap_mode="r")`` and copied, so memory does not
    grow with the cohort.

    Args:
        df: manifest rows (absolute paths, as from :func:`nrfm.data.manifest.read_manifest`).
        cfg: preprocessing settings (``cache_dir`` is where entries live).
        progress: show tqdm bars while hashing and preprocessing.
        build: fill the cache now (default); otherwise call :meth:`build` before indexing.
        rehash: hash every input file's bytes even when size, mtime and inode are unchanged.
    """

    def __init__(self, df: pd.DataFrame, cfg: PreprocessingConfig, progress: bool = True, build: bool = True,
                 rehash: bool = False):
        missing = [c for c in ("subject_id",) + IMAGE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"manifest frame lacks columns {missing}; read it with nrfm.data.manifest.read_manifest")
        self.cfg = cfg
        self.root = Path(cfg.cache_dir) / "volumes"
        self.rows = [{c: ("" if pd.isna(r.get(c, "")) else str(r.get(c, ""))) for c in ("subject_id",) + PATH_COLUMNS}
                     for r in df.to_dict("records")]
        self.subject_ids: list[str] = [r["subject_id"] for r in self.rows]
        self.keys: list[str] = []
        self.centred_on_mask: list[bool] = []
        self.n_computed = 0  # exams preprocessed (cache misses) by the last build
        self._rehash = rehash
        if build:
            self.build(progress)

    def __len__(self) -> int:
        return len(self.rows)

    def build(self, progress: bool = True) -> "VolumeDataset":
        """Key every exam by content and settings, then preprocess those not in the cache (tqdm bar)."""
        from tqdm import tqdm

        hashes = _ContentHashes(Path(self.cfg.cache_dir) / "file_hashes.json", rehash=self._rehash)
        try:
            self.keys = [cache_key(r, self.cfg, hashes)
                         for r in tqdm(self.rows, desc="hashing inputs", unit="exam", disable=not progress)]
        finally:
            hashes.save()
        todo = [i for i, k in enumerate(self.keys) if not (self.root / k / "meta.json").is_file()]
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        if len(todo) >= PARALLEL_MIN_EXAMS and workers > 1:
            # exams are independent and the heavy parts (gzip, resampling) release the GIL: one thread per core,
            # entries written as in the serial loop (atomic folder rename), so the cache is the same either way
            from concurrent.futures import ThreadPoolExecutor

            tasks = [(self.rows[i], self.cfg, str(self.root), self.keys[i]) for i in todo]
            with ThreadPoolExecutor(workers) as pool:
                for _ in tqdm(pool.map(_store_entry, tasks), total=len(todo), desc="preprocessing", unit="exam",
                              disable=not progress):
                    pass
        else:
            for i in tqdm(todo, desc="preprocessing", unit="exam", disable=not progress):
                self._store(i)
        self.n_computed = len(todo)
        self.centred_on_mask = [bool(json.loads((self.root / k / "meta.json").read_text())["centred_on_mask"])
                                for k in self.keys]
        fallback = [s for s, m in zip(self.subject_ids, self.centred_on_mask) if not m]
        if fallback:
            warnings.warn(f"{len(fallback)} of {len(self)} exams have no tumour mask (e.g. {', '.join(fallback[:3])}); "
                          "their crops are centred on the brain", stacklevel=2)
        return self

    def _store(self, i: int) -> None:
        _store_entry((self.rows[i], self.cfg, str(self.root), self.keys[i]))

    def _load(self, i: int, name: str) -> np.ndarray:
        if not self.keys:
            raise RuntimeError("VolumeDataset.build() has not been called")
        folder = self.root / self.keys[i]
        if not (folder / "meta.json").is_file():  # cache cleared while in use: recompute this entry
            self._store(i)
        return np.array(np.load(folder / f"{name}.npy", mmap_mode="r"))

    def image(self, i: int) -> torch.Tensor:
        """Item ``i``'s (4, D, H, W) float32 image alone (one file read instead of three: the pretraining loader)."""
        return torch.from_numpy(self._load(i % len(self), "image"))

    def affine(self, i: int) -> np.ndarray:
        """(4, 4) voxel-to-RAS-world affine of item ``i``'s crop (for overlays in world coordinates)."""
        return self._load(i, "affine")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} exams")
        i = i % len(self)
        return {"image": torch.from_numpy(self._load(i, "image")), "seg": torch.from_numpy(self._load(i, "seg")),
                "brain": torch.from_numpy(self._load(i, "brain")), "index": i}


def preprocessed_dataset(df: pd.DataFrame, cfg: PreprocessingConfig, progress: bool = True) -> VolumeDataset:
    """The cached, preprocessed dataset of ``df``'s rows in order (cache built up front)."""
    return VolumeDataset(df, cfg, progress=progress)
