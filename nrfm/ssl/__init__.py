"""Self-supervised pretraining methods on 3D backbones: BYOL, DINO, MAE, MoCo.

- :mod:`nrfm.ssl.base`: :class:`~nrfm.ssl.base.SSLMethod`, the interface the training loop calls;
- :mod:`nrfm.ssl.registry`: method names and classes (a new method is one new file in ``methods/``);
- :mod:`nrfm.ssl.methods`: one module per method;
- :mod:`nrfm.ssl.views`: the 3D views (crops and augmentations) each method consumes.

This package's ``__init__`` imports nothing heavy, so that config validation can list the methods.
"""
from __future__ import annotations

from nrfm.ssl.registry import method_class, method_names, register


def build_method(name: str, backbone, cfg):
    """The SSL method ``name`` around ``backbone`` with heads sized from ``cfg`` (a PretrainingConfig).

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    return method_class(name).from_config(backbone, cfg)


__all__ = ["build_method", "method_class", "method_names", "register"]
