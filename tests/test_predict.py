"""mdlens.predict_next: rows on the simplex, computed by hand for both kinds of model output."""

import math

import pytest
import torch

import mdlens
from mdlens.models import disentangled_transformer, standard_transformer

TOKENS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 1], [4, 4, 3, 2, 1, 0, 0, 2], [1, 3, 1, 3, 1, 3, 1, 3]])


def raw_last_output(model, tokens) -> list[list[float]]:
    with torch.no_grad():
        return model(tokens)[:, -1, :].double().tolist()


def test_logits_model_gives_the_softmax_of_its_last_output():
    model = standard_transformer(5, 8, n_layers=1, d_model=16, seed=0)
    probs = mdlens.predict_next(model, TOKENS)
    assert probs.shape == (3, 5) and probs.dtype == torch.float64
    for row, logits in zip(probs.tolist(), raw_last_output(model, TOKENS), strict=True):
        exps = [math.exp(x) for x in logits]
        assert row == pytest.approx([e / sum(exps) for e in exps], abs=1e-6)


def test_probs_model_is_clipped_at_zero_and_renormalised():
    model = disentangled_transformer(5, 3, 8, n_layers=1, seed=0)
    with torch.no_grad():  # a readout with mixed signs, so that some outputs are negative
        model.unembed.W_U.copy_(torch.randn(model.unembed.W_U.shape, generator=torch.Generator().manual_seed(1)))
    raw = raw_last_output(model, TOKENS)
    assert any(x < 0 for row in raw for x in row) and all(any(x > 0 for x in row) for row in raw)
    probs = mdlens.predict_next(model, TOKENS)
    for row, out in zip(probs.tolist(), raw, strict=True):
        clipped = [max(x, 0.0) for x in out]
        assert row == pytest.approx([c / sum(clipped) for c in clipped], abs=1e-6)
    assert (probs >= 0).all() and torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))


def test_a_single_sequence_gets_a_batch_dimension():
    model = standard_transformer(5, 8, n_layers=1, d_model=16, seed=0)
    single = mdlens.predict_next(model, TOKENS[1])
    assert single.shape == (1, 5)
    torch.testing.assert_close(single[0], mdlens.predict_next(model, TOKENS)[1])


def test_bad_input_raises():
    model = disentangled_transformer(5, 3, 8, n_layers=1, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mdlens.predict_next(model, torch.tensor([[0, 1, 5]]))
    with pytest.raises(ValueError, match="context"):
        mdlens.predict_next(model, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        mdlens.predict_next(model, torch.zeros(1, 4))
    # A 'probs' output with no positive entry has no honest renormalisation.
    with torch.no_grad():
        model.unembed.W_U.copy_(-model.unembed.W_U.abs() - 1.0)  # the residual is >= 0, so outputs < 0
    with pytest.raises(ValueError, match="no positive entry"):
        mdlens.predict_next(model, TOKENS)
    with torch.no_grad():
        model.unembed.W_U.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        mdlens.predict_next(model, TOKENS)
    model.output_type = "scores"
    with pytest.raises(ValueError, match="output_type"):
        mdlens.predict_next(model, TOKENS)


def test_batched_readers_agree_with_one_sequence_at_a_time():
    """``model_next_probs`` is ``predict_next`` and ``model_outputs`` the raw last output, whatever the
    chunk: checked one sequence at a time against the by-hand readings above."""
    from mdlens.predict import model_next_probs, model_outputs

    model = disentangled_transformer(5, 3, 8, n_layers=1, seed=0)
    with torch.no_grad():  # mixed signs: the raw output and the probabilities then differ
        model.unembed.W_U.copy_(torch.randn(model.unembed.W_U.shape, generator=torch.Generator().manual_seed(1)))
    for chunk_size in (1, 2, 5):
        raw = model_outputs(model, TOKENS, chunk_size=chunk_size)
        expected = torch.tensor(raw_last_output(model, TOKENS), dtype=torch.float64)
        torch.testing.assert_close(raw.double(), expected, rtol=0, atol=1e-6)  # float32, any batch split
        probs = model_next_probs(model, TOKENS, chunk_size=chunk_size)
        for row, out in zip(probs.tolist(), raw_last_output(model, TOKENS), strict=True):
            clipped = [max(x, 0.0) for x in out]
            assert row == pytest.approx([c / sum(clipped) for c in clipped], abs=1e-6)
    assert not torch.allclose(raw.double(), probs)
    with pytest.raises(ValueError, match="chunk_size"):
        model_next_probs(model, TOKENS, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        model_outputs(model, TOKENS, chunk_size=0)
