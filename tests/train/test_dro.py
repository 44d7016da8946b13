"""nrfm.train.dro against a straight-line copy of Sagawa et al. (2020) Algorithm 1 and a planted shortcut dataset."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nrfm.train.dro import ERM, GroupDRO, ReweightedERM, build_objective


def reference_group_dro(batches, n_groups, eta, adjustment=0.0, counts=None):
    """Algorithm 1 in minibatch form, as in the paper's loss.py, with plain Python loops.

    For every batch: mean loss per present group, plus C / sqrt(n_g) if C > 0; q_g *= exp(eta * loss_g) for
    present groups; q /= sum(q); robust loss = sum over present groups of q_g * loss_g.
    """
    q = [1.0 / n_groups] * n_groups
    out = []
    for losses, groups in batches:
        group_loss = {}
        for g in range(n_groups):
            members = [loss for loss, k in zip(losses, groups) if k == g]
            if members:
                group_loss[g] = sum(members) / len(members)
                if adjustment > 0:
                    group_loss[g] += adjustment / math.sqrt(counts[g])
        for g, value in group_loss.items():
            q[g] = q[g] * math.exp(eta * value)
        total = sum(q)
        q = [v / total for v in q]
        robust = sum(q[g] * value for g, value in group_loss.items())
        out.append((list(q), robust))
    return out


def random_batches(seed, n_batches=6, n_groups=4, size=7):
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(n_batches):
        groups = rng.integers(0, n_groups, size=size)
        if b % 2 == 0:  # some batches miss groups 0 and 3 entirely
            groups = rng.choice([1, 2], size=size)
        batches.append((rng.uniform(0, 3, size=size).tolist(), groups.tolist()))
    return batches


@pytest.mark.parametrize("adjustment", [0.0, 2.0])
def test_group_dro_matches_algorithm_1_step_by_step(adjustment):
    counts = [40, 5, 12, 1]
    batches = random_batches(seed=1)
    reference = reference_group_dro(batches, 4, eta=0.3, adjustment=adjustment, counts=counts)
    dro = GroupDRO(4, eta=0.3, adjustment=adjustment, group_counts=counts).train()
    for (losses, groups), (q_ref, robust_ref) in zip(batches, reference):
        loss = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        robust = dro.loss(loss, torch.tensor(groups))
        assert robust.item() == pytest.approx(robust_ref, rel=1e-6)
        np.testing.assert_allclose(dro.q.numpy(), q_ref, rtol=1e-6)
        robust.backward()  # the gradient of each example is q_g / n_g(batch) of its group
        for i, g in enumerate(groups):
            assert loss.grad[i].item() == pytest.approx(q_ref[g] / groups.count(g), rel=1e-5)
    assert dro.q.sum().item() == pytest.approx(1.0)


def test_absent_groups_only_renormalised_and_eval_mode_frozen():
    dro = GroupDRO(3, eta=1.0)
    dro.loss(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    q = dro.q.clone()
    assert q[1] == pytest.approx(q[2])  # neither seen: same weight
    assert q[0] / q[1] == pytest.approx(math.e)
    dro.eval()
    dro.loss(torch.tensor([5.0]), torch.tensor([2]))
    assert torch.equal(dro.q, q)


def test_q_is_a_buffer_saved_and_moved():
    dro = GroupDRO(2, eta=0.5)
    dro.loss(torch.tensor([2.0, 0.1]), torch.tensor([0, 1]))
    state = dro.state_dict()
    assert "q" in state and torch.equal(state["q"], dro.q)
    other = GroupDRO(2, eta=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.q, dro.q)
    assert dro.to(torch.float64).q.dtype == torch.float64


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="eta"):
        GroupDRO(3, eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        GroupDRO(3, eta=-1.0)
    with pytest.raises(ValueError, match="no training examples"):
        GroupDRO(3, eta=0.1, group_counts=[4, 0, 2], group_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ReweightedERM(3, [4, 0, 2], group_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="required"):
        GroupDRO(3, eta=0.1, adjustment=1.0)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        GroupDRO(3, eta=0.1).loss(torch.tensor([1.0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="valid: \\['erm', 'dro', 'reweighted'\\]"):
        build_objective("irm", 2, [1, 1])


def test_erm_and_reweighted_erm_formulas():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1])
    assert ERM(2).loss(losses, groups).item() == pytest.approx(2.5)
    # weights 1/n_g with training counts (30, 10): (1+2+3)/30 + 4/10 over 3/30 + 1/10
    expected = ((1 + 2 + 3) / 30 + 4 / 10) / (3 / 30 + 1 / 10)
    assert ReweightedERM(2, [30, 10]).loss(losses, groups).item() == pytest.approx(expected)


def _shortcut_data(n, minority_fraction, rng):
    """Label y, spurious attribute a (agrees with y except in the minority groups); groups = 2y + a.

    The core feature predicts y weakly but equally in every group; the shortcut feature equals a almost
    exactly, so it predicts y well only where a == y (the common groups).
    """
    y = rng.integers(0, 2, size=n)
    flip = rng.random(n) < minority_fraction
    a = np.where(flip, 1 - y, y)
    core = (2 * y - 1) * 1.0 + rng.normal(0, 1.0, size=n)
    shortcut = (2 * a - 1) * 1.0 + rng.normal(0, 0.1, size=n)
    x = np.stack([core, shortcut], axis=1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y).float(), torch.from_numpy(2 * y + a)


def _train_logistic(objective, x, y, groups, steps=400, lr=0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        per_example = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y, reduction="none")
        loss = objective.loss(per_example, groups)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _group_accuracy(model, x, y, groups):
    with torch.no_grad():
        correct = ((model(x).squeeze(1) > 0).float() == y).float()
    return [correct[groups == g].mean().item() for g in range(4)], correct.mean().item()


def test_group_dro_raises_worst_group_accuracy_on_a_planted_shortcut():
    rng = np.random.default_rng(0)
    x, y, groups = _shortcut_data(2000, 0.05, rng)
    x_test, y_test, groups_test = _shortcut_data(4000, 0.5, rng)  # all four groups well represented
    counts = torch.bincount(groups, minlength=4)
    assert int(counts.min()) > 10  # every group present in training
    erm = _train_logistic(ERM(4), x, y, groups)
    dro = _train_logistic(GroupDRO(4, eta=0.05, group_counts=counts), x, y, groups)
    erm_groups, _ = _group_accuracy(erm, x_test, y_test, groups_test)
    erm_train_groups, erm_train_avg = _group_accuracy(erm, x, y, groups)
    dro_groups, _ = _group_accuracy(dro, x_test, y_test, groups_test)
    # ERM leans on the shortcut: fine on average (mostly common groups), poor on the rare groups
    assert erm_train_avg > 0.85
    assert min(erm_groups) < erm_train_avg - 0.3
    # group DRO trades some average accuracy for the worst group
    assert min(dro_groups) > min(erm_groups) + 0.2
    assert min(dro_groups) > 0.6


# ------------------------------------------------------------------------------- one q per task (endpoint)
def test_per_task_q_is_algorithm_1_run_per_task_and_averaged():
    """Groups 0-2 belong to task 0, groups 3-4 to task 1: two independent copies of Algorithm 1 (each with
    its own q over its own groups), and the objective is the mean of the two robust losses."""
    task = [0, 0, 0, 1, 1]
    counts = [30, 4, 9, 12, 2]
    rng = np.random.default_rng(4)
    batches = []
    for b in range(6):
        groups = rng.integers(0, 5, size=9).tolist()
        if b == 2:
            groups = [g for g in groups if g < 3] or [0]  # a batch without task 1
        batches.append((rng.uniform(0, 3, size=len(groups)).tolist(), groups))
    local = {0: [0, 1, 2], 1: [3, 4]}
    for adjustment in (0.0, 1.5):
        refs = {}
        for t, members in local.items():
            sub = [([loss for loss, g in zip(ls, gs) if g in members], [members.index(g) for g in gs if g in members])
                   for ls, gs in batches]
            refs[t] = reference_group_dro(sub, len(members), eta=0.4, adjustment=adjustment,
                                          counts=[counts[g] for g in members])
        dro = GroupDRO(5, eta=0.4, adjustment=adjustment, group_counts=counts, group_task=task).train()
        for b, (losses, groups) in enumerate(batches):
            robust = dro.loss(torch.tensor(losses, dtype=torch.float64), torch.tensor(groups))
            q_ref = refs[0][b][0] + refs[1][b][0]
            np.testing.assert_allclose(dro.q.numpy(), q_ref, rtol=1e-6)
            present = [t for t, members in local.items() if any(g in members for g in groups)]
            assert robust.item() == pytest.approx(np.mean([refs[t][b][1] for t in present]), rel=1e-6)
        assert dro.q[:3].sum().item() == pytest.approx(1.0) and dro.q[3:].sum().item() == pytest.approx(1.0)


def test_weights_in_group_means_and_reweighted_per_task():
    losses = torch.tensor([1.0, 3.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 1, 2])
    weight = torch.tensor([3.0, 1.0, 1.0, 1.0])
    dro = GroupDRO(3, eta=1e-9, group_task=[0, 0, 1]).eval()
    # group 0's weighted mean (3*1 + 1*3) / 4 = 1.5; task 0 = (1.5 + 2) / 2, task 1 = 5; mean of tasks
    assert dro.loss(losses, groups, weight).item() == pytest.approx(((1.5 + 2.0) / 2 + 5.0) / 2)
    rw = ReweightedERM(3, [10, 5, 1], group_task=[0, 0, 1])
    # task 0: weights w/n_g = (0.3, 0.1, 0.2) -> (0.3 + 0.3 + 0.4) / 0.6; task 1: 5
    assert rw.loss(losses, groups, weight).item() == pytest.approx(((0.3 + 0.3 + 0.4) / 0.6 + 5.0) / 2)
    assert ERM(3).loss(losses, groups, weight).item() == pytest.approx((3 + 3 + 2 + 5) / 6)
    with pytest.raises(ValueError, match="without groups"):
        GroupDRO(3, eta=0.1, group_task=[0, 2, 2])


# ------------------------------------------------------ minibatches: balanced sampling against natural sampling
def _waterbirds_like(n, minority_fraction, rng):
    """Label y; spurious feature s = (2y - 1) in the majority groups, reversed in the minority groups (with
    little noise); core feature c = (2y - 1) + N(0, 1), the same in every group. Groups = 2y + [s agrees]."""
    y = rng.integers(0, 2, size=n)
    minority = rng.random(n) < minority_fraction
    sign = np.where(minority, -1.0, 1.0)
    spurious = sign * (2 * y - 1) + rng.normal(0, 0.2, size=n)
    core = (2 * y - 1) + rng.normal(0, 1.0, size=n)
    x = np.stack([core, spurious], axis=1).astype(np.float32)
    groups = 2 * y + (~minority).astype(int)
    return torch.from_numpy(x), torch.from_numpy(y).float(), torch.from_numpy(groups)


def _train_minibatch(objective, x, y, groups, balanced, epochs=15, batch_size=32, lr=0.05, seed=0):
    from nrfm.train.samplers import balanced_batches, balanced_row_probabilities, epoch_batches

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    counts = torch.bincount(groups, minlength=4).float()
    p = balanced_row_probabilities(groups.unsqueeze(1), torch.zeros(4, dtype=torch.long), counts)
    for _ in range(epochs):
        batches = (balanced_batches(p, len(y), batch_size, generator) if balanced
                   else epoch_batches(len(y), batch_size, generator))
        for batch in batches:
            per_example = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]).squeeze(1), y[batch],
                                                                               reduction="none")
            loss = objective.loss(per_example, groups[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def test_balanced_group_dro_recovers_the_worst_group_where_erm_fails():
    rng = np.random.default_rng(0)
    x, y, groups = _waterbirds_like(2000, 0.03, rng)
    x_test, y_test, groups_test = _waterbirds_like(4000, 0.5, rng)
    counts = torch.bincount(groups, minlength=4)
    assert 10 < int(counts.min()) < 60  # two small minority groups
    erm = _train_minibatch(ERM(4), x, y, groups, balanced=False)
    dro = _train_minibatch(GroupDRO(4, eta=0.1, group_counts=counts), x, y, groups, balanced=True)
    erm_groups, _ = _group_accuracy(erm, x_test, y_test, groups_test)
    dro_groups, _ = _group_accuracy(dro, x_test, y_test, groups_test)
    assert min(erm_groups) < 0.4  # ERM follows the spurious feature: the minority groups are mostly wrong
    assert min(dro_groups) > 0.65  # group DRO leans on the core feature
    assert min(dro_groups) > min(erm_groups) + 0.3
    # the same group DRO on natural-frequency batches (the minority groups absent from most of them) does worse
    natural = _train_minibatch(GroupDRO(4, eta=0.1, group_counts=counts), x, y, groups, balanced=False)
    assert min(dro_groups) > min(_group_accuracy(natural, x_test, y_test, groups_test)[0]) + 0.05
