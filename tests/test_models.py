"""Tests of mdlens.models: the standard and the disentangled transformers."""

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from mdlens.models import standard_transformer


# ----------------------------------------------------------------------------------------------
# standard_transformer


def test_standard_is_plain_hooked_transformer_with_requested_shape():
    model = standard_transformer(vocab_size=5, n_ctx=32, n_layers=2, d_model=16, n_heads=2)
    assert type(model) is HookedTransformer
    assert model.output_type == "logits"
    assert (model.cfg.d_head, model.cfg.d_mlp, model.cfg.n_layers) == (8, 64, 2)
    out = model(torch.randint(0, 5, (3, 11)))
    assert out.shape == (3, 11, 5)


def test_standard_seed_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    a = standard_transformer(4, 16, seed=7, positions="rotary")
    # construction did not reseed the caller's generators (TransformerLens would)
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_numpy)
    b = standard_transformer(4, 16, seed=7, positions="rotary")
    c = standard_transformer(4, 16, seed=8, positions="rotary")
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.W_Q, c.W_Q)


def test_standard_one_layer_attention_only_matches_hand_computation():
    # Independent forward pass written from the weights: embed + pos, causal softmax(q k / sqrt(d)),
    # z = pattern v, out = z W_O, unembed.
    model = standard_transformer(
        5, 16, n_layers=1, d_model=8, n_heads=2, attn_only=True, normalization=None,
        dtype=torch.float64, seed=3,
    )
    with torch.no_grad():  # TL initialises biases at zero; make them matter
        for p in (model.blocks[0].attn.b_Q, model.blocks[0].attn.b_K, model.blocks[0].attn.b_V,
                  model.blocks[0].attn.b_O, model.b_U):
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    tokens = torch.randint(0, 5, (2, 9), generator=torch.Generator().manual_seed(0))
    attn = model.blocks[0].attn
    x = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]
    T = tokens.shape[1]
    out = torch.zeros_like(x)
    for h in range(2):
        q = x @ attn.W_Q[h] + attn.b_Q[h]
        k = x @ attn.W_K[h] + attn.b_K[h]
        v = x @ attn.W_V[h] + attn.b_V[h]
        scores = q @ k.transpose(1, 2) / (attn.cfg.d_head ** 0.5)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out = out + torch.softmax(scores, dim=-1) @ v @ attn.W_O[h]
    expected = (x + out + attn.b_O) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("positions", ["standard", "rotary"])
@pytest.mark.parametrize("normalization", ["LN", None])
def test_standard_variants_run_and_train_one_step(positions, normalization):
    model = standard_transformer(4, 16, n_layers=2, d_model=16, n_heads=2,
                                 positions=positions, normalization=normalization, output="probs")
    assert model.output_type == "probs"
    assert model.cfg.positional_embedding_type == positions
    tokens = torch.randint(0, 4, (4, 12))
    loss = model(tokens)[:, -1].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=1, n_ctx=8), "vocab_size"),
        (dict(vocab_size=4, n_ctx=8, d_model=10, n_heads=3), "divide"),
        (dict(vocab_size=4, n_ctx=8, normalization="RMS"), "normalization"),
        (dict(vocab_size=4, n_ctx=8, positions="alibi"), "positions"),
        (dict(vocab_size=4, n_ctx=8, output="softmax"), "output_type"),
        (dict(vocab_size=4, n_ctx=8, dtype=torch.float16), "dtype"),
        (dict(vocab_size=4, n_ctx=8, d_model=6, n_heads=2, positions="rotary"), "even"),
    ],
)
def test_standard_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        standard_transformer(**kwargs)
