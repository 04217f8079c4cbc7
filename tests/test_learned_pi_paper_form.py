"""``hooks.weights.softmax_transition_kl``, the paper's "KL between pi and a softmax of layer 1's W_A",
against row-by-row numpy loops and the construction's known answers (its score block is exactly
``(log pi)^T``)."""

import numpy as np
import pytest
import torch

import mdlens
from mdlens.construction import build_md_transformer
from mdlens.hooks.weights import softmax_transition_kl
from mdlens.models import DisentangledTransformer, standard_transformer


def random_transition(q: int, seed: int) -> torch.Tensor:
    rows = -torch.log(torch.rand(q, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return rows / rows.sum(dim=1, keepdim=True)


def model_with_scores(scores: torch.Tensor) -> DisentangledTransformer:
    """A float64 one-layer disentangled model whose layer-1 token-token block is ``scores``."""
    q = scores.shape[0]
    model = DisentangledTransformer(q, 8, n_layers=1, window=3, dtype=torch.float64, order=2)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :q, :q] = scores
    return model


def brute_force(scores: np.ndarray, pi: np.ndarray) -> dict[str, float]:
    """Every form, one row at a time: softmax by hand, KL(target || softmax) with 0 log 0 = 0."""
    q = pi.shape[0]

    def softmax(vector: np.ndarray) -> np.ndarray:
        e = np.exp(vector - vector.max())
        return e / e.sum()

    def kl(p: np.ndarray, r: np.ndarray) -> float:
        return sum(p[v] * np.log(p[v] / r[v]) for v in range(len(p)) if p[v] > 0)

    posterior = np.array([[pi[a, b] / pi[:, b].sum() for a in range(q)] for b in range(q)])  # row b: P(a | b)
    uniform = np.full(q, 1.0 / q)
    return {
        "softmax_over_keys_vs_pi": np.mean([kl(pi[i], softmax(scores[i, :])) for i in range(q)]),
        "softmax_over_queries_vs_pi": np.mean([kl(pi[a], softmax(scores[:, a])) for a in range(q)]),
        "softmax_over_keys_vs_parent_posterior": np.mean([kl(posterior[b], softmax(scores[b, :])) for b in range(q)]),
        "uniform_vs_pi": np.mean([kl(pi[a], uniform) for a in range(q)]),
        "uniform_vs_parent_posterior": np.mean([kl(posterior[b], uniform) for b in range(q)]),
    }


@pytest.mark.parametrize("q, seed", [(3, 0), (5, 1), (8, 2)])
def test_every_form_matches_a_row_by_row_computation_on_random_scores(q, seed):
    generator = torch.Generator().manual_seed(100 + seed)
    scores = 3 * torch.randn(q, q, generator=generator, dtype=torch.float64)
    pi = random_transition(q, seed)
    pi[0, 1] = 0.0  # a zero transition: 0 log 0 = 0 in every form
    pi = pi / pi.sum(dim=1, keepdim=True)
    result = softmax_transition_kl(model_with_scores(scores), pi)
    expected = brute_force(scores.numpy(), pi.numpy())
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    assert min(result.values()) > 0  # random scores and a random pi: no form is exact


@pytest.mark.parametrize("q, m", [(5, 3), (4, 2), (6, 4)])
def test_the_construction_scores_zero_in_the_transposed_forms_and_not_in_the_literal_one(q, m):
    pi = random_transition(q, seed=q + m)
    model = build_md_transformer(pi, m, seq_len=16, eta=0.1)
    result = softmax_transition_kl(model, pi)
    # The block is (log pi)^T: softmax over queries per key a is pi(a, .) itself, and softmax over keys
    # per query b is pi(., b) / sum_a pi(a, b), the parent posterior.
    assert result["softmax_over_queries_vs_pi"] < 1e-12
    assert result["softmax_over_keys_vs_parent_posterior"] < 1e-12
    # Read as log pi itself (no transpose), it is as wrong as brute force says, and not 0.
    log_pi_T = np.log(pi.numpy()).T
    literal = brute_force(log_pi_T, pi.numpy())["softmax_over_keys_vs_pi"]
    assert result["softmax_over_keys_vs_pi"] == pytest.approx(literal, rel=1e-10) and literal > 1e-3


def test_per_query_shifts_change_only_the_form_attention_cannot_see():
    pi = random_transition(5, seed=7)
    model = build_md_transformer(pi, 3, seq_len=12, eta=0.2)
    before = softmax_transition_kl(model, pi)
    shifts = 4 * torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :5, :5] += shifts  # one constant per query row: attention is unchanged
    after = softmax_transition_kl(model, pi)
    for key in ("softmax_over_keys_vs_pi", "softmax_over_keys_vs_parent_posterior", "uniform_vs_pi"):
        assert after[key] == pytest.approx(before[key], abs=1e-12)
    assert after["softmax_over_queries_vs_pi"] > 1e-3  # was 0: this form reads the shifts as signal


def test_the_uniform_guess_is_what_zero_scores_score():
    pi = random_transition(5, seed=3)
    result = softmax_transition_kl(model_with_scores(torch.zeros(5, 5, dtype=torch.float64)), pi)
    assert result["softmax_over_keys_vs_pi"] == pytest.approx(result["uniform_vs_pi"], abs=1e-14)
    assert result["softmax_over_queries_vs_pi"] == pytest.approx(result["uniform_vs_pi"], abs=1e-14)
    assert result["softmax_over_keys_vs_parent_posterior"] == pytest.approx(
        result["uniform_vs_parent_posterior"], abs=1e-14
    )
    # KL(p || uniform) = log q - H(p), averaged over the rows
    entropy = -(pi * pi.log()).sum(dim=1)
    assert result["uniform_vs_pi"] == pytest.approx(float((np.log(5) - entropy).mean()), rel=1e-12)


def test_the_shipped_3l_long_model_is_closest_in_the_attention_form():
    # Its layer 1 follows (log pi)^T (README): the per-query form is the one that is far below uniform.
    model, task = mdlens.load_pretrained("disentangled-3l-long")
    result = softmax_transition_kl(model, task.transition)
    scores = model.blocks[0].attn.W_Q[0, :5, :5].detach().to(torch.float64).numpy()
    expected = brute_force(scores, task.transition.numpy())
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
    assert result["softmax_over_keys_vs_parent_posterior"] < result["uniform_vs_parent_posterior"] / 3


def test_bad_inputs_raise_value_errors():
    pi = random_transition(4, seed=1)
    with pytest.raises(ValueError, match="DisentangledTransformer"):
        softmax_transition_kl(standard_transformer(4, 8, n_layers=1, d_model=8, n_heads=1, seed=0), pi)
    model = model_with_scores(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_vocab"):
        softmax_transition_kl(model, random_transition(5, seed=1))
    never_next = pi.clone()
    never_next[:, 2] = 0.0
    never_next = never_next / never_next.sum(dim=1, keepdim=True)
    with pytest.raises(ValueError, match=r"columns \[2\] are zero"):
        softmax_transition_kl(model, never_next)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        softmax_transition_kl(model, pi)
