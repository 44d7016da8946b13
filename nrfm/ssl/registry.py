"""The registry of self-supervised methods: a new method is one new file in ``nrfm/ssl/methods/``.

The method names are the module names in that folder, found without importing them (so validating a config
does not import torch). A method module defines one :class:`~nrfm.ssl.base.SSLMethod` subclass decorated with
:func:`register`; everything else is derived from the class: the backbone architecture
(``architecture``), the views it consumes (``n_global_views``, ``uses_local_views``, ``strong_views``), its
learning-rate scale and how it is built from the config (``from_config``).

Example, ``nrfm/ssl/methods/simsiam.py``::

    @register
    class SimSiam(SSLMethod):
        name = "simsiam"
        ...
        @classmethod
        def from_config(cls, backbone, cfg):
            return cls(backbone, cfg.head_hidden_dim, cfg.head_out_dim)
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import cache
from typing import Any

METHODS_PACKAGE = "nrfm.ssl.methods"
_CLASSES: dict[str, Any] = {}


@cache
def method_names() -> tuple[str, ...]:
    """The registered method names, sorted (the module names of ``nrfm/ssl/methods/``)."""
    spec = importlib.util.find_spec(METHODS_PACKAGE)
    return tuple(sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)
                        if not m.name.startswith("_")))


def register(cls):
    """Class decorator: make ``cls`` the method named ``cls.name`` (which must be its module's name)."""
    module_name = cls.__module__.rpartition(".")[2]
    if cls.name != module_name:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: name {cls.name!r} must equal the module name "
                         f"{module_name!r} (the registry finds methods by file name)")
    _CLASSES[cls.name] = cls
    return cls


def method_class(name: str):
    """The :class:`~nrfm.ssl.base.SSLMethod` subclass registered as ``name``.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name not in method_names():
        raise ValueError(f"unknown SSL method {name!r}; valid: {list(method_names())}")
    if name not in _CLASSES:
        importlib.import_module(f"{METHODS_PACKAGE}.{name}")  # imported on first use: torch, lightly
    return _CLASSES[name]
