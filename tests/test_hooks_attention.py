"""mdlens.hooks.attention: attention agreement, responsibility TV, offset mass, head matching.

Expected values come from closed forms (uniform causal attention against the construction) or
from responsibilities computed here by hand from pi, never from the module's own output.
"""

import copy
import itertools
import json
import math

import pytest
import torch

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.hooks._assignment import min_cost_assignment, ordered_assignment
from mdlens.hooks.attention import (
    AttentionAgreement,
    HeadAgreement,
    attention_agreement,
    attention_patterns,
    offset_mass,
    responsibility_tv,
)
from mdlens.models.disentangled import DisentangledTransformer
from mdlens.models.growth import grow
from mdlens.models.standard import standard_transformer

Q, M, T = 5, 3, 24


@pytest.fixture(scope="module")
def task():
    return MTDTask(vocab_size=Q, order=M, seed=0)


@pytest.fixture(scope="module")
def tokens(task):
    return task.sample(6, T, generator=torch.Generator().manual_seed(11)).tokens


@pytest.fixture(scope="module")
def construction(task):
    return build_md_transformer(task.transition, M, T, eta=0.3)


@pytest.fixture(scope="module")
def uniform_model():
    """All scores zero: every layer attends uniformly to keys 0..t (weight 1/(t+1))."""
    return DisentangledTransformer(Q, T, n_layers=3, window=M + 1, dtype=torch.float64, init_std=0.0)


def gamma_by_hand(tokens, pi):
    """gamma[b, t, g-1] = pi(y_{t-g}, y_t) / sum_h pi(y_{t-h}, y_t) for 0-based t = m..T-1."""
    batch, length = tokens.shape
    gamma = torch.zeros(batch, length - M, M, dtype=torch.float64)
    for b in range(batch):
        for t in range(M, length):
            lik = torch.tensor([pi[tokens[b, t - g], tokens[b, t]] for g in range(1, M + 1)], dtype=torch.float64)
            gamma[b, t - M] = lik / lik.sum()
    return gamma


def test_construction_against_itself(construction, tokens):
    result = attention_agreement(construction, construction, tokens)
    assert result.matching == "layerwise"
    assert result.order == M and result.n_sequences == 6 and result.seq_len == T
    assert result.pairs == [((layer, 0), (layer, 0)) for layer in range(3)]
    for head in result.heads:
        assert head.tv == 0.0 and head.kl == 0.0 and head.support_mass == pytest.approx(1.0, abs=1e-12)
    # Layer 1 attends only to the lag window; nothing on the query itself.
    assert result.heads[0].self_mass == 0.0 and result.heads[0].lag_mass == pytest.approx(1.0, abs=1e-12)
    assert "L1.H0" in str(result)
    assert result.to_dict()["heads"][0]["tv"] == 0.0


def test_uniform_model_against_construction_closed_form(task, construction, uniform_model, tokens):
    result = attention_agreement(uniform_model, construction, tokens)
    rows = torch.arange(M, T, dtype=torch.float64)  # 0-based query t; the uniform row has t + 1 keys
    n_keys = rows + 1
    # Layer 2 (blocks.1): the construction is uniform over keys m..t, the model over 0..t.
    layer2 = result.heads[1]
    assert layer2.tv == pytest.approx(float((M / n_keys).mean()), abs=1e-12)
    assert layer2.kl == pytest.approx(float(torch.log(n_keys / (rows - M + 1)).mean()), abs=1e-12)
    assert layer2.support_mass == pytest.approx(float(((rows - M + 1) / n_keys).mean()), abs=1e-12)
    # Layer 1 (blocks.0): the construction's row t is gamma_t(g) at key t - g.
    gamma = gamma_by_hand(tokens, task.transition)
    uniform = (1 / n_keys)[None, :, None]
    tv_rows = 0.5 * ((uniform - gamma).abs().sum(-1) + (n_keys - M) / n_keys)
    kl_rows = (torch.xlogy(gamma, gamma) - torch.xlogy(gamma, uniform.expand_as(gamma))).sum(-1)
    support_rows = (gamma > 1e-9).sum(-1) / n_keys
    layer1 = result.heads[0]
    assert layer1.tv == pytest.approx(float(tv_rows.mean()), abs=1e-12)
    assert layer1.kl == pytest.approx(float(kl_rows.mean()), abs=1e-12)
    assert layer1.support_mass == pytest.approx(float(support_rows.mean()), abs=1e-12)
    # The uniform model's mass at offset 0 and offsets 1..m: 1/(t+1) and m/(t+1).
    assert layer1.self_mass == pytest.approx(float((1 / n_keys).mean()), abs=1e-12)
    assert layer1.lag_mass == pytest.approx(float((M / n_keys).mean()), abs=1e-12)
    # The construction against the uniform reference: it puts zero weight on keys 0..m-1.
    reverse = attention_agreement(construction, uniform_model, tokens, order=M)
    assert reverse.heads[1].kl == math.inf and reverse.to_dict()["heads"][1]["kl"] is None
    assert reverse.heads[1].tv == pytest.approx(layer2.tv, abs=1e-12)


def test_chunking_does_not_change_the_numbers(construction, uniform_model, tokens):
    whole = attention_agreement(uniform_model, construction, tokens, chunk_size=64)
    pieces = attention_agreement(uniform_model, construction, tokens, chunk_size=4)
    assert torch.allclose(whole.tv_matrix, pieces.tv_matrix, atol=1e-14, rtol=0)
    assert whole.kl == pytest.approx(pieces.kl, abs=1e-13)


def test_responsibility_tv(task, construction, uniform_model, tokens):
    assert responsibility_tv(construction, tokens, task.transition, M) < 1e-9
    assert responsibility_tv(construction, tokens[0], task.transition, M) < 1e-9  # a [T] input
    gamma = gamma_by_hand(tokens, task.transition)
    n_keys = torch.arange(M, T, dtype=torch.float64) + 1
    expected = 0.5 * ((1 / n_keys[None, :, None] - gamma).abs().sum(-1) + (n_keys - M) / n_keys)
    assert responsibility_tv(uniform_model, tokens, task.transition, M) == pytest.approx(
        float(expected.mean()), abs=1e-12
    )


def test_offset_mass(task, construction, tokens):
    mass = offset_mass(construction, tokens, M, layer=0)
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), gamma_by_hand(tokens, task.transition).mean(dim=(0, 1))])
    assert mass.shape == (1, M + 1)
    assert torch.allclose(mass[0], expected, atol=1e-12, rtol=0)


def _permute_heads(model, permutations):
    """A copy of a standard model whose head h of layer l is the original's head permutations[l][h]."""
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for block, perm in zip(permuted.blocks, permutations, strict=True):
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                parameter = getattr(block.attn, name)
                parameter.copy_(parameter[perm].clone())
    return permuted


def test_hungarian_matching_recovers_permuted_heads():
    model = standard_transformer(Q, 16, n_layers=2, d_model=24, n_heads=3, attn_only=True, dtype=torch.float64, seed=1)
    with torch.no_grad():
        for block in model.blocks:  # sharpen the random patterns so that heads differ clearly
            block.attn.W_Q.mul_(20.0)
    permutations = [[2, 0, 1], [1, 2, 0]]
    reference = _permute_heads(model, permutations)
    tokens = torch.randint(0, Q, (4, 16), generator=torch.Generator().manual_seed(3))
    # Same function: the permutation changes nothing but the head order.
    assert torch.allclose(model(tokens), reference(tokens), atol=1e-10)
    result = attention_agreement(model, reference, tokens, order=M)
    assert result.matching == "hungarian"
    expected = [((layer, h), (layer, permutations[layer][h])) for layer in range(2) for h in range(3)]
    assert result.pairs == expected
    assert max(result.tv) < 1e-12 and max(result.kl) < 1e-10
    assert min(result.support_mass) == pytest.approx(1.0, abs=1e-6)  # keys below 1e-9 are off-support
    # Unmatched pairs are far apart: the recovered assignment is not a tie.
    off_diagonal = [
        result.tv_matrix[r, u]
        for r in range(6)
        for u in range(6)
        if (r, u) not in [(3 * rl + rh, 3 * ml + mh) for (rl, rh), (ml, mh) in expected]
    ]
    assert min(off_diagonal) > 0.01


def test_hungarian_matching_deeper_model_against_construction(task, construction, tokens):
    deep = DisentangledTransformer(Q, T, n_layers=5, window=M + 1, dtype=torch.float64, seed=3, order=M)
    grow(construction, deep, new_layers="fresh")  # layers 0..2 = the construction's
    result = attention_agreement(deep, construction, tokens)
    assert result.matching == "hungarian"
    assert result.pairs == [((layer, 0), (layer, 0)) for layer in range(3)]
    assert max(result.tv) < 1e-12 and max(result.kl) < 1e-12
    assert result.tv_matrix.shape == (3, 5)
    # More reference heads than model heads: every model head is matched, each to its own layer.
    reverse = attention_agreement(construction, deep, tokens, order=M)
    assert reverse.pairs == [((layer, 0), (layer, 0)) for layer in range(3)]
    assert max(reverse.tv) < 1e-12
    with pytest.raises(ValueError, match="layerwise"):
        attention_agreement(deep, construction, tokens, matching="layerwise")


def brute_force_assignment(cost, allowed=lambda pairs: True):
    """The cheapest of every assignment of min(rows, cols) distinct rows to distinct columns that
    ``allowed`` accepts, as pairs sorted by row."""
    rows, cols = cost.shape
    if rows <= cols:
        candidates = ([(r, c) for r, c in enumerate(p)] for p in itertools.permutations(range(cols), rows))
    else:
        candidates = (sorted((r, c) for c, r in enumerate(p)) for p in itertools.permutations(range(rows), cols))
    return min(
        (pairs for pairs in candidates if allowed(pairs)), key=lambda pairs: sum(cost[r, c].item() for r, c in pairs)
    )


@pytest.mark.parametrize("shape", [(3, 10), (10, 4), (5, 10), (6, 6), (1, 7), (4, 1)])
def test_min_cost_assignment_is_the_brute_force_optimum(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    for _ in range(3):
        cost = torch.rand(shape, generator=generator, dtype=torch.float64)
        assert min_cost_assignment(cost) == brute_force_assignment(cost)  # random costs: one optimum


@pytest.mark.parametrize(
    ("row_layers", "col_layers"),
    [([0, 1, 2], [0, 1, 2, 3, 4]), ([0, 1, 2], [0, 0, 1, 1, 2, 2, 3]), ([0, 1], [3, 0, 2, 1, 0]), ([0], [0, 0, 1])],
)
def test_ordered_assignment_is_the_brute_force_optimum_in_layer_order(row_layers, col_layers):
    def in_layer_order(pairs):
        return all(col_layers[a] < col_layers[b] for (_, a), (_, b) in itertools.pairwise(pairs))

    generator = torch.Generator().manual_seed(len(col_layers))
    for _ in range(5):
        cost = torch.rand(len(row_layers), len(col_layers), generator=generator, dtype=torch.float64)
        expected = brute_force_assignment(cost, in_layer_order)
        assert ordered_assignment(cost, row_layers, col_layers) == expected
    # The layer order binds: the unconstrained optimum of this cost matches row 0 above row 1.
    cost = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert min_cost_assignment(cost) == [(0, 1), (1, 0)]
    assert ordered_assignment(cost, [0, 1], [0, 1]) == [(0, 0), (1, 1)]


def test_ordered_assignment_value_errors():
    with pytest.raises(ValueError, match="at least as many model layers"):
        ordered_assignment(torch.zeros(3, 4, dtype=torch.float64), [0, 1, 2], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="one reference head per layer"):
        ordered_assignment(torch.zeros(2, 3, dtype=torch.float64), [0, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="one reference head per layer"):
        ordered_assignment(torch.zeros(2, 3, dtype=torch.float64), [1, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="one entry per row and column"):
        ordered_assignment(torch.zeros(2, 3, dtype=torch.float64), [0, 1], [0, 1])


def test_value_errors(task, construction, uniform_model, tokens):
    with pytest.raises(ValueError, match="tokens must lie"):
        attention_agreement(construction, construction, torch.full((2, T), Q))
    with pytest.raises(ValueError, match="n_ctx"):
        attention_agreement(construction, construction, torch.zeros(2, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="more tokens than the order"):
        attention_agreement(construction, construction, tokens[:, :M])
    other_vocab = build_md_transformer(torch.full((4, 4), 0.25, dtype=torch.float64), M, T, eta=0.3)
    with pytest.raises(ValueError, match="d_vocab"):
        attention_agreement(other_vocab, construction, tokens % 4)
    with pytest.raises(ValueError, match="order is required"):
        attention_agreement(construction, uniform_model, tokens)
    with pytest.raises(ValueError, match="matching"):
        attention_agreement(construction, construction, tokens, matching="greedy")
    with pytest.raises(ValueError, match="tokens must lie"):
        responsibility_tv(construction, torch.full((2, T), -1), task.transition, M)
    with pytest.raises(ValueError, match="n_ctx"):
        responsibility_tv(construction, torch.zeros(1, T + 1, dtype=torch.long), task.transition, M)
    with pytest.raises(ValueError, match="more tokens than the order"):
        responsibility_tv(construction, tokens[:, :M], task.transition, M)
    with pytest.raises(ValueError, match="d_vocab"):
        responsibility_tv(construction, tokens % 4, torch.full((4, 4), 0.25, dtype=torch.float64), M)
    with pytest.raises(ValueError, match="layer"):
        responsibility_tv(construction, tokens, task.transition, M, layer=3)


def test_to_dict_writes_non_finite_numbers_as_none_and_str_names_paper_layers():
    inf, nan = float("inf"), float("nan")
    heads = [
        HeadAgreement(0, 0, 1, 1, tv=0.25, kl=inf, support_mass=0.5, self_mass=0.125, lag_mass=0.75),
        HeadAgreement(1, 0, 0, 0, tv=nan, kl=0.5, support_mass=1.0, self_mass=0.0, lag_mass=1.0),
    ]
    tv_matrix = torch.tensor([[0.5, nan], [0.25, inf]], dtype=torch.float64)
    result = AttentionAgreement("hungarian", 3, 7, 12, heads, [(0, 0), (1, 0)], [(0, 0), (1, 1)], tv_matrix)
    expected = {
        "matching": "hungarian",
        "order": 3,
        "n_sequences": 7,
        "seq_len": 12,
        "query_positions": "t > m (0-based t >= 3)",
        "heads": [
            {
                "reference_layer": 0,
                "reference_head": 0,
                "model_layer": 1,
                "model_head": 1,
                "tv": 0.25,
                "kl": None,
                "support_mass": 0.5,
                "self_mass": 0.125,
                "lag_mass": 0.75,
            },
            {
                "reference_layer": 1,
                "reference_head": 0,
                "model_layer": 0,
                "model_head": 0,
                "tv": None,
                "kl": 0.5,
                "support_mass": 1.0,
                "self_mass": 0.0,
                "lag_mass": 1.0,
            },
        ],
        "reference_units": [[0, 0], [1, 0]],
        "model_units": [[0, 0], [1, 1]],
        "tv_matrix": [[0.5, None], [0.25, None]],
    }
    as_dict = result.to_dict()
    assert list(as_dict) == list(expected)  # same keys, same order
    for key, value in expected.items():
        assert as_dict[key] == value, key
    assert json.loads(json.dumps(as_dict, allow_nan=False)) == expected
    rows = str(result).splitlines()
    assert rows[3].startswith("L1.H0       L2.H1   ") and rows[4].startswith("L2.H0       L1.H0   ")


def test_attention_patterns_stack_heads_layer_major(task):
    model = standard_transformer(vocab_size=Q, n_layers=2, n_heads=2, d_model=8, n_ctx=T, seed=3)
    row = task.sample(2, 9, generator=torch.Generator().manual_seed(5)).tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(row)
    stacked = attention_patterns(model, row, [1, 0])
    assert stacked.shape == (2, 4, 9, 9) and stacked.dtype == torch.float64
    for unit, (layer, head) in enumerate([(1, 0), (1, 1), (0, 0), (0, 1)]):
        assert torch.equal(stacked[:, unit], cache[f"blocks.{layer}.attn.hook_pattern"][:, head].double())


def test_head_indices_accept_any_integral_number_and_name_the_range():
    import numpy as np

    from mdlens.validation import check_index

    assert check_index(np.int64(2), "head", 3) == 2 and check_index(torch.tensor(0), "layer", 1) == 0
    for bad in (3, -1, 1.0, True, "0"):
        with pytest.raises(ValueError, match=r"head must be an int in \[0, 3\), got"):
            check_index(bad, "head", 3)
