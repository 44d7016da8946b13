"""nrfm.train.samplers: every row once per epoch (ERM), group-balanced draws (reweighted ERM, group DRO)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nrfm.train.finetune_fit import _batches
from nrfm.train.samplers import (balanced_batches, balanced_row_probabilities, expected_group_mass, importance_weights,
                           split_into_batches)


def test_every_row_exactly_once_per_epoch():
    """Property over sizes 1..100 and batch sizes 1..32 (the old _batches failed 388 of these 3200 cases)."""
    for n in range(1, 101):
        for batch_size in range(1, 33):
            batches = _batches(n, batch_size, torch.Generator().manual_seed(1000 * n + batch_size))
            rows = torch.cat(batches).tolist()
            assert sorted(rows) == list(range(n)), (n, batch_size)
            if n > 1 and batch_size > 1:  # BatchNorm needs two (finetuning.batch_size must be >= 2)
                assert all(len(b) >= 2 for b in batches), (n, batch_size)
            assert all(len(b) <= max(batch_size + 1, 2) for b in batches), (n, batch_size)


def test_the_old_failure_cases():
    for n, batch_size in [(17, 16), (33, 16), (49, 16)]:
        batches = _batches(n, batch_size, torch.Generator().manual_seed(0))
        assert [len(b) for b in batches] == [batch_size] * (n // batch_size - 1) + [batch_size + 1]
    assert [len(b) for b in split_into_batches(torch.arange(5), 2)] == [2, 3]


def _one_endpoint(counts):
    """(N, 1) group index with counts[g] rows in group g; one task."""
    index = torch.cat([torch.full((c,), g) for g, c in enumerate(counts)]).unsqueeze(1)
    return index, torch.zeros(len(counts), dtype=torch.long), torch.tensor(counts, dtype=torch.float32)


def test_single_endpoint_draws_groups_uniformly():
    """One endpoint: exactly the reference's --reweight_groups (row weight 1 / n_g), each group 1 / G per draw."""
    index, task, counts = _one_endpoint([50, 5, 20, 1])
    p = balanced_row_probabilities(index, task, counts)
    torch.testing.assert_close(expected_group_mass(index, 4, p), torch.full((4,), 0.25, dtype=torch.float64))
    # and by sampling: 20000 draws in batches, group frequencies within 0.02 of 1/4
    draws = torch.cat(balanced_batches(p, 20000, 16, torch.Generator().manual_seed(0)))
    freq = torch.bincount(index[draws, 0], minlength=4).double() / len(draws)
    assert (freq - 0.25).abs().max() < 0.02
    within, balanced = importance_weights(index, counts, p)
    for g in range(4):  # one endpoint: importance weights are constant within a group (plain group means)
        assert within[index[:, 0] == g].unique().numel() == 1


def _multi_task(seed=0, n=300):
    """Two endpoints on the same rows: A with a rare site-class group, B correlated with A; 20% unknown."""
    rng = np.random.default_rng(seed)
    site = rng.choice(3, size=n, p=[0.7, 0.25, 0.05])
    a = (rng.random(n) < np.where(site == 2, 0.5, 0.2)).astype(int)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)
    index = np.stack([site * 2 + a, 6 + site * 2 + b], axis=1)
    index[rng.random((n, 2)) < 0.2] = -1
    used = np.unique(index[index >= 0])
    remap = {g: k for k, g in enumerate(used)}
    index = np.vectorize(lambda g: remap.get(g, -1))(index)
    task = torch.tensor([0 if g < 6 else 1 for g in used])
    counts = torch.bincount(torch.from_numpy(index[index >= 0]), minlength=len(used)).float()
    return torch.from_numpy(index).long(), task, counts


def test_multi_task_weights_make_every_group_count_equally():
    index, task, counts = _multi_task()
    n_groups = len(counts)
    p = balanced_row_probabilities(index, task, counts)
    assert p.sum().item() == pytest.approx(1.0) and bool((p >= 0).all())
    _, balanced = importance_weights(index, counts, p)
    # with the importance weights, each group's expected weighted label count per draw is exactly 1 / N...
    mass = expected_group_mass(index, n_groups, p, balanced)
    torch.testing.assert_close(mass, torch.full((n_groups,), 1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    # the probabilities are those of: endpoint uniformly, then one of its groups, then one of the group's rows
    two_stage = torch.zeros(len(index), dtype=torch.float64)
    for g in range(n_groups):
        members = torch.nonzero((index == g).any(dim=1)).flatten()
        two_stage[members] += 1.0 / (2 * int((task == task[g]).sum()) * len(members))
    torch.testing.assert_close(p, two_stage)
    # ... and without them no group gets less than 1/E of the 1/G_e share it would get alone
    plain = expected_group_mass(index, n_groups, p)
    groups_per_task = torch.bincount(task).double()
    assert bool((plain >= 1.0 / (2 * groups_per_task[task]) - 1e-12).all())
    # natural-frequency sampling would give the rarest group far less
    natural = expected_group_mass(index, n_groups, torch.full((len(index),), 1.0 / len(index), dtype=torch.float64))
    assert plain.min() > 3 * natural.min()


def test_weighted_group_means_are_unbiased_by_sampling():
    """Monte Carlo: importance-weighted loss sums over balanced draws average to the per-group mean loss."""
    index, task, counts = _multi_task(seed=1, n=200)
    p = balanced_row_probabilities(index, task, counts)
    _, balanced = importance_weights(index, counts, p)
    loss = torch.from_numpy(np.random.default_rng(2).uniform(0, 2, size=index.shape)).double()
    known = index >= 0
    target = torch.zeros(len(counts), dtype=torch.float64).index_add(0, index[known], loss[known]) / counts.double()
    draws = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(3))
    sub, w, lo = index[draws], balanced[draws].double(), loss[draws]
    keep = sub >= 0
    estimate = torch.zeros(len(counts), dtype=torch.float64).index_add(0, sub[keep], (w * lo)[keep]) / len(draws)
    torch.testing.assert_close(estimate, target, rtol=0.05, atol=0)


def test_rows_without_labels_are_never_drawn_and_bad_input_raises():
    index = torch.tensor([[0], [-1], [1]])
    p = balanced_row_probabilities(index, torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert p.tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="no training row"):
        balanced_row_probabilities(torch.full((3, 1), -1), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="batch_size"):
        split_into_batches(torch.arange(3), 0)
