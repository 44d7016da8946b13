"""Safe file writing and checkpoint loading.

Everything nrfm writes that another stage or a user reads (checkpoints, CSVs, JSON, the report) goes through
an atomic write: a temporary file in the same folder, flushed and fsynced, then ``os.replace``. A crash or
kill therefore leaves either the old file or the new one, never half of one. Checkpoints are loaded with
``torch.load(..., weights_only=True)`` only: a checkpoint is data, never code.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from nrfm.errors import CheckpointError, RunError


def _write_error(path: Path, err: OSError) -> RunError:
    if err.errno == errno.ENOSPC:
        return RunError(f"{path}: no space left on the device while writing")
    if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return RunError(f"{path}: cannot write here (read-only or permission denied)")
    return RunError(f"{path}: cannot write ({err.strerror or err})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename), mode 0666 minus umask."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index, floats at full precision)."""
    return atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def atomic_torch_save(path: str | Path, obj: Mapping[str, Any]) -> Path:
    """``torch.save`` to memory, then an atomic write."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a corrupt or foreign file is a one-line CheckpointError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files (pickle, zip, runtime errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable nrfm checkpoint ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an nrfm checkpoint (expected a mapping, got {type(obj).__name__})")
    return obj
