"""Lag heads: lag_head_scores and lag_detection_pattern through TransformerLens's detect_head.

Values are checked against the estimators (the construction's layer 1 attends by the
responsibilities) and against sums over cached attention patterns written out by hand.
"""

import pytest
import torch
from transformer_lens.head_detector import detect_head, get_previous_token_head_detection_pattern

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.construction import build_md_transformer
from mdlens.hooks.heads import lag_detection_pattern, lag_head_scores
from mdlens.models import standard_transformer
from mdlens.models.tokenizer import attach_tokenizer

Q, M, T, ETA = 4, 3, 12, 0.3


@pytest.fixture(scope="module")
def task():
    return MTDTask(vocab_size=Q, order=M, seed=5)


@pytest.fixture(scope="module")
def construction(task):
    return attach_tokenizer(build_md_transformer(task.transition, M, T, ETA))


@pytest.fixture(scope="module")
def tokens(task):
    return task.sample(6, T, generator=torch.Generator().manual_seed(2)).tokens


def by_hand(model, tokens, offsets):
    """mean over batch and rows t >= m of pattern[t, t - o], one loop per entry."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(n_layers, n_heads, len(offsets), dtype=torch.float64)
    for layer in range(n_layers):
        pattern = cache["pattern", layer].to(torch.float64)
        for head in range(n_heads):
            for k, o in enumerate(offsets):
                values = [pattern[b, head, t, t - o] for b in range(tokens.shape[0]) for t in range(M, tokens.shape[1])]
                out[layer, head, k] = torch.stack(values).mean()
    return out


def test_the_construction_layer_1_scores_are_the_mean_responsibilities(construction, task, tokens):
    scores = lag_head_scores(construction, tokens, M)
    assert scores.shape == (3, 1, M)
    gamma = E.responsibilities(tokens, task.transition, M)  # [B, T - m, m], k = m+1..T, g = 1..m
    torch.testing.assert_close(scores[0, 0], gamma.mean(dim=(0, 1)), rtol=0, atol=1e-12)
    # The readout layer attends only to offsets 0..m-1 (the tokens y_{t+1-g}).
    readout = lag_head_scores(construction, tokens, M, first_offset=0)
    assert abs(readout[2, 0].sum().item() - 1.0) < 1e-12


@pytest.mark.parametrize("first_offset", [0, 1])
def test_scores_match_the_cached_patterns_on_a_multi_head_model(tokens, first_offset):
    model = standard_transformer(Q, T, n_layers=2, d_model=16, n_heads=2, dtype=torch.float64, seed=3)
    scores = lag_head_scores(model, tokens, M, first_offset=first_offset, chunk_size=4)  # two chunks
    expected = by_hand(model, tokens, list(range(first_offset, first_offset + M)))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)


def test_lag_detection_pattern_entries():
    pattern = lag_detection_pattern(6, range(1, 3), first_query=2)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(2, 6):
        for o in (1, 2):
            expected[i, i - o] = 1
    assert torch.equal(pattern, expected)
    # offsets=1 is TransformerLens's previous-token pattern.
    previous = get_previous_token_head_detection_pattern(torch.zeros(1, 7, dtype=torch.long))
    assert torch.equal(lag_detection_pattern(7, 1), previous.to(torch.float64))


def test_detect_head_with_the_lag_pattern_on_the_construction(construction, task):
    # detect_head tokenizes the string with the model's tokenizer and needs T < n_ctx.
    seq_tokens = task.sample(1, T - 1, generator=torch.Generator().manual_seed(7)).tokens
    seq = " ".join(str(v) for v in seq_tokens[0].tolist())
    length = seq_tokens.shape[1]
    assert torch.equal(construction.to_tokens(seq), seq_tokens)

    # The whole window, every row: the mass by hand from the cached pattern.
    window = detect_head(construction, seq, lag_detection_pattern(length, range(1, M + 1)))
    with torch.no_grad():
        _, cache = construction.run_with_cache(seq_tokens)
    pattern = cache["pattern", 0][0, 0]
    mass = sum(pattern[i, i - o].item() for i in range(length) for o in range(1, M + 1) if i - o >= 0)
    assert abs(window[0, 0].item() - mass / length) < 1e-12

    # One lag g at rows t > m: the responsibilities gamma_t(g), summed, over TL's T rows.
    gamma = E.responsibilities(seq_tokens, task.transition, M)[0]  # [T - m, m]
    for g in range(1, M + 1):
        score = detect_head(construction, seq, lag_detection_pattern(length, g, first_query=M))
        assert abs(score[0, 0].item() - gamma[:, g - 1].sum().item() / length) < 1e-12

    # And the relation to lag_head_scores stated in the module docstring, for every layer.
    scores = lag_head_scores(construction, seq_tokens, M)
    from_tl = detect_head(construction, seq, lag_detection_pattern(length, range(1, M + 1), first_query=M))
    torch.testing.assert_close(from_tl, scores.sum(-1) * (length - M) / length, rtol=0, atol=1e-12)


def test_bad_input_raises(construction, tokens):
    with pytest.raises(ValueError, match="first_offset must be one of"):
        lag_head_scores(construction, tokens, M, first_offset=2)
    with pytest.raises(ValueError, match="need more tokens than the order"):
        lag_head_scores(construction, tokens[:, :M], M)
    with pytest.raises(ValueError, match=r"order \(the number of lags m\) must be an int >= 1"):
        lag_head_scores(construction, tokens, 0)
    with pytest.raises(ValueError, match="offsets is empty"):
        lag_detection_pattern(5, [])
    with pytest.raises(ValueError, match="offsets must be distinct"):
        lag_detection_pattern(5, [1, 1])
    with pytest.raises(ValueError, match="every offset must be an int >= 0"):
        lag_detection_pattern(5, [-1])
