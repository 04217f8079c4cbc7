"""Tests of mdlens.estimators, each against an independent computation (paper-notes §2-3).

Conventions (paper-notes): tokens y_1..y_T are tokens[:, 0..T-1]; scored positions k = m+1..T;
lag g = 1..m reads the parent y_{k-g}. The references below are written with explicit Python
loops over positions, brute-force enumeration of lag assignments, quadrature over the simplex,
autograd, or a closed-form formula, never by calling the function under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens._random import dirichlet_sample


def random_instance(vocab_size: int, order: int, batch: int, seq_len: int, seed: int):
    """A transition matrix and MTD tokens drawn from a seeded task."""
    task = MTDTask(vocab_size=vocab_size, order=order, seed=seed)
    sample = task.sample(batch, seq_len, generator=torch.Generator().manual_seed(seed + 1))
    return task.transition, sample


def lag_table_loop(tokens: list[int], pi: np.ndarray, m: int) -> list[list[float]]:
    """P[k][g-1] = pi(y_{k-g}, y_k) for 1-based k = m+1..T, by explicit loops."""
    y = [None, *tokens]  # y[1..T], 1-based as in the maths
    table = []
    for k in range(m + 1, len(tokens) + 1):
        table.append([float(pi[y[k - g], y[k]]) for g in range(1, m + 1)])
    return table


def log_dirichlet_norm(concentration) -> float:
    """log B(a) = sum_g lgamma(a_g) - lgamma(sum_g a_g)."""
    return sum(math.lgamma(a) for a in concentration) - math.lgamma(sum(concentration))


def brute_force_posterior_mean(tokens: list[int], pi: np.ndarray, m: int, alpha: float) -> np.ndarray:
    """E[lambda | y] by enumerating all m^N lag assignments z.

    p(y, z | lambda) = prod_k lambda_{z_k} P[k, z_k]; integrating lambda against Dirichlet(alpha)
    gives prod_k P[k, z_k] * B(alpha + n(z)) / B(alpha), and E[lambda | z] = (alpha + n)/(m alpha + N).
    """
    table = lag_table_loop(tokens, pi, m)
    n_scored = len(table)
    log_terms, means = [], []
    for z in itertools.product(range(m), repeat=n_scored):
        counts = [z.count(g) for g in range(m)]
        log_p = sum(math.log(table[k][z[k]]) for k in range(n_scored))
        log_terms.append(log_p + log_dirichlet_norm([alpha + c for c in counts]))
        means.append([(alpha + c) / (m * alpha + n_scored) for c in counts])
    log_terms = np.array(log_terms)
    w = np.exp(log_terms - log_terms.max())
    return (w[:, None] * np.array(means)).sum(0) / w.sum()


# ----------------------------------------------------------------------------------------------
# Lag likelihoods, responsibilities, log-likelihood, predictive, KL
# ----------------------------------------------------------------------------------------------


def test_lag_likelihoods_and_responsibilities_match_loops():
    pi, sample = random_instance(vocab_size=4, order=3, batch=3, seq_len=9, seed=0)
    m = 3
    lag = E.lag_likelihoods(sample.tokens, pi, m)
    gamma = E.responsibilities(sample.tokens, pi, m)
    assert lag.shape == gamma.shape == (3, 9 - m, m)
    for b in range(3):
        table = lag_table_loop(sample.tokens[b].tolist(), pi.numpy(), m)
        for r, row in enumerate(table):
            total = sum(row)
            for g in range(m):
                assert lag[b, r, g].item() == pytest.approx(row[g], abs=1e-15)
                assert gamma[b, r, g].item() == pytest.approx(row[g] / total, rel=1e-12)


def test_log_likelihood_matches_loop_and_accepts_unbatched_tokens():
    pi, sample = random_instance(vocab_size=5, order=2, batch=2, seq_len=11, seed=1)
    weights = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    got = E.log_likelihood(sample.tokens, pi, 2, weights)
    for b in range(2):
        table = lag_table_loop(sample.tokens[b].tolist(), pi.numpy(), 2)
        expected = sum(math.log(sum(weights[b, g].item() * row[g] for g in range(2))) for row in table)
        assert got[b].item() == pytest.approx(expected, rel=1e-12)
    single = E.log_likelihood(sample.tokens[1], pi, 2, weights[1])
    assert single.shape == (1,) and single.item() == pytest.approx(got[1].item(), rel=1e-12)


def test_predictive_matches_loop():
    pi, sample = random_instance(vocab_size=5, order=3, batch=4, seq_len=7, seed=2)
    weights = torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).sample((4,))
    got = E.predictive(sample.tokens, pi, weights)
    for b in range(4):
        y = sample.tokens[b].tolist()
        T = len(y)
        for v in range(5):
            # p(v) = sum_g lambda_g pi(y_{T+1-g}, v); y_{T+1-g} is y[T-g] 0-based.
            expected = sum(weights[b, g - 1].item() * pi[y[T - g], v].item() for g in range(1, 4))
            assert got[b, v].item() == pytest.approx(expected, rel=1e-12)
    shared = E.predictive(sample.tokens, pi, weights[0])  # one [m] weight vector for the batch
    assert torch.allclose(shared[0], got[0])


def test_kl_divergence_formula_with_zeros():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25]], dtype=torch.float64)
    kl = E.kl_divergence(p, q)
    expected = [0.5 * math.log(2) * 2, 0.0, 1.0 * math.log(4)]  # 0 log 0 = 0 terms dropped
    assert kl.tolist() == pytest.approx(expected, abs=1e-14)
    # q_v = 0 < p_v: infinite divergence; p = q with zeros: exactly 0.
    assert E.kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])).item() == math.inf
    assert E.kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Mirror descent: closed form vs autograd iteration; MLE stationarity
# ----------------------------------------------------------------------------------------------


def autograd_md(tokens, pi, m, eta, steps):
    """Exponentiated gradient lambda <- lambda * exp(eta * grad l(lambda)) / Z from the centre,
    with grad l from torch.autograd on E.log_likelihood (one sequence at a time)."""
    out = []
    for b in range(tokens.shape[0]):
        lam = torch.full((m,), 1.0 / m, dtype=torch.float64)
        for _ in range(steps):
            x = lam.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(E.log_likelihood(tokens[b], pi, m, x).sum(), x)
            lam = lam * torch.exp(eta * grad)
            lam = lam / lam.sum()
        out.append(lam)
    return torch.stack(out)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("m", [2, 3])
def test_md_weights_match_autograd_exponentiated_gradient(steps, m):
    pi, sample = random_instance(vocab_size=5, order=m, batch=4, seq_len=24, seed=3 + m)
    for eta in (0.01, 0.1):
        got = E.md_weights(sample.tokens, pi, m, eta, steps=steps)
        expected = autograd_md(sample.tokens, pi, m, eta, steps)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-13)


def test_one_step_md_is_softmax_of_summed_responsibilities_by_loop():
    """paper-notes §2: lambda_MD_g = softmax_g(eta * m * sum_k gamma_k(g)), written out by hand."""
    pi, sample = random_instance(vocab_size=4, order=3, batch=2, seq_len=15, seed=9)
    eta = 0.2
    got = E.md_weights(sample.tokens, pi, 3, eta)
    for b in range(2):
        table = lag_table_loop(sample.tokens[b].tolist(), pi.numpy(), 3)
        sums = [sum(row[g] / sum(row) for row in table) for g in range(3)]
        scores = [math.exp(eta * 3 * s) for s in sums]
        assert got[b].tolist() == pytest.approx([s / sum(scores) for s in scores], rel=1e-12)


def test_mle_weights_satisfy_kkt_and_beat_nearby_points():
    pi, sample = random_instance(vocab_size=5, order=3, batch=6, seq_len=60, seed=4)
    mle = E.mle_weights(sample.tokens, pi, 3, tol=1e-13, max_iter=200_000)
    gen = torch.Generator().manual_seed(0)
    for b in range(6):
        x = mle[b].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(E.log_likelihood(sample.tokens[b], pi, 3, x).sum(), x)
        # KKT on the simplex: dl/dlambda_g = N on the support (lambda . grad = N exactly), and
        # <= N off it. EM converges slowly near a boundary optimum, so the tolerance is loose.
        n_scored = sample.tokens.shape[1] - 3
        support = mle[b] > 1e-4
        assert torch.allclose(grad[support], torch.full_like(grad[support], n_scored), rtol=1e-4)
        assert (grad[~support] <= n_scored * (1 + 1e-4)).all()
        best = E.log_likelihood(sample.tokens[b], pi, 3, mle[b]).item()
        for _ in range(50):
            direction = torch.randn(3, generator=gen, dtype=torch.float64)
            direction -= direction.mean()  # stay on the plane sum = 1
            nearby = mle[b] + 1e-3 * direction / direction.norm()
            if (nearby < 0).any():
                continue
            assert E.log_likelihood(sample.tokens[b], pi, 3, nearby).item() <= best + 1e-12


# ----------------------------------------------------------------------------------------------
# Exact Bayes: brute force and quadrature
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,seq_len", [(2, 12), (3, 9)])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_exact_bayes_matches_brute_force_enumeration(m, seq_len, alpha):
    pi, sample = random_instance(vocab_size=4, order=m, batch=3, seq_len=seq_len, seed=5)
    got = E.bayes_weights(sample.tokens, pi, m, alpha=alpha, method="exact")
    for b in range(3):
        expected = brute_force_posterior_mean(sample.tokens[b].tolist(), pi.numpy(), m, alpha)
        assert got[b].numpy() == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_exact_bayes_matches_quadrature_on_the_simplex_m2(alpha):
    """m = 2: E[lambda_1 | y] = int l1 prior(l1) L(l1) / int prior(l1) L(l1) over [0, 1],
    with 400-point Gauss-Legendre (the integrand is a polynomial times l1^(a-1)(1-l1)^(a-1))."""
    pi, sample = random_instance(vocab_size=5, order=2, batch=4, seq_len=80, seed=6)
    got = E.bayes_weights(sample.tokens, pi, 2, alpha=alpha, method="exact")
    nodes, quad_w = np.polynomial.legendre.leggauss(400)
    lam1 = (nodes + 1) / 2
    for b in range(4):
        table = np.array(lag_table_loop(sample.tokens[b].tolist(), pi.numpy(), 2))  # [N, 2]
        log_lik = np.log(np.outer(lam1, table[:, 0]) + np.outer(1 - lam1, table[:, 1])).sum(1)
        log_prior = (alpha - 1) * (np.log(lam1) + np.log(1 - lam1))
        dens = quad_w * np.exp(log_lik + log_prior - (log_lik + log_prior).max())
        mean1 = (dens * lam1).sum() / dens.sum()
        assert got[b, 0].item() == pytest.approx(mean1, rel=1e-9)
        assert got[b].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_exact_bayes_long_sequences_stay_finite_and_refuse_huge_tables():
    pi, sample = random_instance(vocab_size=5, order=3, batch=4, seq_len=300, seed=7)
    got = E.bayes_weights(sample.tokens, pi, 3, method="exact")
    assert torch.isfinite(got).all() and torch.allclose(got.sum(1), torch.ones(4, dtype=torch.float64))
    # With this much data the posterior mean sits close to the MLE (both consistent).
    assert (got - E.mle_weights(sample.tokens, pi, 3)).abs().max() < 0.1
    tokens = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match='method="gibbs"'):
        E.bayes_weights(tokens, torch.full((2, 2), 0.5, dtype=torch.float64), 6, method="exact")


# ----------------------------------------------------------------------------------------------
# Gibbs
# ----------------------------------------------------------------------------------------------


def test_gibbs_matches_exact_within_monte_carlo_error():
    """8 independent chains per sequence (the sequence repeated in the batch, each row runs its
    own chain); the spread of the 8 chain means gives the Monte-Carlo standard error."""
    pi, sample = random_instance(vocab_size=5, order=3, batch=6, seq_len=40, seed=8)
    chains = 8
    tokens = sample.tokens.repeat_interleave(chains, dim=0)
    gibbs = E.bayes_weights(
        tokens, pi, 3, method="gibbs", num_samples=1500, burn_in=100, generator=torch.Generator().manual_seed(1)
    )
    gibbs = gibbs.view(6, chains, 3)
    exact = E.bayes_weights(sample.tokens, pi, 3, method="exact")
    mean = gibbs.mean(1)
    se = gibbs.std(1) / math.sqrt(chains)
    assert ((mean - exact).abs() <= 5 * se + 2e-3).all()
    assert (mean - exact).abs().max() < 0.02


def test_gibbs_alpha_not_one_and_determinism():
    pi, sample = random_instance(vocab_size=4, order=2, batch=3, seq_len=30, seed=10)
    kwargs = {"alpha": 0.3, "method": "gibbs", "num_samples": 1000, "burn_in": 100}
    a = E.bayes_weights(sample.tokens, pi, 2, generator=torch.Generator().manual_seed(0), **kwargs)
    b = E.bayes_weights(sample.tokens, pi, 2, **kwargs)  # generator=None means a fresh seed 0
    c = E.bayes_weights(sample.tokens, pi, 2, generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    exact = E.bayes_weights(sample.tokens, pi, 2, alpha=0.3, method="exact")
    assert (a - exact).abs().max() < 0.03


# ----------------------------------------------------------------------------------------------
# tune_eta
# ----------------------------------------------------------------------------------------------


def test_tune_eta_returns_grid_minimum_of_mean_kl_by_loop():
    pi, sample = random_instance(vocab_size=5, order=3, batch=16, seq_len=40, seed=11)
    etas = torch.tensor([0.001, 0.01, 0.05, 0.2, 1.0], dtype=torch.float64)
    best, grid, mean_kl = E.tune_eta(sample.tokens, pi, 3, sample.next_probs, etas=etas)
    for i, eta in enumerate(etas.tolist()):
        total = 0.0
        for b in range(16):
            table = lag_table_loop(sample.tokens[b].tolist(), pi.numpy(), 3)
            sums = [sum(row[g] / sum(row) for row in table) for g in range(3)]
            w = np.exp(eta * 3 * np.array(sums))
            w /= w.sum()
            y = sample.tokens[b].tolist()
            pred = sum(w[g - 1] * pi[y[-g]].numpy() for g in range(1, 4))
            p = sample.next_probs[b].numpy()
            total += float((p * np.log(p / pred)).sum())
        assert mean_kl[i].item() == pytest.approx(total / 16, rel=1e-9)
    assert best == etas[int(np.argmin(mean_kl.numpy()))].item()
    assert torch.equal(grid, etas)


# ----------------------------------------------------------------------------------------------
# Theorems 1 and 2
# ----------------------------------------------------------------------------------------------


def test_theorem1_one_step_md_matches_bayes_to_first_order():
    """Near the no-evidence point (pi ~ uniform) one-step MD with eta = 1/(m+1) agrees with the
    Dirichlet(1) posterior mean up to O(eps^2); any other eta is off at O(eps)."""
    m, q = 3, 5
    noise = torch.rand(q, q, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    tokens = torch.randint(q, (8, 14), generator=torch.Generator().manual_seed(1))
    epsilons = [0.005, 0.01, 0.02, 0.04]
    gaps = {1 / (m + 1): [], 2 / (m + 1): []}
    for eps in epsilons:
        pi = (1 + eps * noise) / q
        pi = pi / pi.sum(1, keepdim=True)
        bayes = E.bayes_weights(tokens, pi, m, alpha=1.0, method="exact")
        for eta in gaps:
            gaps[eta].append((E.md_weights(tokens, pi, m, eta) - bayes).abs().max().item())
    slope = {eta: np.polyfit(np.log(epsilons), np.log(g), 1)[0] for eta, g in gaps.items()}
    assert 1.8 <= slope[1 / (m + 1)] <= 2.2, slope
    assert 0.8 <= slope[2 / (m + 1)] <= 1.2, slope


def bregman_gap(tokens, pi, m, lam, mu, L):
    """f(lam) + <grad f(lam), mu - lam> + L KL(mu || lam) - f(mu) for f = -l (autograd gradient);
    relative L-smoothness w.r.t. the negative entropy says this is >= 0."""
    x = lam.clone().requires_grad_(True)
    f_lam = -E.log_likelihood(tokens, pi, m, x).sum()
    (grad,) = torch.autograd.grad(f_lam, x)
    f_mu = -E.log_likelihood(tokens, pi, m, mu).item()
    kl = float((mu * torch.log(mu / lam)).nansum())  # KL by formula, 0 log 0 = 0
    return f_lam.item() + float(grad @ (mu - lam)) + L * kl - f_mu


def random_simplex_pairs(m, n, concentration, floor, generator):
    """n random pairs (lam, mu) with every coordinate >= floor (Dirichlet rows mixed with 1/m)."""
    conc = torch.full((2, n, m), concentration, dtype=torch.float64)
    draw = dirichlet_sample(conc, generator)
    return floor + (1 - m * floor) * draw  # maps the simplex onto {x >= floor}


@pytest.mark.parametrize("m", [2, 3, 4])
def test_theorem2_bound_holds_when_weights_stay_above_one_over_m_squared(m):
    """Theorem 2, L = (T-m) m^2, checked on random Dirichlet(1) transitions and random pairs whose
    coordinates are all >= 1/m^2 (incl. pairs on that face). Per position the Hessian a a^T/(x.a)^2
    is <= diag(1/x) * max_g a_g/(x.a) <= diag(1/x)/min_g x_g, so the bound holds on this region."""
    gen = torch.Generator().manual_seed(m)
    for seed in range(3):
        pi, sample = random_instance(vocab_size=5, order=m, batch=1, seq_len=12 + 10 * seed, seed=30 + seed)
        tokens = sample.tokens[0]
        L = (tokens.shape[0] - m) * m**2
        for concentration in (1.0, 0.05):  # 0.05: most pairs sit on the face of the region
            lam, mu = random_simplex_pairs(m, 40, concentration, 1.0 / m**2, gen)
            gaps = [bregman_gap(tokens, pi, m, lam[i], mu[i], L) for i in range(40)]
            assert min(gaps) >= -1e-9, (seed, concentration, min(gaps))


@pytest.mark.parametrize("m", [2, 3])
def test_theorem2_bound_holds_anywhere_when_lag_likelihood_ratios_are_at_most_m_squared(m):
    """If at every position max_g P[k,g] / min_g P[k,g] <= m^2 (here: pi entries within a
    factor m of each other before row normalisation, so any two entries within m^2), the bound
    holds for every pair, incl. lam and mu near the faces of the simplex (down to 1e-9)."""
    gen = torch.Generator().manual_seed(10 + m)
    raw = 1 + (m - 1) * torch.rand(5, 5, generator=gen, dtype=torch.float64)
    pi = raw / raw.sum(1, keepdim=True)
    tokens = torch.randint(5, (30,), generator=gen)
    L = (30 - m) * m**2
    for concentration in (1.0, 0.1, 0.02):
        lam, mu = random_simplex_pairs(m, 60, concentration, 1e-9, gen)
        gaps = [bregman_gap(tokens, pi, m, lam[i], mu[i], L) for i in range(60)]
        assert min(gaps) >= -1e-9, (concentration, min(gaps))


def test_theorem2_bound_fails_without_a_condition_counterexample():
    """The bound is not unconditional: one scored position with lag likelihoods (1, 0.01)
    (ratio 100 > m^2 = 4), lam = centre, mu = the vertex of the unlikely lag. By hand:
    Bregman of f = r - 1 - log r with r = 0.01 / 0.505, while L KL = 4 log 2."""
    pi = torch.tensor([[0.99, 0.01], [0.5, 0.5]], dtype=torch.float64)
    tokens = torch.tensor([0, 1, 0])  # k = 3: y_2 = 1 (lag 1), y_1 = 0 (lag 2) -> (pi(1,0), pi(0,0))
    # P[3] = (pi(y_2, y_3), pi(y_1, y_3)) = (0.5, 0.99): use mu on lag 1 (likelihood 0.5), lam centre.
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mu = torch.tensor([1.0, 0.0], dtype=torch.float64)
    r = 0.5 / (0.5 * 0.5 + 0.5 * 0.99)
    by_hand = (4 * math.log(2)) - (r - 1 - math.log(r))
    assert bregman_gap(tokens, pi, 2, lam, mu, L=4) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand > 0  # ratio 1.98 < m^2: holds here ...
    pi_extreme = torch.tensor([[0.99, 0.01], [0.0099, 0.9901]], dtype=torch.float64)
    tokens = torch.tensor([1, 0, 1])  # P[3] = (pi(0, 1), pi(1, 1)) = (0.01, 0.9901)
    r = 0.01 / (0.5 * 0.01 + 0.5 * 0.9901)
    by_hand = (4 * math.log(2)) - (r - 1 - math.log(r))
    assert bregman_gap(tokens, pi_extreme, 2, lam, mu, L=4) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand < 0  # ... ratio 99 > m^2: violated


# ----------------------------------------------------------------------------------------------
# Bad input: every public function raises ValueError naming the problem
# ----------------------------------------------------------------------------------------------

GOOD_PI = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
GOOD_TOKENS = torch.tensor([[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 1, 1]])
GOOD_W = torch.tensor([0.6, 0.4], dtype=torch.float64)
M = 2

BAD_TOKENS = {
    "above vocab": (torch.tensor([[0, 1, 3, 1, 0]]), "lie in"),
    "negative": (torch.tensor([[0, -1, 2, 1, 0]]), "lie in"),
    "T <= m": (torch.tensor([[0, 1]]), "more tokens than the order"),
    "float": (torch.tensor([[0.0, 1.0, 2.0]]), "integer"),
    "3-d": (torch.zeros(1, 2, 5, dtype=torch.long), "shape"),
}
BAD_PI = {
    "not square": (torch.full((3, 2), 0.5, dtype=torch.float64), "square"),
    "not row-stochastic": (GOOD_PI * 1.1, "row-stochastic"),
    "NaN": (torch.where(torch.eye(3, dtype=torch.bool), torch.nan, GOOD_PI), "NaN"),
    "zero row": (torch.cat([GOOD_PI[:2], torch.zeros(1, 3, dtype=torch.float64)]), "zero row"),
    "negative": (torch.tensor([[1.2, -0.2, 0.0], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64), "negative"),
}
BAD_W = {
    "off simplex": (torch.tensor([0.7, 0.7], dtype=torch.float64), "simplex"),
    "negative": (torch.tensor([1.5, -0.5], dtype=torch.float64), "simplex"),
    "NaN": (torch.tensor([torch.nan, 0.5], dtype=torch.float64), "NaN"),
    "wrong m": (torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), "shape"),
    "wrong batch": (torch.full((3, 2), 0.5, dtype=torch.float64), "batch"),
}


def token_functions(tokens, pi):
    """Every public estimator that takes (tokens, transition), with good other arguments."""
    target = torch.full(
        (tokens.shape[0] if tokens.ndim == 2 else 1, pi.shape[0] if pi.ndim == 2 else 3), 1 / 3, dtype=torch.float64
    )
    return {
        "lag_likelihoods": lambda: E.lag_likelihoods(tokens, pi, M),
        "responsibilities": lambda: E.responsibilities(tokens, pi, M),
        "log_likelihood": lambda: E.log_likelihood(tokens, pi, M, GOOD_W),
        "md_weights": lambda: E.md_weights(tokens, pi, M, 0.1),
        "md_weights_steps": lambda: E.md_weights(tokens, pi, M, 0.1, steps=3),
        "md_weights_by_step": lambda: E.md_weights_by_step(
            tokens, pi, M, torch.tensor([0.1, 0.05], dtype=torch.float64)
        ),
        "mle_weights": lambda: E.mle_weights(tokens, pi, M),
        "predictive": lambda: E.predictive(tokens, pi, GOOD_W),
        "tune_eta": lambda: E.tune_eta(tokens, pi, M, target),
        "bayes_exact": lambda: E.bayes_weights(tokens, pi, M, method="exact"),
        "bayes_gibbs": lambda: E.bayes_weights(tokens, pi, M, method="gibbs", num_samples=5, burn_in=0),
    }


FUNCTION_NAMES = list(token_functions(GOOD_TOKENS, GOOD_PI))


# tune_eta returns a tuple (checked below); Gibbs draws from one generator for the whole batch.
@pytest.mark.parametrize("name", [n for n in FUNCTION_NAMES if n not in ("tune_eta", "bayes_gibbs")])
def test_good_input_gives_each_sequence_its_own_answer(name):
    """Finite output, and the batch's row b is what sequence b alone gives (a 1-D input)."""
    batched = token_functions(GOOD_TOKENS, GOOD_PI)[name]()
    assert torch.isfinite(batched).all()
    for b, sequence in enumerate(GOOD_TOKENS):
        alone = token_functions(sequence, GOOD_PI)[name]()
        torch.testing.assert_close(alone.reshape(batched[b].shape), batched[b], rtol=1e-10, atol=1e-12)


def test_tune_eta_on_good_input_returns_the_grid_minimum():
    target = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    eta, etas, mean_kl = E.tune_eta(GOOD_TOKENS, GOOD_PI, M, target)
    by_hand = [
        E.kl_divergence(target, E.predictive(GOOD_TOKENS, GOOD_PI, E.md_weights(GOOD_TOKENS, GOOD_PI, M, e))).mean()
        for e in etas.tolist()
    ]
    torch.testing.assert_close(mean_kl, torch.stack(by_hand))
    assert eta == etas[int(torch.argmin(mean_kl))].item()


@pytest.mark.parametrize("case", list(BAD_TOKENS))
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_bad_tokens_raise(name, case):
    tokens, message = BAD_TOKENS[case]
    with pytest.raises(ValueError, match=message):
        token_functions(tokens, GOOD_PI)[name]()


@pytest.mark.parametrize("case", list(BAD_PI))
@pytest.mark.parametrize("name", FUNCTION_NAMES)
def test_bad_transition_raises(name, case):
    pi, message = BAD_PI[case]
    with pytest.raises(ValueError, match=message):
        token_functions(GOOD_TOKENS, pi)[name]()


# predictive reads m off the weights, so a different m is not an error there (one longer than
# the context is: T <= m).
@pytest.mark.parametrize(
    "name,case",
    [
        (name, case)
        for name in ("log_likelihood", "predictive")
        for case in BAD_W
        if (name, case) != ("predictive", "wrong m")
    ],
)
def test_bad_weights_raise(name, case):
    weights, message = BAD_W[case]
    call = {
        "log_likelihood": lambda: E.log_likelihood(GOOD_TOKENS, GOOD_PI, M, weights),
        "predictive": lambda: E.predictive(GOOD_TOKENS, GOOD_PI, weights),
    }[name]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: E.md_weights(GOOD_TOKENS, GOOD_PI, M, 0.0), "eta"),
        (lambda: E.md_weights(GOOD_TOKENS, GOOD_PI, M, float("nan")), "eta"),
        (lambda: E.md_weights(GOOD_TOKENS, GOOD_PI, M, 0.1, steps=0), "steps"),
        (lambda: E.md_weights(GOOD_TOKENS, GOOD_PI, 0, 0.1), "order"),
        (lambda: E.bayes_weights(GOOD_TOKENS, GOOD_PI, M, alpha=-1.0), "alpha"),
        (lambda: E.bayes_weights(GOOD_TOKENS, GOOD_PI, M, method="mcmc"), "method"),
        (lambda: E.bayes_weights(GOOD_TOKENS, GOOD_PI, M, method="gibbs", burn_in=-1), "burn_in"),
        (lambda: E.bayes_weights(GOOD_TOKENS, GOOD_PI, M, method="gibbs", generator=0), "generator"),
        (lambda: E.tune_eta(GOOD_TOKENS, GOOD_PI, M, torch.full((3, 3), 1 / 3)), "target_probs"),
        (
            lambda: E.tune_eta(GOOD_TOKENS, GOOD_PI, M, torch.full((2, 3), 1 / 3), etas=torch.tensor([0.1, -1.0])),
            "etas",
        ),
        (lambda: E.kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5])), "shapes"),
        (lambda: E.kl_divergence(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5])), "sum to 1"),
        (lambda: E.kl_divergence(torch.tensor([torch.nan, 0.5]), torch.tensor([0.5, 0.5])), "NaN"),
        (lambda: E.kl_divergence(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5])), "negative"),
        (lambda: E.predictive(GOOD_TOKENS, GOOD_PI, torch.ones(2, 2, 2) / 2), "weights"),
        (lambda: E.predictive(GOOD_TOKENS, GOOD_PI, torch.full((7,), 1 / 7)), "more tokens than the order"),
    ],
)
def test_other_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_impossible_token_raises():
    """A token with probability 0 under every lag has likelihood 0 for every lambda."""
    pi = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tokens = torch.tensor([[0, 0, 1]])  # y_3 = 1 but both parents are 0 and pi(0, 1) = 0
    for call in (
        lambda: E.responsibilities(tokens, pi, 2),
        lambda: E.md_weights(tokens, pi, 2, 0.1),
        lambda: E.bayes_weights(tokens, pi, 2),
    ):
        with pytest.raises(ValueError, match="probability 0"):
            call()


# ----------------------------------------------------------------------------------------------
# Exact Bayes: the cost, the cap, the hints and the progress bar
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq_len", "order"), [(5, 2), (9, 3), (8, 4), (3, 3), (7, 1)])
def test_exact_bayes_work_counts_the_count_vectors_visited_at_each_position(seq_len, order):
    # Brute force: after scored position k the table holds every (n_1..n_{m-1}) with entries in 0..k.
    n_scored = max(seq_len - order, 0)
    visited = sum(len(list(itertools.product(range(k + 1), repeat=order - 1))) for k in range(1, n_scored + 1))
    assert E.exact_bayes_work(seq_len, order) == (visited if order > 1 else 0)


@pytest.mark.parametrize("order", [2, 3, 4, 5, 6])
def test_the_longest_accepted_length_is_the_edge_of_the_cap(order):
    longest = E.longest_exact_bayes(order)
    E.check_exact_bayes_size(longest, order)
    with pytest.raises(ValueError, match=f"the longest T it takes for m={order} is {longest}"):
        E.check_exact_bayes_size(longest + 1, order)
    # The cost that binds at the edge: the updates (time) or the table (memory), whichever is smaller.
    work, cells = E.exact_bayes_work(longest + 1, order), (longest - order + 2) ** (order - 1)
    assert work > E.MAX_EXACT_WORK or cells > E.MAX_EXACT_CELLS
    # The cap follows the cost: for m=3 the old 2^22-cell cap let T = 2000 through (minutes per sequence).
    if order == 3:
        assert 1000 <= longest < 2000


def tokens_over_the_cap(order: int) -> tuple[torch.Tensor, torch.Tensor]:
    pi = torch.full((2, 2), 0.5, dtype=torch.float64)
    return torch.zeros(1, E.longest_exact_bayes(order) + 1, dtype=torch.long), pi


def test_every_exact_bayes_refusal_names_an_argument_of_its_caller():
    import inspect

    from mdlens import hooks

    tokens, pi = tokens_over_the_cap(3)
    with pytest.raises(ValueError, match='use method="gibbs"'):
        E.bayes_weights(tokens, pi, 3)
    assert "method" in inspect.signature(E.bayes_weights).parameters
    gibbs = E.bayes_weights(tokens, pi, 3, method="gibbs", num_samples=2, burn_in=0)  # what the hint says works
    assert torch.allclose(gibbs.sum(-1), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r'bayes_weights\(tokens\[:, :t\], \.\.\., method="gibbs"\)'):
        E.prefix_bayes_weights(tokens, pi, 3)
    with pytest.raises(ValueError, match="pass include_bayes=False") as refused:
        hooks.targets(tokens, pi, 3)
    assert "method=" not in str(refused.value)
    assert "include_bayes" in inspect.signature(hooks.targets).parameters
    assert "bayes_weights" not in hooks.targets(tokens, pi, 3, include_bayes=False)  # the hint works


def test_exact_bayes_progress_bar_shows_for_long_jobs_or_on_request(capsys, monkeypatch):
    from tqdm import tqdm

    pi, sample = random_instance(vocab_size=5, order=3, batch=3, seq_len=40, seed=3)
    quiet = E.bayes_weights(sample.tokens, pi, 3)  # a short job: no bar by default
    assert "exact Bayes" not in capsys.readouterr().err
    shown = E.bayes_weights(sample.tokens, pi, 3, progress=True)
    bar = capsys.readouterr().err
    total = 3 * E.exact_bayes_work(40, 3)  # the bar counts every cell update of the job
    done = tqdm.format_sizeof(total)
    assert "exact Bayes: 100%" in bar and f"{done}/{done}" in bar
    assert torch.equal(quiet, shown)
    # A job above PROGRESS_MIN_WORK shows it without being asked; progress=False silences it.
    monkeypatch.setattr(E, "PROGRESS_MIN_WORK", total - 1)
    E.prefix_bayes_weights(sample.tokens, pi, 3)
    assert "exact Bayes: 100%" in capsys.readouterr().err
    E.prefix_bayes_weights(sample.tokens, pi, 3, progress=False)
    assert "exact Bayes" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress must be True, False or None"):
        E.bayes_weights(sample.tokens, pi, 3, progress="yes")


# ---- the conventions every module calls instead of retyping ------------------------------------


def test_last_tokens_are_the_lagged_rows_y_T_plus_1_minus_g():
    tokens = torch.tensor([[0, 1, 2, 3, 4, 0, 1], [4, 4, 3, 2, 1, 0, 2]])
    order = 3
    expected = [[tokens[b, 7 - g].item() for g in range(1, order + 1)] for b in range(2)]  # y_{T+1-g}, 1-based
    assert E.last_tokens(tokens, order).tolist() == expected


def test_prefix_mean_responsibility_is_the_mean_of_each_prefix():
    gamma = torch.rand(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    means = E.prefix_mean_responsibility(gamma)
    for row in range(6):
        torch.testing.assert_close(means[:, row], gamma[:, : row + 1].mean(dim=1), rtol=1e-15, atol=1e-15)


def test_beta_from_eta_gives_the_last_position_the_step_eta():
    # beta = eta * m * (T - m) = 0.05 * 3 * 29 = 4.35 for T = 32, m = 3; eta_T = beta / (m (T - m)).
    assert E.beta_from_eta(0.05, 3, 32) == pytest.approx(4.35, rel=1e-15)
    assert E.eta_from_beta(4.35, 3, 32) == pytest.approx(0.05, rel=1e-15)


def test_causal_md_step_of_names_the_step_that_computes_each_variable():
    expected = {"responsibility": 1, "mean_responsibility": 1, "lambda1": 1, "second_step_mean": 2, "lambda2": 2}
    expected |= {"third_step_mean": 3, "lambda3": 3, "fifth_step_mean": 5, "lambda5": 5}
    assert {name: E.causal_md_step_of(name) for name in expected} == expected
    for unknown in ("lambda0", "lambda6", "first_step_mean", "weights"):
        with pytest.raises(ValueError, match="no variable of causal MD"):
            E.causal_md_step_of(unknown)
