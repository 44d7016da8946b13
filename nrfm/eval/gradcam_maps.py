"""Grad-CAM maps of the fine-tuned 3D models: :class:`GradCAM3D`, the target layer, one map per volume.

Grad-CAM (Selvaraju et al., ICCV 2017): for the target layer's activations A_k (B, K, d, h, w) and the chosen
output y (one endpoint's logit), ``cam = ReLU(sum_k w_k A_k)`` with ``w_k = mean over voxels of dy/dA_k``,
upsampled to the input grid. Scoring the maps against the tumour mask, the controls and the stage are in
:mod:`nrfm.eval.gradcam`.

pytorch-grad-cam 1.5.7 and 5-D input (read from its ``base_cam.py``, ``grad_cam.py``, ``utils/image.py``):
the channel weights and the weighted sum handle 5-D activations, and ``get_target_width_height`` returns the
sizes so that ``scale_cam_image`` upsamples with ``scipy.ndimage.zoom`` in the right axis order. What it
lacks for a mass-share score on coarse 3D maps (a ResNet's layer3 is 2^3 for a 24^3 crop):

* ``zoom`` uses a cubic spline (order 3) on a corner-aligned grid: the spline overshoots (values below 0 and
  above the coarse maximum) and the corner alignment stretches each coarse cell toward the border;
* each layer's CAM is min-max scaled *before* upsampling, which zeroes the weakest coarse cell and so moves
  CAM mass between regions.

:class:`GradCAM3D` therefore keeps pytorch-grad-cam's hooks, targets and weights (it subclasses ``GradCAM``)
and replaces only the upsampling: trilinear ``torch.nn.functional.interpolate`` with ``align_corners=False``
(each coarse cell's centre lands on the centre of the voxel block it summarises; values stay between their
neighbours, so non-negative) and a division by the maximum instead of min-max scaling. Measured on a 2^3 map
whose only active cell covers one octant of a 24^3 crop: 0.67 of the CAM mass stays in that octant with this
upsampling, 0.55 with the library's; at the input resolution both agree to 1e-7. Test-time augmentation
(``aug_smooth``, 2-D only in ttach) is not used. For the MAE ViT the backbone's reshape transform maps tokens
(B, N, C) to (B, C, gd, gh, gw); the input size is passed to it so non-cubic crops get the right grid.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from nrfm.errors import ConfigError


class GradCAM3D(GradCAM):
    """pytorch-grad-cam ``GradCAM`` with trilinear, mass-preserving upsampling for 5-D inputs.

    Call as ``GradCAM3D(model, [layer], reshape_transform)(x (B, C, D, H, W), [ClassifierOutputTarget(i)])``
    -> (B, D, H, W) float32 CAMs in [0, 1] (divided by each subject's maximum; all zero if the CAM is).
    """

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets, eigen_smooth: bool) -> list[np.ndarray]:
        if input_tensor.ndim != 5:
            raise ValueError(f"GradCAM3D needs (B, C, D, H, W) input, got shape {tuple(input_tensor.shape)}")
        activations = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        if len(grads) < len(self.target_layers):
            raise RuntimeError("no gradient reached the Grad-CAM target layer; is the output connected to it?")
        out = []
        for layer, act, grad in zip(self.target_layers, activations, grads):
            cam = np.maximum(self.get_cam_image(input_tensor, layer, targets, act, grad, eigen_smooth), 0)
            up = torch.nn.functional.interpolate(torch.from_numpy(np.float32(cam))[:, None],
                                                 size=tuple(input_tensor.shape[2:]), mode="trilinear",
                                                 align_corners=False)
            out.append(up.numpy()[:, :1])
        return out

    def aggregate_multi_layers(self, cam_per_target_layer: list[np.ndarray]) -> np.ndarray:
        cam = np.maximum(np.concatenate(cam_per_target_layer, axis=1).mean(axis=1), 0)
        peak = cam.reshape(cam.shape[0], -1).max(axis=1)
        return np.float32(cam / np.where(peak > 0, peak, 1.0)[:, None, None, None])


class EndpointTarget:
    """Grad-CAM target: ``sign * output[index]`` (+1 explains the positive class of a binary endpoint, -1 the negative)."""

    def __init__(self, index: int, sign: float = 1.0):
        self.index, self.sign = int(index), float(sign)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.sign * model_output[..., self.index]


# ---- target layer -----------------------------------------------------------------------------------------------
def resolve_target_layer(model: nn.Module, name: str = "") -> tuple[nn.Module, Callable | None]:
    """The Grad-CAM target layer and reshape transform of a fine-tuned model.

    Args:
        model: a FinetuneModel-like module (``model.backbone.gradcam_target()`` gives the default).
        name: dotted module name in ``model.named_modules()``; empty = the backbone's choice.

    Raises:
        ConfigError: ``name`` is not a module of the model (the message lists the available names).
    """
    backbone = getattr(model, "backbone", model)
    default_layer, transform = backbone.gradcam_target() if hasattr(backbone, "gradcam_target") else (None, None)
    if not name:
        if default_layer is None:
            raise ConfigError("analyses.gradcam_target_layer: the model has no default Grad-CAM layer; name one")
        return default_layer, transform
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        raise ConfigError(f"analyses.gradcam_target_layer: no layer {name!r} in the model; available: "
                          f"{', '.join(names)}")
    return modules[name], transform


def _spatial_transform(transform: Callable | None, spatial: Sequence[int]) -> Callable | None:
    """Bind the input size if the transform takes it, and pass non-token (5-D) outputs through unchanged."""
    if transform is None:
        return None
    takes_spatial = "spatial" in inspect.signature(transform).parameters

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3:  # a named CNN-like layer inside a ViT model: already (B, C, d, h, w)
            return t
        return transform(t, spatial=tuple(spatial)) if takes_spatial else transform(t)

    return apply


def grad_cam_volumes(model: nn.Module, images: torch.Tensor, endpoint_index: int, target_layer: nn.Module,
                     reshape_transform: Callable | None = None, signs: Sequence[float] | None = None) -> np.ndarray:
    """Grad-CAM of one endpoint output for a batch of volumes.

    Args:
        model: forward (B, 4, D, H, W) -> (B, E).
        images: (B, 4, D, H, W) float32.
        endpoint_index: output column (``model.endpoints.index(endpoint)``).
        target_layer: module whose activations are weighted.
        reshape_transform: tokens -> (B, C, gd, gh, gw) for ViTs; None for CNNs.
        signs: (B,) +1 explains the output (positive class), -1 its negative (negative class); default all +1.

    Returns:
        (B, D, H, W) CAMs scaled to max 1.
    """
    device = next(model.parameters()).device
    x = images.to(device=device, dtype=torch.float32)
    # The backward pass only needs to reach the target layer: with every parameter frozen for the call, the
    # target layer's output is made the one leaf that requires a gradient (this hook runs before the library's,
    # which keeps that gradient), so nothing below the layer and no weight gradient is computed. Frozen or not
    # (linear fine-tuning freezes the backbone), the maps are the library's (tests/eval/test_gradcam.py).
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)

    fired = []

    def start_graph(module, inputs, output):
        fired.append(True)
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    hook = target_layer.register_forward_hook(start_graph)
    cam = GradCAM3D(model, [target_layer], _spatial_transform(reshape_transform, x.shape[2:]))
    try:
        if signs is None:
            return cam(x, [ClassifierOutputTarget(endpoint_index)] * x.shape[0])
        return cam(x, [EndpointTarget(endpoint_index, sign) for sign in signs])
    except RuntimeError:
        if not fired:  # e.g. a ResNet stage after the one that the tumour readout pools
            raise ConfigError(f"analyses.gradcam_target_layer: the layer {type(target_layer).__name__} takes no part "
                              "in the model's output (with finetuning.readout: tumour the model stops at the pooled "
                              "stage); name that stage or an earlier one, or leave the key empty") from None
        raise
    finally:
        cam.activations_and_grads.release()
        hook.remove()
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
