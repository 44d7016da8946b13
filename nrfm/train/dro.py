"""Training objectives over groups: group DRO (Sagawa et al. 2020), ERM and reweighted ERM.

Group DRO minimises the worst expected loss over groups g = 1..G instead of the average loss. Algorithm 1
of Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for Group Shifts" (ICLR 2020)
keeps a distribution q over groups and, at every step, after computing the mean loss L_g of each group in
the batch,

    q_g <- q_g * exp(eta * L_g)        (exponentiated-gradient ascent on q)
    q   <- q / sum_g q_g
    robust loss = sum_g q_g * L_g      (the model descends on this)

With the generalization adjustment of Section 3.3, L_g is replaced by L_g + C / sqrt(n_g) (n_g = training
examples of group g) both in the q update and in the objective, as the paper's code (``loss.py``,
``compute_robust_loss``) does. Groups that have no example in the batch keep their unnormalised weight (their
exponent is zero), as in the paper's and WILDS' code where an absent group's loss is 0.

Deviation from the paper's code, kept on purpose: the adjustment is added to the groups *present* in the batch
only (the reference adds it to every group, so absent groups drift up on a loss never observed). With
group-balanced sampling (:mod:`nrfm.train.samplers`, the paper's ``--reweight_groups``) every group is present in
most batches and the two rules nearly coincide.

Multi-task use (:mod:`nrfm.train.finetune`): groups are partitioned into tasks (endpoints) by ``group_task``; q is
kept and renormalised per task and the objective averages the tasks' robust losses with equal weights (see
:class:`GroupDRO`). Every objective accepts optional per-example ``weight`` (importance weights of the
sampler); with one task and no weights everything reduces to the single-task formulas above.

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


def group_mean_losses(per_example_loss: Tensor, group_idx: Tensor, n_groups: int,
                      weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean loss of each group in a batch (weighted mean if ``weight`` is given).

    Args:
        per_example_loss: (N,) float losses.
        group_idx: (N,) int64 group of each example, in [0, n_groups).
        n_groups: number of groups G.
        weight: optional (N,) non-negative weights; the group mean is ``sum w l / sum w`` over its examples.

    Returns:
        (G,) mean loss per group (0 for groups absent from the batch) and (G,) example counts.
    """
    if per_example_loss.ndim != 1 or group_idx.shape != per_example_loss.shape:
        raise ValueError(f"per_example_loss and group_idx must both be (N,), got {tuple(per_example_loss.shape)} "
                         f"and {tuple(group_idx.shape)}")
    if weight is not None and weight.shape != per_example_loss.shape:
        raise ValueError(f"weight must be (N,) like per_example_loss, got {tuple(weight.shape)}")
    group_idx = group_idx.long()
    if group_idx.numel() and (int(group_idx.min()) < 0 or int(group_idx.max()) >= n_groups):
        raise ValueError(f"group indices must be in [0, {n_groups}), got range "
                         f"[{int(group_idx.min())}, {int(group_idx.max())}]")
    counts = torch.bincount(group_idx, minlength=n_groups).to(per_example_loss.dtype)
    w = torch.ones_like(per_example_loss) if weight is None else weight.to(per_example_loss.dtype)
    sums = torch.zeros(n_groups, dtype=per_example_loss.dtype, device=per_example_loss.device)
    sums = sums.index_add(0, group_idx, w * per_example_loss)
    norm = torch.zeros_like(sums).index_add(0, group_idx, w)
    return sums / norm.clamp(min=torch.finfo(norm.dtype).tiny), counts


def _check_task(group_task: Sequence[int] | Tensor | None, n_groups: int) -> Tensor:
    """(G,) int64 task (endpoint) of each group, tasks numbered 0..T-1; all zeros (one task) if None."""
    if group_task is None:
        return torch.zeros(n_groups, dtype=torch.long)
    task = torch.as_tensor(group_task, dtype=torch.long).flatten()
    if task.numel() != n_groups:
        raise ValueError(f"group_task has {task.numel()} entries, expected n_groups={n_groups}")
    if int(task.min()) < 0:
        raise ValueError("group_task entries must be >= 0")
    return task


def _per_task_mean(task_loss: Tensor, task_present: Tensor) -> Tensor:
    """Mean over the tasks present in the batch (equal task weights); 0 if none is."""
    n_present = task_present.sum()
    return torch.where(task_present, task_loss, torch.zeros_like(task_loss)).sum() / n_present.clamp(min=1)


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
    """Empirical risk minimisation: the mean of the per-example losses (groups ignored).

    Same interface as :class:`GroupDRO` so the training loop does not branch on the objective. With
    ``weight`` the mean is weighted (``sum w l / sum w``).
    """

    def __init__(self, n_groups: int = 1):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups

    def loss(self, per_example_loss: Tensor, group_idx: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N,), (N,) [, (N,)] -> scalar mean loss."""
        group_mean_losses(per_example_loss, group_idx, self.n_groups, weight)  # validates shapes and indices
        if weight is None:
            return per_example_loss.mean()
        w = weight.to(per_example_loss.dtype)
        return (w * per_example_loss).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class ReweightedERM(nn.Module):
    """ERM with each example weighted by 1 / n_g of its group, each task (endpoint) normalised on its own.

    Within a task t the batch loss is ``sum_i w_i l_i / sum_i w_i`` with ``w_i = weight_i / n_{g(i)}``
    (``weight_i = 1`` by default): in expectation every group of the task counts equally, the importance-weighting
    baseline of Sagawa et al. (2020, Section 5). The objective is the mean of the task losses over the tasks
    present in the batch (equal task weights, as in :class:`GroupDRO`). With one task (``group_task=None``) and no
    ``weight`` this is the single-task formula. Under group-balanced sampling pass the sampler's importance
    weights (:func:`nrfm.train.samplers.importance_weights`, ``within``) as ``weight``: with one task and
    ``1 / n_g`` sampling they are constant per group and the loss is the plain mean of the balanced batch, the
    reference code's ``--reweight_groups`` ERM.

    Args:
        n_groups: number of groups G.
        group_counts: (G,) training examples per group; each must be > 0.
        group_names: optional names used in error messages.
        group_task: optional (G,) task (endpoint) index of each group; None = one task.
    """

    def __init__(self, n_groups: int, group_counts: Sequence[float] | Tensor,
                 group_names: Sequence[str] | None = None, group_task: Sequence[int] | Tensor | None = None):
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.n_groups = n_groups
        counts = _check_counts(group_counts, n_groups, required=True, names=group_names)
        self.register_buffer("weights", 1.0 / counts)
        self.register_buffer("task", _check_task(group_task, n_groups))
        self.n_tasks = int(self.task.max()) + 1

    def loss(self, per_example_loss: Tensor, group_idx: Tensor, weight: Tensor | None = None) -> Tensor:
        """(N,), (N,) [, (N,)] -> scalar: mean over present tasks of the task's weighted mean loss."""
        group_mean_losses(per_example_loss, group_idx, self.n_groups, weight)
        group_idx = group_idx.long()
        w = self.weights.to(per_example_loss.dtype)[group_idx]
        if weight is not None:
            w = w * weight.to(per_example_loss.dtype)
        task = self.task[group_idx]
        num = torch.zeros(self.n_tasks, dtype=per_example_loss.dtype, device=per_example_loss.device)
        num = num.index_add(0, task, w * per_example_loss)
        den = torch.zeros_like(num).index_add(0, task, w)
        present = torch.bincount(task, minlength=self.n_tasks) > 0
        return _per_task_mean(num / den.clamp(min=torch.finfo(den.dtype).tiny), present)


class GroupDRO(nn.Module):
    """Online group DRO objective (Sagawa et al. 2020, Algorithm 1, minibatch form of the paper's code).

    **One q per task.** With ``group_task`` (the endpoint of each group) the groups are partitioned into tasks
    and q is a distribution over the groups *of each task*: the exponentiated-gradient step is taken on every
    group and q is renormalised within each task. The objective is the mean over tasks of each task's robust
    loss,

        L = (1 / T) sum_t sum_{g in t} q_g (L_g + C / sqrt(n_g)),

    i.e. the average over endpoints of each endpoint's worst-group loss. Why not one q over all groups: the
    tasks' losses are on different scales (a standardised squared error for the continuous endpoints, about 1
    at chance, against 0.69 for BCE) and of different difficulty, so one simplex puts its weight on the
    hardest or largest-scale endpoint rather than on the small site or rare class inside each endpoint, which
    is the shift group DRO is meant to guard against. Equal task weights fix every endpoint's share of the
    objective at 1 / T, whatever its loss scale or number of labels. With ``group_task=None`` there is one task and this is
    exactly Algorithm 1.

    Only tasks with at least one example in the batch enter the mean (the others have no loss to weight).

    Args:
        n_groups: number of groups G.
        eta: step size of the exponentiated-gradient update of q (the paper's eta_q); must be > 0.
        adjustment: C of the generalization adjustment C / sqrt(n_g); 0 disables it.
        group_counts: (G,) training examples per group. Needed for the adjustment; if given, every group
            must have at least one example (an empty group cannot be weighted).
        group_names: optional names used in error messages and by callers for logging.
        group_task: optional (G,) int task (endpoint) of each group, tasks numbered from 0; None = one task.

    Attributes:
        q: (G,) buffer, the current group weights (uniform within each task at start; sums to 1 per task).
        last_group_loss: (G,) the group losses (adjusted) of the last call, detached, for logging.
    """

    def __init__(self, n_groups: int, eta: float, adjustment: float = 0.0,
                 group_counts: Sequence[float] | Tensor | None = None, group_names: Sequence[str] | None = None,
                 group_task: Sequence[int] | Tensor | None = None):
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
        task = _check_task(group_task, n_groups)
        self.n_tasks = int(task.max()) + 1
        groups_per_task = torch.bincount(task, minlength=self.n_tasks)
        if bool((groups_per_task == 0).any()):
            raise ValueError(f"group_task leaves task(s) {torch.nonzero(groups_per_task == 0).flatten().tolist()} "
                             "without groups; number tasks 0..T-1")
        self.register_buffer("adj", adj)
        self.register_buffer("task", task)
        self.register_buffer("q", 1.0 / groups_per_task[task].float())
        self.last_group_loss: Tensor = torch.zeros(n_groups)

    def _renormalise(self, log_q: Tensor) -> Tensor:
        """exp(log_q) normalised within each task; subtracting each task's max first (exp can overflow)."""
        task_max = torch.full((self.n_tasks,), -torch.inf, dtype=log_q.dtype, device=log_q.device)
        task_max = task_max.scatter_reduce(0, self.task, log_q, reduce="amax")
        q = torch.exp(log_q - task_max[self.task])
        total = torch.zeros_like(task_max).index_add(0, self.task, q)
        return q / total[self.task]

    def loss(self, per_example_loss: Tensor, group_idx: Tensor, weight: Tensor | None = None) -> Tensor:
        """Robust loss of a batch; updates ``q`` first when the module is in training mode.

        Args:
            per_example_loss: (N,) losses (with grad).
            group_idx: (N,) int64 group indices in [0, G).
            weight: optional (N,) weights of the group means (``sum w l / sum w`` per group), e.g. the
                sampler's importance weights; None = plain means, as in the paper.

        Returns:
            scalar ``mean_t sum_{g in t} q_g * (L_g + C / sqrt(n_g))`` over groups present in the batch
            (absent groups have L_g = 0 and contribute nothing), over the tasks present.
        """
        group_loss, counts = group_mean_losses(per_example_loss, group_idx, self.n_groups, weight)
        present = counts > 0
        adjusted = group_loss + torch.where(present, self.adj.to(group_loss.dtype), torch.zeros_like(group_loss))
        if self.training:
            with torch.no_grad():
                step = torch.where(present, self.eta * adjusted.detach().to(self.q.dtype), torch.zeros_like(self.q))
                self.q.copy_(self._renormalise(torch.log(self.q) + step))
        self.last_group_loss = adjusted.detach().clone()
        weighted = self.q.to(adjusted.dtype) * adjusted
        task_loss = torch.zeros(self.n_tasks, dtype=adjusted.dtype, device=adjusted.device)
        task_loss = task_loss.index_add(0, self.task, weighted)
        task_present = torch.zeros(self.n_tasks, dtype=torch.bool, device=adjusted.device)
        task_present = task_present.index_put((self.task[present],), torch.tensor(True, device=adjusted.device))
        return _per_task_mean(task_loss, task_present)


def build_objective(name: str, n_groups: int, group_counts: Sequence[float] | Tensor, eta: float = 0.01,
                    adjustment: float = 0.0, group_names: Sequence[str] | None = None,
                    group_task: Sequence[int] | Tensor | None = None) -> nn.Module:
    """The objective module for ``erm``, ``reweighted`` or ``dro`` (same ``loss(losses, groups[, weight])``)."""
    if name == "erm":
        return ERM(n_groups)
    if name == "reweighted":
        return ReweightedERM(n_groups, group_counts, group_names, group_task)
    if name == "dro":
        return GroupDRO(n_groups, eta, adjustment, group_counts, group_names, group_task)
    raise ValueError(f"unknown objective {name!r}; valid: {list(OBJECTIVE_NAMES)}")
