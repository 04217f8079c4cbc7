"""The implicit-weight solver (``closest_mtd_weights``) where EM alone creeps: minimisers on or near a
face of the simplex. Checked against one-step MD (whose predictive it must invert) and a brute-force
grid over the simplex, never against the solver's own output."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import TASK
from mdlens.hooks.behaviour import closest_mtd_weights, merge_repeated_lags


def certificate(weights, tokens, transition, target):
    """``max_g G_g - 1`` with ``G_g = sum_v p_v pi(y_{T+1-g}, v) / (A^T lambda)_v``: bounds the KL gap to the minimum."""
    rows = transition[tokens[:, -3:].flip(1)]  # [B, m, q]
    mixture = torch.einsum("bg,bgv->bv", weights, rows)
    return (torch.einsum("bgv,bv->bg", rows, target / mixture).amax(dim=-1) - 1).max().item()


def test_one_step_md_with_a_large_step_is_recovered_without_a_warning():
    # The mechanisms analysis's T=8 batch read by a construction built for T=192: one-step MD with
    # eta_T = 0.0304 * 189 / 5, whose weights reach 5e-5. EM alone left 6 of these sequences above the
    # KL-gap tolerance after 200000 sweeps (the full demo's warning).
    task = MTDTask(**TASK)
    pi, m = task.transition, task.order
    tokens = task.sample(512, 8, generator=torch.Generator().manual_seed(17 + 8000)).tokens
    md = E.md_weights(tokens, pi, m, 0.03043219887107722 * 189 / 5)
    target = E.predictive(tokens, pi, md)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = closest_mtd_weights(target, tokens, pi, m)
    assert result.residual_kl.abs().max().item() < 1e-14  # the target is an MTD predictive: nothing left over
    assert certificate(result.weights, tokens, pi, target) < 1e-13
    # Only the weight per parent token is determined where lags share a parent.
    merged = (merge_repeated_lags(result.weights, tokens, 5) - merge_repeated_lags(md, tokens, 5)).abs()
    assert merged.max().item() < 1e-9


# Trained models' predictions whose minimiser sits on a face (the first: lambda_2 = 0) or whose face
# is ill-conditioned, with the parents (y_T, y_{T-1}, y_{T-2}) of their sequences.
HARD_TARGETS = [
    (
        [0.03819424225315316, 0.1644499090868056, 0.39757889956202236, 0.1755524236591559, 0.22422452543886298],
        [3, 4, 1],
    ),
    (
        [0.017466929010675366, 0.3027411148321347, 0.37190237509166113, 0.11267026059945331, 0.1952193204660755],
        [3, 2, 4],
    ),
    (
        [0.03195011537867943, 0.12494214874454093, 0.3714011449972592, 0.27939129016121783, 0.1923153007183026],
        [2, 4, 3],
    ),
    (
        [0.03523153813899235, 0.11023678430654789, 0.3405134263073301, 0.25489742695449435, 0.2591208242926352],
        [1, 3, 4],
    ),
    (
        [0.016081746675279715, 0.335492813937979, 0.33258969633935326, 0.06653328577762134, 0.24930245726976671],
        [1, 2, 4],
    ),
]


def grid_minimum(target: np.ndarray, parents: list[int], transition: np.ndarray, resolution: int):
    """min over the simplex grid of step 1/resolution of KL(target || sum_g w_g pi(parent_g, .))."""
    points = [(i, j, resolution - i - j) for i in range(resolution + 1) for j in range(resolution + 1 - i)]
    weights = np.asarray(points, dtype=np.float64) / resolution
    mixtures = weights @ transition[parents]
    kl = (target * (np.log(target) - np.log(mixtures))).sum(axis=1)
    best = int(np.argmin(kl))
    return weights[best], kl[best]


@pytest.mark.parametrize("max_iter", [1, 1000])
def test_hard_targets_match_a_brute_force_grid(max_iter):
    # max_iter=1: the Newton finish alone, from the centre.
    task = MTDTask(**TASK)
    pi = task.transition
    target = torch.tensor([t for t, _ in HARD_TARGETS], dtype=torch.float64)
    tokens = torch.tensor([[0, 0, *reversed(parents)] for _, parents in HARD_TARGETS])  # last 3 reversed = parents
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = closest_mtd_weights(target, tokens, pi, 3, max_iter=max_iter)
    assert certificate(result.weights, tokens, pi, target) < 1e-13
    assert result.weights[0, 1].item() == 0.0  # the face: exactly, not 5e-6 on its way there
    for b, (probs, parents) in enumerate(HARD_TARGETS):
        grid_weights, grid_kl = grid_minimum(np.asarray(probs), parents, pi.numpy(), 1000)
        assert result.residual_kl[b].item() <= grid_kl + 1e-15  # never worse than any grid point
        assert grid_kl - result.residual_kl[b].item() < 1e-6
        assert np.abs(result.weights[b].numpy() - grid_weights).max() < 2e-3


@pytest.mark.parametrize("seed", range(4))
def test_newton_alone_on_random_targets_matches_a_brute_force_grid(seed):
    # Targets off the MTD family, many with minimisers on an edge or a vertex; repeated parents included.
    task = MTDTask(vocab_size=4, order=3, seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    parents = list(itertools.islice(itertools.product(range(4), repeat=3), 5 * seed, 5 * seed + 12))
    tokens = torch.tensor([[0, 0, *reversed(p)] for p in parents])
    target = torch.rand(len(parents), 4, generator=generator, dtype=torch.float64) ** 4
    target = target / target.sum(dim=1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = closest_mtd_weights(target, tokens, task.transition, 3, max_iter=1)
    assert certificate(result.weights, tokens, task.transition, target) < 1e-13
    for b, p in enumerate(parents):
        _, grid_kl = grid_minimum(target[b].numpy(), list(p), task.transition.numpy(), 400)
        assert result.residual_kl[b].item() <= grid_kl + 1e-15
        assert grid_kl - result.residual_kl[b].item() < 1e-4
