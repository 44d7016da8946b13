"""Training objectives over groups: group DRO (Sagawa et al. 2020), ERM and reweighted ERM.

Group DRO minimises the worst expected loss over groups g = 1..G instead of the average loss. Algorithm 1
of Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for Group Shifts" (ICLR 2020)
keeps a distribution q over groups and, at every step, after computing the mean loss L_g of each group in
the batch,

    q_g <- q_g * exp(eta * L_g)        (exponentiated-gradient ascent on q)
    q   <- q / sum_g q_g
    robust loss = sum_g q_g * L_g      (the model descends on this)

With the generalization adjustment of Section 3.3, L_g is replaced by L_g + C / sqrt(n_g) (n_g = training
examples of group g) both in the q update and in the objective, exactly as the paper's code
(``loss.py``, ``compute_robust_loss``) does.

Groups that have no example in the batch keep their unnormalised weight (their exponent is zero), as in the
paper's and WILDS' code where an absent group's loss is 0; the adjustment is added to present groups only,
so a group is never up-weighted for a loss that was not observed.

As in WILDS (``examples/algorithms/groupDRO.py``) the objective is separate from the training loop: the loop
computes per-example losses and group indices and calls ``objective.loss(per_example_loss, group_idx)``.
The weights ``q`` are a registered buffer, so ``.to(device)`` moves them and ``state_dict()`` saves them;
they are updated only in training mode. Logging is the caller's.

Example::

    dro = GroupDRO(n_groups=6, eta=0.01, adjustment=1.0, group_counts=counts)
    loss = dro.loss(F.binary_cross_entropy_with_logits(logits, y, reduction="none"), groups)
    loss.backward()
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

OBJECTIVE_NAMES = ("erm", "dro", "reweighted")


def group_mean_losses(per_example_loss: Tensor, group_idx: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Mean loss of each group in a batch.

    Args:
        per_example_loss: (N,) float losses.
        group_idx: (N,) int64 group of each example, in [0, n_groups).
        n_groups: number of groups G.

    Returns:
        (G,) mean loss per group (0 for groups absent from the batch) and (G,) example counts.
    """
    if per_example_loss.ndim != 1 or group_idx.shape != per_example_loss.shape:
        raise ValueError(f"per_example_loss and group_idx must both be (N,), got {tuple(per_example_loss.shape)} "
                         f"and {tuple(group_idx.shape)}")
    group_idx = group_idx.long()
    if group_idx.numel() and (int(group_idx.min()) < 0 or int(group_idx.max()) >= n_groups):
        raise ValueError(f"group indices must be in [0, {n_groups}), got range "
                         f"[{int(group_idx.min())}, {int(group_idx.max())}]")
    counts = torch.bincount(group_idx, minlength=n_groups).to(per_example_loss.dtype)
    sums = torch.zeros(n_groups, dtype=per_example_loss.dtype, device=per_example_loss.device)
    sums = sums.index_add(0, group_idx, per_example_loss)
    return sums / counts.clamp(min=1), counts


def _check_counts(group_counts: Sequence[float] | Tensor | None, n_groups: int, required: bool,
                  names: Sequence[str] | None) -> Tensor | None:
    if group_counts is None:
        if required:
            raise ValueError("group_counts (training examples per group) is required here")
        return None
    counts = torch.as_tensor(group_counts, dtype=torch.float32).flatten()
    if counts.numel() != n_groups:
        raise ValueError(f"group_counts has {counts.numel()} entries, expected n_groups={n_groups}")
    empty = [int(i) for i in torch.nonzero(counts <= 0).flatten()]
    if empty:
        label = [names[i] for i in empty] if names is not None else empty
        raise ValueError(f"group(s) {label} have no training examples; drop them from the grouping "
                         "(a group DRO weight for an empty group is undefined)")
    return counts


class ERM(nn.Module):
    """Empirical risk minimisation: the plain mean of the per-example losses (groups ignored).

    Same interface as :class:`GroupDRO` so the training loop does not branch on the objective.
    """

    def __init__(self, n_groups: int = 1):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups

    def loss(self, per_example_loss: Tensor, group_idx: Tensor) -> Tensor:
        """(N,), (N,) -> scalar mean loss."""
        group_mean_losses(per_example_loss, group_idx, self.n_groups)  # validates shapes and indices
        return per_example_loss.mean()


class ReweightedERM(nn.Module):
    """ERM with each example weighted by 1 / n_g of its group (group- or class-balanced, by the grouping).

    The batch loss is ``sum_i w_i l_i / sum_i w_i`` with ``w_i = 1 / n_{g(i)}``: in expectation every group
    counts equally, the importance-weighting baseline of Sagawa et al. (2020, Section 5). Pass class indices
    as groups for class-balanced weights, (site, class) indices for group-balanced weights.

    Args:
        n_groups: number of groups G.
        group_counts: (G,) training examples per group; each must be > 0.
        group_names: optional names used in error messages.
    """

    def __init__(self, n_groups: int, group_counts: Sequence[float] | Tensor,
                 group_names: Sequence[str] | None = None):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups
        counts = _check_counts(group_counts, n_groups, required=True, names=group_names)
        self.register_buffer("weights", 1.0 / counts)

    def loss(self, per_example_loss: Tensor, group_idx: Tensor) -> Tensor:
        """(N,), (N,) -> scalar weighted mean loss."""
        group_mean_losses(per_example_loss, group_idx, self.n_groups)
        w = self.weights.to(per_example_loss.dtype)[group_idx.long()]
        return (w * per_example_loss).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class GroupDRO(nn.Module):
    """Online group DRO objective (Sagawa et al. 2020, Algorithm 1, minibatch form of the paper's code).

    Args:
        n_groups: number of groups G.
        eta: step size of the exponentiated-gradient update of q (the paper's eta_q); must be > 0.
        adjustment: C of the generalization adjustment C / sqrt(n_g); 0 disables it.
        group_counts: (G,) training examples per group. Needed for the adjustment; if given, every group
            must have at least one example (an empty group cannot be weighted).
        group_names: optional names used in error messages and by callers for logging.

    Attributes:
        q: (G,) buffer, the current group weights (uniform at start, sums to 1).
        last_group_loss: (G,) the group losses (adjusted) of the last call, detached, for logging.
    """

    def __init__(self, n_groups: int, eta: float, adjustment: float = 0.0,
                 group_counts: Sequence[float] | Tensor | None = None, group_names: Sequence[str] | None = None):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if not eta > 0:
            raise ValueError(f"eta (group weight step size) must be > 0, got {eta}")
        if adjustment < 0:
            raise ValueError(f"adjustment C must be >= 0, got {adjustment}")
        self.n_groups = n_groups
        self.eta = float(eta)
        self.adjustment = float(adjustment)
        self.group_names = list(group_names) if group_names is not None else None
        counts = _check_counts(group_counts, n_groups, required=adjustment > 0, names=group_names)
        adj = (self.adjustment / counts.sqrt()) if counts is not None else torch.zeros(n_groups)
        if self.adjustment == 0:
            adj = torch.zeros(n_groups)
        self.register_buffer("adj", adj)
        self.register_buffer("q", torch.full((n_groups,), 1.0 / n_groups))
        self.last_group_loss: Tensor = torch.zeros(n_groups)

    def loss(self, per_example_loss: Tensor, group_idx: Tensor) -> Tensor:
        """Robust loss of a batch; updates ``q`` first when the module is in training mode.

        Args:
            per_example_loss: (N,) losses (with grad).
            group_idx: (N,) int64 group indices in [0, G).

        Returns:
            scalar ``sum_g q_g * (L_g + C / sqrt(n_g))`` over groups present in the batch (absent groups have
            L_g = 0 and contribute nothing).
        """
        group_loss, counts = group_mean_losses(per_example_loss, group_idx, self.n_groups)
        present = counts > 0
        adjusted = group_loss + torch.where(present, self.adj.to(group_loss.dtype), torch.zeros_like(group_loss))
        if self.training:
            with torch.no_grad():
                step = torch.where(present, self.eta * adjusted.detach().to(self.q.dtype), torch.zeros_like(self.q))
                # exp of a large step can overflow in float32; subtracting the max is an exact renormalisation
                log_q = torch.log(self.q) + step
                q = torch.exp(log_q - log_q.max())
                self.q.copy_(q / q.sum())
        self.last_group_loss = adjusted.detach().clone()
        return (self.q.to(adjusted.dtype) * adjusted).sum()


def build_objective(name: str, n_groups: int, group_counts: Sequence[float] | Tensor, eta: float = 0.01,
                    adjustment: float = 0.0, group_names: Sequence[str] | None = None) -> nn.Module:
    """The objective module for ``erm``, ``reweighted`` or ``dro`` (same ``loss(losses, groups)`` interface)."""
    if name == "erm":
        return ERM(n_groups)
    if name == "reweighted":
        return ReweightedERM(n_groups, group_counts, group_names)
    if name == "dro":
        return GroupDRO(n_groups, eta, adjustment, group_counts, group_names)
    raise ValueError(f"unknown objective {name!r}; valid: {list(OBJECTIVE_NAMES)}")
