"""Where a run reads and writes: the workspace (the user's folder) and the package's own data.

The **workspace** is the folder a user works in: ``reports/``, ``data/`` (generated cohorts) and the
preprocessing cache live under it. It is ``--workdir`` if given, else the environment variable
``NRFM_WORKDIR``, else the current folder; never the folder the package happens to be installed in. From a
checkout, ``make run`` runs in the checkout, so the checkout is the workspace.

**Package data** (the notebooks and configs) is found through :mod:`importlib.resources`: a wheel carries
them under ``nrfm/resources/``; an editable install reads the checkout's ``notebooks/`` and ``configs/``.
:func:`resource_dir` is the one place that locates them.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from nrfm.errors import ConfigError

WORKDIR_ENV = "NRFM_WORKDIR"
RESOURCE_KINDS = ("notebooks", "configs")


def workspace_root() -> Path:
    """The workspace folder: ``$NRFM_WORKDIR`` if set, else the current folder (absolute)."""
    return Path(os.environ.get(WORKDIR_ENV) or os.getcwd()).expanduser().resolve()


def set_workspace(path: str | Path) -> Path:
    """Make ``path`` the workspace of this process and of the notebook kernels it starts."""
    root = Path(path).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{root}: cannot create the working folder ({err.strerror or err})") from None
    os.environ[WORKDIR_ENV] = str(root)
    return root


def resource_dir(kind: str) -> Path:
    """The packaged ``notebooks`` or ``configs`` folder (wheel: inside the package; editable: the checkout's)."""
    if kind not in RESOURCE_KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; valid: {list(RESOURCE_KINDS)}")
    package = resources.files("nrfm")
    shipped = package / "resources" / kind
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(str(package)).parent / kind  # editable install: the checkout next to the package


def source_checkout() -> Path | None:
    """The git checkout the package runs from (for provenance), or None for an installed wheel."""
    candidate = Path(str(resources.files("nrfm"))).parent
    return candidate if (candidate / ".git").exists() else None


def resolve_in_workspace(path: str | Path) -> Path:
    """A path from a config or the command line: absolute as given, relative to the workspace otherwise."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (workspace_root() / path).resolve()


def resolve_config_file(path: str | Path) -> Path:
    """A config named on the command line or in a notebook parameter.

    An existing path (absolute, or relative to the workspace) is used as is. Otherwise a packaged config is
    looked up by file name, so ``configs/smoke.yaml``, ``smoke.yaml`` and ``smoke`` all name the shipped smoke
    config from any folder. A name found nowhere is returned as the workspace path (the loader then reports it
    as not found).
    """
    given = Path(path).expanduser()
    candidate = given if given.is_absolute() else workspace_root() / given
    if candidate.exists() or given.is_absolute():
        return candidate.resolve()
    name = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    packaged = resource_dir("configs") / name
    return packaged if packaged.is_file() else candidate.resolve()


def packaged_notebooks() -> list[Path]:
    """The pipeline's notebooks in order (``NN_name.ipynb``)."""
    return sorted(resource_dir("notebooks").glob("[0-9][0-9]_*.ipynb"))
