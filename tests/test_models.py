"""Tests of mdlens.models: the standard and the disentangled transformers."""

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from mdlens.models import StandardTransformer, standard_transformer

# ----------------------------------------------------------------------------------------------
# standard_transformer


def test_standard_is_a_hooked_transformer_with_requested_shape():
    model = standard_transformer(vocab_size=5, n_ctx=32, n_layers=2, d_model=16, n_heads=2)
    assert isinstance(model, HookedTransformer) and type(model) is StandardTransformer
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
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.W_Q, c.W_Q)


def test_standard_one_layer_attention_only_matches_hand_computation():
    # Independent forward pass written from the weights: embed + pos, causal softmax(q k / sqrt(d)),
    # z = pattern v, out = z W_O, unembed.
    model = standard_transformer(
        5,
        16,
        n_layers=1,
        d_model=8,
        n_heads=2,
        attn_only=True,
        normalization=None,
        dtype=torch.float64,
        seed=3,
    )
    with torch.no_grad():  # TL initialises biases at zero; make them matter
        for p in (
            model.blocks[0].attn.b_Q,
            model.blocks[0].attn.b_K,
            model.blocks[0].attn.b_V,
            model.blocks[0].attn.b_O,
            model.b_U,
        ):
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
        scores = q @ k.transpose(1, 2) / (attn.cfg.d_head**0.5)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out = out + torch.softmax(scores, dim=-1) @ v @ attn.W_O[h]
    expected = (x + out + attn.b_O) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("positions", ["standard", "rotary"])
@pytest.mark.parametrize("normalization", ["LN", None])
def test_standard_variants_run_and_train_one_step(positions, normalization):
    model = standard_transformer(
        4, 16, n_layers=2, d_model=16, n_heads=2, positions=positions, normalization=normalization, output="probs"
    )
    assert model.output_type == "probs"
    assert model.cfg.positional_embedding_type == positions
    tokens = torch.randint(0, 4, (4, 12), generator=torch.Generator().manual_seed(0))
    loss = model(tokens)[:, -1].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # One small gradient step lowers the loss (first order: by about lr * |grad|^2).
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 1e-3 * parameter.grad
    assert model(tokens)[:, -1].pow(2).mean() < loss


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


# ----------------------------------------------------------------------------------------------
# The disentangled transformer


def _randomise(model, seed=0):
    """Give every trainable parameter (positional terms included) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            read = attn.read_width
            attn.W_Q[0, :read, :read] = torch.randn(read, read, generator=generator, dtype=torch.float64)
            attn.rel_score.copy_(torch.randn(attn.rel_score.shape, generator=generator, dtype=torch.float64))
            attn.key_pos_score.copy_(torch.randn(attn.key_pos_score.shape, generator=generator, dtype=torch.float64))
            attn.rel_query[:read] = torch.randn(read, attn.window, generator=generator, dtype=torch.float64)
            attn.rel_value.copy_(torch.randn(attn.rel_value.shape, generator=generator, dtype=torch.float64))
        model.W_U.copy_(torch.randn(model.W_U.shape, generator=generator, dtype=torch.float64))


def _reference_forward(model, tokens):
    """The disentangled transformer written from paper-notes §4, one position pair at a time:
    h_i <- [h_i ; sum_j A_ij h_j ; sum_j A_ij r(i-j)], A = causal softmax of
    h_i W_A h_j + rel_score[i-j] + key_pos_score[j] + h_i . U[:, i-j] (the last inside the window)."""
    q = model.cfg.d_vocab
    T = tokens.shape[0]
    h = torch.nn.functional.one_hot(tokens, q).double()  # [T, D_0]
    for block in model.blocks:
        attn = block.attn
        W_A, W = attn.W_A, attn.window
        U = attn.rel_query[: h.shape[1]]
        scores = torch.full((T, T), float("-inf"), dtype=torch.float64)
        for i in range(T):
            for j in range(i + 1):
                s = h[i] @ W_A @ h[j] + attn.rel_score[i - j] + attn.key_pos_score[j]
                if i - j < W:
                    s = s + h[i] @ U[:, i - j]
                scores[i, j] = s
        A = torch.softmax(scores, dim=-1)
        rel = torch.zeros(T, W, dtype=torch.float64)
        for i in range(T):
            for j in range(max(0, i - W + 1), i + 1):
                rel[i] += A[i, j] * attn.rel_value[i - j]
        h = torch.cat([h, A @ h, rel], dim=1)
    return h, h @ model.W_U


def test_disentangled_layout_widths_follow_the_doubling_rule():
    from mdlens.models import ResidualLayout, disentangled_transformer

    for n_layers in (1, 2, 3, 4):
        model = disentangled_transformer(vocab_size=4, order=2, n_ctx=8, n_layers=n_layers)
        width = 4
        for layer in range(1, n_layers + 1):
            assert model.layout[f"L{layer}"] == slice(width, 2 * width + 3)
            assert model.layout[f"L{layer}.rel"] == slice(2 * width, 2 * width + 3)
            width = 2 * width + 3
        assert model.cfg.d_model == width == model.layout.d_model
        assert model.cfg.d_head == width + 3
        leaves = model.layout.leaves()
        assert [b.start for b in leaves[1:]] == [b.stop for b in leaves[:-1]]
        assert len(leaves) == 2 ** (n_layers + 1) - 1  # tokens, then each layer doubles and adds rel
    layout = ResidualLayout.disentangled(3, 2, 4)
    assert layout["L2.L1.rel"] == slice(16, 20) and layout["L2.tokens"] == slice(10, 13)
    assert "L2.L1.tokens" in str(layout) and "meaning" in str(layout)
    assert ResidualLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(KeyError, match="L9"):
        layout["L9"]


@pytest.mark.parametrize("n_layers", [1, 3])
def test_disentangled_forward_matches_the_concatenation_written_by_hand(n_layers):
    from mdlens.models import disentangled_transformer

    model = disentangled_transformer(4, order=2, n_ctx=12, n_layers=n_layers, dtype=torch.float64, window=4)
    _randomise(model, seed=n_layers)
    tokens = torch.randint(0, 4, (2, 9), generator=torch.Generator().manual_seed(1))
    out, cache = model.run_with_cache(tokens)
    for b in range(2):
        h, expected = _reference_forward(model, tokens[b])
        torch.testing.assert_close(out[b], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache[f"blocks.{n_layers - 1}.hook_resid_post"][b], h, rtol=1e-10, atol=1e-10)


def test_disentangled_qk_is_the_score_matrix_and_ov_copies_into_the_layer_block():
    from mdlens.models import disentangled_transformer

    model = disentangled_transformer(3, order=2, n_ctx=8, n_layers=2, dtype=torch.float64)
    for layer in (1, 2):
        read = model.residual_widths[layer - 1]
        QK = model.QK[layer - 1, 0].AB
        assert torch.equal(QK[:read, :read], model.score_matrix(layer))
        assert torch.count_nonzero(QK[read:]) == 0 and torch.count_nonzero(QK[:, read:]) == 0
        OV = model.OV[layer - 1, 0].AB  # [d_model in, d_model out]: coordinate c -> L{l} copy of c
        expected = torch.zeros_like(OV)
        copy = model.layout[f"L{layer}"]
        expected[torch.arange(read), torch.arange(copy.start, copy.start + read)] = 1
        assert torch.equal(OV, expected)


def test_disentangled_frozen_parts_stay_exactly_zero_or_identity_under_adam():
    from mdlens.models import disentangled_transformer
    from mdlens.task import MTDTask

    task = MTDTask(vocab_size=3, order=2, seed=0)
    model = disentangled_transformer(3, order=2, n_ctx=12, n_layers=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert {"embed.W_E", "pos_embed.W_pos", "unembed.b_U", "blocks.0.attn.W_K", "blocks.2.attn.W_O"} <= set(frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=0.05)
    sample = task.sample(16, 12, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = (model(sample.tokens)[:, -1] - sample.next_probs.float()).pow(2).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for block in model.blocks:
        read = block.attn.read_width
        W_Q = block.attn.W_Q[0]
        assert torch.count_nonzero(W_Q[read:]) == 0 and torch.count_nonzero(W_Q[:, read:]) == 0
        assert torch.count_nonzero(block.attn.rel_query[read:]) == 0
    assert torch.equal(model.W_E[:, :3], torch.eye(3))


def test_disentangled_trains_a_few_adam_steps_reduce_mse():
    from mdlens.models import disentangled_transformer
    from mdlens.task import MTDTask

    task = MTDTask(vocab_size=4, order=2, seed=1)
    model = disentangled_transformer(4, order=2, n_ctx=16, n_layers=3, seed=0)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sample = task.sample(64, 16, generator=torch.Generator().manual_seed(0))

    def mse():
        return (model(sample.tokens)[:, -1] - sample.next_probs.float()).pow(2).sum(-1).mean()

    start = mse().item()
    for _ in range(15):
        loss = mse()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert mse().item() < 0.5 * start


def test_disentangled_seed_determinism_and_dtypes():
    from mdlens.models import DisentangledTransformer, disentangled_transformer

    a = disentangled_transformer(3, order=2, n_ctx=8, seed=5)
    b = disentangled_transformer(3, order=2, n_ctx=8, seed=5)
    c = disentangled_transformer(3, order=2, n_ctx=8, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.W_U, c.W_U)
    assert isinstance(a, HookedTransformer) and isinstance(a, DisentangledTransformer)
    assert a.output_type == "probs" and a.W_U.dtype == torch.float32
    d = disentangled_transformer(3, order=2, n_ctx=8, dtype=torch.float64)
    assert d(torch.tensor([0, 1, 2, 0])).dtype == torch.float64


def test_disentangled_eight_layers_run():
    from mdlens.models import DisentangledTransformer

    model = DisentangledTransformer(vocab_size=2, n_ctx=6, n_layers=8, window=1)
    assert model.cfg.d_model == 2**8 * 3 - 1  # D_l + W doubles: D_8 = 2^8 (q + W) - W
    assert model(torch.tensor([[0, 1, 1, 0, 1]])).shape == (1, 5, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=3, n_ctx=8, n_layers=9), "n_layers"),
        (dict(vocab_size=3, n_ctx=8, n_layers=0), "n_layers"),
        (dict(vocab_size=3, n_ctx=8, window=0), "window"),
        (dict(vocab_size=3, n_ctx=8, dtype=torch.int64), "dtype"),
        (dict(vocab_size=3, n_ctx=8, output="logit"), "output_type"),
    ],
)
def test_disentangled_rejects_bad_arguments(kwargs, message):
    from mdlens.models import DisentangledTransformer

    with pytest.raises(ValueError, match=message):
        DisentangledTransformer(**kwargs)
