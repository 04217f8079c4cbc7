"""Tests of mdlens.MTDTask: sampler statistics at fixed seeds against the model's definition
(paper-notes §1), determinism, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mdlens import MTDTask


@pytest.fixture(scope="module")
def big_sample():
    task = MTDTask(vocab_size=4, order=3, alpha=1.0, seed=0)
    return task, task.sample(2000, 60, generator=torch.Generator().manual_seed(1))


def test_shapes_dtypes_and_ranges(big_sample):
    task, s = big_sample
    assert s.tokens.shape == (2000, 60) and s.tokens.dtype == torch.int64
    assert s.weights.shape == (2000, 3) and s.weights.dtype == torch.float64
    assert s.lags.shape == (2000, 60) and s.next_probs.shape == (2000, 4)
    assert (s.lags[:, :3] == 0).all() and (s.lags[:, 3:] >= 1).all() and (s.lags[:, 3:] <= 3).all()
    assert s.tokens.min() >= 0 and s.tokens.max() < 4
    assert torch.allclose(task.transition.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(s.weights.sum(1), torch.ones(2000, dtype=torch.float64))


def test_lag_frequencies_match_weights(big_sample):
    """Per sequence the 57 lags are i.i.d. Cat(lambda): a chi-square statistic summed over all
    sequences has mean (m-1) * B and sd sqrt(2 (m-1) B)."""
    _, s = big_sample
    lags = s.lags[:, 3:]
    n = lags.shape[1]
    counts = torch.stack([(lags == g).sum(1) for g in (1, 2, 3)], dim=1).double()
    expected = n * s.weights
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = 2 * 2000
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2


def test_transitions_given_latent_parent_match_matrix(big_sample):
    """Counts of (y_{t - z_t}, y_t): each row is multinomial with probabilities pi(u, .)."""
    task, s = big_sample
    T = s.tokens.shape[1]
    counts = torch.zeros(4, 4, dtype=torch.float64)
    for t in range(3, T):  # 0-based position t, parent at t - z_t
        parent = s.tokens[torch.arange(2000), t - s.lags[:, t]]
        counts.index_put_((parent, s.tokens[:, t]), torch.ones(2000, dtype=torch.float64), accumulate=True)
    row_totals = counts.sum(1, keepdim=True)
    empirical = counts / row_totals
    se = torch.sqrt(task.transition * (1 - task.transition) / row_totals)
    assert ((empirical - task.transition).abs() <= 5 * se + 1e-12).all()


def test_first_m_tokens_uniform(big_sample):
    _, s = big_sample
    first = s.tokens[:, :3].flatten()
    freq = torch.bincount(first, minlength=4).double() / first.numel()
    se = math.sqrt(0.25 * 0.75 / first.numel())
    assert ((freq - 0.25).abs() < 5 * se).all()


def test_next_probs_formula(big_sample):
    task, s = big_sample
    for b in range(0, 2000, 397):
        y = s.tokens[b].tolist()
        expected = sum(s.weights[b, g - 1] * task.transition[y[-g]] for g in (1, 2, 3))  # y_{T+1-g}
        assert torch.allclose(s.next_probs[b], expected, rtol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.3, 4.0])
def test_weights_have_dirichlet_moments(alpha):
    """Dirichlet(alpha 1_m): mean 1/m, var (m-1)/(m^2 (m alpha + 1))."""
    m, n = 3, 20000
    s = MTDTask(vocab_size=3, order=m, alpha=alpha, seed=2).sample(n, 4, generator=torch.Generator().manual_seed(3))
    var = (m - 1) / (m**2 * (m * alpha + 1))
    mean_se = math.sqrt(var / n)
    assert ((s.weights.mean(0) - 1 / m).abs() < 5 * mean_se).all()
    # variance of the sample variance ~ (mu4 - var^2)/n; a 6% relative band is > 5 sd here
    assert ((s.weights.var(0) / var) - 1).abs().max() < 0.06


def test_transition_rows_from_dirichlet_concentration():
    """Rows ~ Dirichlet(c 1_q): entry mean 1/q, var (q-1)/(q^2 (q c + 1))."""
    q, c = 4, 2.0
    rows = torch.cat(
        [MTDTask(vocab_size=q, order=1, seed=s, transition_concentration=c).transition for s in range(400)]
    )
    var = (q - 1) / (q**2 * (q * c + 1))
    assert (rows.mean(0) - 1 / q).abs().max() < 5 * math.sqrt(var / rows.shape[0])
    assert abs(rows.var().item() / var - 1) < 0.15


def test_determinism_and_seeds():
    a = MTDTask(vocab_size=5, order=2, seed=4)
    b = MTDTask(vocab_size=5, order=2, seed=4)
    c = MTDTask(vocab_size=5, order=2, seed=5)
    assert torch.equal(a.transition, b.transition) and not torch.equal(a.transition, c.transition)
    sa, sb = a.sample(8, 20), b.sample(8, 20)
    assert torch.equal(sa.tokens, sb.tokens) and torch.equal(sa.weights, sb.weights)
    assert not torch.equal(a.sample(8, 20).tokens, sa.tokens)  # the task's generator moves on
    g1 = a.sample(8, 20, generator=torch.Generator().manual_seed(9))
    g2 = c.sample(8, 20, generator=torch.Generator().manual_seed(9))
    g3 = a.sample(8, 20, generator=torch.Generator().manual_seed(10))
    assert torch.equal(g1.weights, g2.weights)  # same generator, same draws (pi differs)
    assert not torch.equal(g1.tokens, g3.tokens)


def test_given_transition_is_used_exactly():
    pi = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    task = MTDTask(order=2, transition=pi, seed=0)
    assert task.vocab_size == 3 and torch.equal(task.transition, pi)
    s = task.sample(50, 30)
    # deterministic cycle: y_t = y_{t - z_t} + 1 mod 3, and zero-probability moves never happen
    for t in range(2, 30):
        parent = s.tokens[torch.arange(50), t - s.lags[:, t]]
        assert torch.equal(s.tokens[:, t], (parent + 1) % 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"vocab_size": 1, "order": 2}, "vocab_size"),
        ({"order": 2}, "vocab_size"),
        ({"vocab_size": 3, "order": 0}, "order"),
        ({"vocab_size": 3, "order": 2, "alpha": 0.0}, "alpha"),
        ({"vocab_size": 3, "order": 2, "seed": 1.5}, "seed"),
        ({"vocab_size": 3, "order": 2, "transition_concentration": -1.0}, "transition_concentration"),
        ({"order": 2, "transition": torch.ones(2, 3) / 3}, "square"),
        ({"order": 2, "transition": torch.ones(3, 3)}, "row-stochastic"),
        ({"order": 2, "transition": torch.tensor([[0.5, 0.5], [0.0, 0.0]])}, "zero row"),
        ({"order": 2, "transition": torch.tensor([[0.5, float("nan")], [0.5, 0.5]])}, "NaN"),
        ({"vocab_size": 4, "order": 2, "transition": torch.ones(3, 3) / 3}, "does not match"),
    ],
)
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MTDTask(**kwargs)


@pytest.mark.parametrize(
    "args,message",
    [((0, 10), "batch_size"), ((4, 3), "seq_len must exceed"), ((4, 2.5), "seq_len"), ((-1, 10), "batch_size")],
)
def test_bad_sample_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        MTDTask(vocab_size=3, order=3, seed=0).sample(*args)
    with pytest.raises(ValueError, match="generator"):
        MTDTask(vocab_size=3, order=3, seed=0).sample(2, 10, generator=1)


def test_prefix_last_tokens_are_each_prefixs_lagged_rows():
    from mdlens.task import last_tokens, prefix_last_tokens

    tokens = torch.randint(0, 5, (3, 9), generator=torch.Generator().manual_seed(4))
    rows = prefix_last_tokens(tokens, 3)
    assert rows.shape == (3, 6, 3)
    for t in range(4, 10):  # prefix y_1..y_t, 1-based
        expected = [[tokens[b, t - g].item() for g in range(1, 4)] for b in range(3)]  # y_{t+1-g}
        assert rows[:, t - 4].tolist() == expected
        assert torch.equal(rows[:, t - 4], last_tokens(tokens[:, :t], 3))
