"""Which training rows each fine-tuning step sees: one shuffled pass (ERM) or group-balanced draws.

**ERM** (:func:`epoch_batches`): a random permutation of the training rows cut into batches, so every row is
used exactly once per epoch. A last batch of a single row is merged into the one before it (BatchNorm in
training mode needs two values per channel).

**Reweighted ERM and group DRO** (:func:`balanced_row_probabilities`, :func:`balanced_batches`): rows are drawn
with replacement, as many draws per epoch as there are training rows, with probabilities that balance the
groups. This is the ``--reweight_groups`` sampler of Sagawa et al. (2020; kohpangwei/group_DRO, a
``WeightedRandomSampler`` with weights ``1 / n_g``), which every group DRO result of that paper uses: with
natural frequencies a small group is absent from most batches and gets no update.

*Multi-task version.* A row carries up to E labels, one per endpoint, and each known label falls in one group
of its endpoint (site x class). A row cannot be drawn for one endpoint without its other labels, so the
single-task weights ``1 / n_g`` have no exact multi-task equivalent. The scheme used here: each draw picks an
endpoint uniformly (among the T endpoints that have groups), then one of its G_e groups uniformly, then one of
that group's n_g labelled training rows uniformly. Row i is therefore drawn with probability

    pi_i = (1 / T) * sum over the endpoints e labelled on row i of  1 / (G_e * n_{g(i, e)}),

which is what :func:`balanced_row_probabilities` computes (no sampling in two stages is needed). With one
endpoint this is exactly ``1 / n_g`` (every group drawn with probability 1 / G). With several, the group a draw
is made *for* is uniform within its endpoint, so every group of endpoint e gets at least ``1 / T`` of the equal
share ``1 / G_e`` it would get alone; the labels of the row's other endpoints ride along at their conditional
frequencies, so no group is starved but the balance is not exact.

The remaining imbalance is removed exactly by importance weights, which the objectives take as per-element
weights (see :func:`nrfm.train.dro.GroupDRO.loss`): a label of row i in group g weighted by ``1 / pi_i`` (pi_i the
draw probability of row i) makes the weighted group mean a consistent (self-normalised) estimate of the
plain mean over the group's rows, and ``1 / (n_g pi_i)`` makes a weighted sum over a draw equal, in expectation, to
``sum_g (1 / n_g) sum_{i in g} l_i``: each group counts equally (:func:`expected_group_mass` checks this).
With one endpoint both weights are constant within a group and the objectives reduce to the reference code's.
"""
from __future__ import annotations

import torch
from torch import Tensor


def split_into_batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """Cut ``order`` into batches of ``batch_size``; a last batch of one index joins the batch before it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return batches


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled batches of ``range(n)`` that use every index exactly once (no batch of one unless n == 1)."""
    return split_into_batches(torch.randperm(n, generator=generator), batch_size)


def balanced_row_probabilities(group_index: Tensor, group_task: Tensor, group_counts: Tensor) -> Tensor:
    """Draw probability of each training row under group-balanced sampling (module docstring).

    Args:
        group_index: (N, E) int64 group of each (training row, endpoint) label; -1 where unknown.
        group_task: (G,) int64 endpoint index of each group.
        group_counts: (G,) training labels per group (all > 0).

    Returns:
        (N,) float64 probabilities summing to 1; 0 for rows without any grouped label (they carry no loss).
    """
    if group_index.ndim != 2:
        raise ValueError(f"group_index must be (N, E), got shape {tuple(group_index.shape)}")
    n_tasks = int(group_task.max()) + 1 if group_task.numel() else 0
    groups_per_task = torch.bincount(group_task.long(), minlength=n_tasks).double()
    known = group_index >= 0
    safe = group_index.clamp(min=0).long()
    per_label = 1.0 / (groups_per_task[group_task.long()[safe]] * group_counts.double()[safe])
    per_label = torch.where(known, per_label, torch.zeros_like(per_label))
    r = per_label.sum(dim=1)  # sums to T over the rows; dividing by the sum gives the 1 / T
    if not float(r.sum()) > 0:
        raise ValueError("no training row has a grouped label: nothing to sample")
    return r / r.sum()


def balanced_batches(probabilities: Tensor, n_draws: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """``n_draws`` row positions drawn with replacement from ``probabilities``, cut into batches."""
    if n_draws < 1:
        return []
    draws = torch.multinomial(probabilities.double(), n_draws, replacement=True, generator=generator)
    return split_into_batches(draws, batch_size)


def importance_weights(group_index: Tensor, group_counts: Tensor, probabilities: Tensor) -> tuple[Tensor, Tensor]:
    """Per-label weights that undo what balanced sampling leaves unbalanced.

    Args:
        group_index: (N, E) group of each training label (-1 unknown); group_counts: (G,);
        probabilities: (N,) draw probabilities of the rows (:func:`balanced_row_probabilities`).

    Returns:
        ``within`` (N, E) = 1 / (N pi_i): equalises rows inside a group (used by group DRO's group means), and
        ``balanced`` (N, E) = 1 / (n_g pi_i): each group's weighted sum in a draw has expectation
        ``mean_{i in g} l_i``, so every group counts equally (used by reweighted ERM). Both are 0 for unknown
        labels and rows that are never drawn; ``within`` is 1 for every row under uniform draws.
    """
    n = probabilities.numel()
    known = (group_index >= 0) & (probabilities > 0).unsqueeze(1)
    inv = torch.where(probabilities > 0, 1.0 / (n * probabilities.clamp(min=torch.finfo(torch.float64).tiny)),
                      torch.zeros_like(probabilities)).double()
    within = torch.where(known, inv.unsqueeze(1).expand_as(group_index).double(), torch.zeros(group_index.shape,
                                                                                             dtype=torch.float64))
    counts = group_counts.double()[group_index.clamp(min=0).long()]
    balanced = torch.where(known, within * n / counts, torch.zeros_like(within))
    return within.float(), balanced.float()


def expected_group_mass(group_index: Tensor, n_groups: int, probabilities: Tensor,
                        weights: Tensor | None = None) -> Tensor:
    """(G,) expected number (or weighted sum, with ``weights`` (N, E)) of group-g labels in one draw.

    Exact (a sum over rows, no sampling): ``sum_i pi_i * sum_e [g(i, e) == g] * w_ie``.
    """
    w = torch.ones(group_index.shape, dtype=torch.float64) if weights is None else weights.double()
    known = group_index >= 0
    contrib = (probabilities.double().unsqueeze(1) * w)[known]
    return torch.zeros(n_groups, dtype=torch.float64).index_add(0, group_index[known].long(), contrib)
