"""mdlens models in a TransformerLens user's hands: TL's own paths read each model's real distribution.

Checked against independent computations on the construction (float64), the shipped
``disentangled-3l`` ("probs" output) and ``standard-3l`` ("logits"):

- the TL loss (``return_type="loss"``, ``loss_per_token``, ``attention_mask``) is the cross-entropy
  of ``predict_next``'s distribution, written out by hand, on the positions it scores (``t > m`` for
  a "probs" model of order ``m``; every position for a "logits" one);
- ``generate`` draws tokens with the frequencies of that distribution (chi-square), also for a
  prompt ending in the pad id 0 of a model with a tokenizer;
- gradients reach ``hook_embed`` (equal to finite differences) while ``W_E`` is never trained;
- hooks may edit ``hook_rel_scores`` / ``hook_key_pos_scores`` (and every other hook) in place;
- bad token input is a ``ValueError`` that names the problem;
- ``DisentangledTransformer(**model.mdlens_args)``, ``act_name`` and ``cache["rel_scores", l]``.

Tests of further TransformerLens integration (tokenizer, composition) go below, each in its own
section.
"""

import json

import pytest
import torch
from helpers import M, Q, T
from transformer_lens import patching
from transformer_lens.utilities import get_act_name, lm_cross_entropy_loss

import mdlens
from mdlens.models import (
    DisentangledActivationCache,
    DisentangledTransformer,
    act_name,
    disentangled_transformer,
    standard_transformer,
)
from mdlens.predict import output_to_probs, predict_next
from mdlens.training import TrainConfig, train

MODELS = ("construction", "disentangled-3l", "standard-3l")
RPE_HOOKS = ("rel_scores", "key_pos_scores", "rel_query_scores", "rel_values")


@pytest.fixture(scope="module")
def pretrained():
    return {name: mdlens.load_pretrained(name) for name in ("disentangled-3l", "standard-3l")}


@pytest.fixture(scope="module")
def models(construction, task, pretrained):
    """name -> (model, task, sequence length used in the tests)."""
    found = {"construction": (construction, task, T)}
    for name, (model, model_task) in pretrained.items():
        found[name] = (model, model_task, 16)
    return found


def sample_tokens(task, batch, length, seed):
    return task.sample(batch, length, generator=torch.Generator().manual_seed(seed)).tokens


def first_scored(model) -> int:
    """The first 0-based position the TL loss scores: ``m`` for a "probs" model of order ``m``."""
    return model.order if model.output_type == "probs" else 0


def cross_entropy_by_hand(model, tokens) -> torch.Tensor:
    """``[B, T-1]``: ``-log p_t(y_{t+1})`` with ``p_t = predict_next(model, tokens[:, :t+1])`` at the
    scored positions ``t >= first_scored(model)``, 0 before."""
    columns = []
    for t in range(tokens.shape[1] - 1):
        if t < first_scored(model):
            columns.append(torch.zeros(tokens.shape[0], dtype=torch.float64))
            continue
        p = predict_next(model, tokens[:, : t + 1])
        columns.append(-p[torch.arange(tokens.shape[0]), tokens[:, t + 1]].log())
    return torch.stack(columns, dim=1)


def scored_mean(model, per_token: torch.Tensor) -> float:
    return per_token[:, first_scored(model) :].mean().item()


def tolerance(model) -> float:
    return 1e-12 if model.cfg.dtype == torch.float64 else 2e-5


# ----------------------------------------------------------------------------------------------
# The loss is the cross-entropy of the model's real distribution


@pytest.mark.parametrize("name", MODELS)
def test_tl_loss_is_the_cross_entropy_of_predict_next(name, models):
    model, task, length = models[name]
    tokens = sample_tokens(task, 3, length, seed=1)
    by_hand = cross_entropy_by_hand(model, tokens)  # [B, T-1], float64
    mean_by_hand = scored_mean(model, by_hand)
    with torch.no_grad():
        loss = model(tokens, return_type="loss")
        per_token = model(tokens, return_type="loss", loss_per_token=True)
        output, both_loss = model(tokens, return_type="both")
    assert loss.dtype == model.cfg.dtype and per_token.shape == (3, length - 1)
    assert abs(loss.item() - mean_by_hand) < tolerance(model) * max(1.0, mean_by_hand)
    assert (per_token.double() - by_hand).abs().max().item() < tolerance(model) * 10
    assert both_loss.item() == loss.item()
    assert torch.equal(output, model(tokens))  # "both" returns the raw output unchanged
    if model.output_type == "probs":
        # What TransformerLens computes by itself (log_softmax of the probabilities, on the same
        # positions) is another number.
        scored = torch.ones_like(tokens)
        scored[:, : first_scored(model)] = 0
        naive = lm_cross_entropy_loss(output, tokens, scored, per_token=True)
        assert (naive - per_token).abs().max().item() > 0.05


def test_run_with_cache_on_the_loss_returns_it_and_every_gradient(construction, task):
    tokens = sample_tokens(task, 2, T, seed=2)
    loss, cache = construction.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    construction.zero_grad(set_to_none=True)
    assert abs(loss.item() - scored_mean(construction, cross_entropy_by_hand(construction, tokens))) < 1e-12
    for name in (
        "hook_embed_grad",
        "hook_pos_embed_grad",
        "blocks.0.hook_resid_pre_grad",
        "blocks.0.attn.hook_rel_scores_grad",
        "blocks.2.attn.hook_rel_values_grad",
    ):
        assert name in cache, name


def test_loss_mask_and_per_token_follow_transformer_lens(construction, task):
    tokens = sample_tokens(task, 3, T, seed=3)
    with torch.no_grad():
        output = construction(tokens)
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    log_probs = output_to_probs(output, "probs").log()  # exact logits of the same distribution
    # TL counts a position when it and the next are unmasked; mdlens also needs the position to be
    # past the first m real tokens (counted from each row's first unmasked one).
    real_position = mask.cumsum(dim=1) - 1
    tl_mask = mask * (real_position >= M)
    for per_token in (False, True):
        ours = construction.loss_fn(output, tokens, mask, per_token=per_token)
        theirs = lm_cross_entropy_loss(log_probs, tokens, tl_mask, per_token=per_token)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # A row that does not count is never renormalised: it may have no positive entry.
    broken = output.clone()
    broken[0, 8] = -1.0
    construction.loss_fn(broken, tokens, mask)
    with pytest.raises(ValueError, match="no positive entry"):
        construction.loss_fn(broken, tokens)


def test_loss_gradient_is_finite_with_clipped_outputs_and_matches_finite_differences(task):
    model = disentangled_transformer(Q, order=M, n_ctx=T, n_layers=2, dtype="float64", seed=3)
    with torch.no_grad():  # the residual is >= 0; a readout of mixed sign clips some outputs
        model.W_U.copy_(
            torch.randn(model.W_U.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.6
        )
    tokens = sample_tokens(task, 2, T, seed=4)
    with torch.no_grad():
        output = model(tokens)
    assert (output < 0).any() and (output.clamp(min=0).sum(-1) > 0).all()

    loss = model(tokens, return_type="loss")
    (grad,) = torch.autograd.grad(loss, model.W_U)
    assert torch.isfinite(grad).all()
    eps = 1e-6
    for index in [(0, 0), (2, 1), (5, 3), (model.cfg.d_model - 1, 2)]:
        with torch.no_grad():
            model.W_U[index] += eps
            up = model(tokens, return_type="loss").item()
            model.W_U[index] -= 2 * eps
            down = model(tokens, return_type="loss").item()
            model.W_U[index] += eps
        assert abs((up - down) / (2 * eps) - grad[index].item()) < 1e-6


# ----------------------------------------------------------------------------------------------
# generate samples from the model's distribution


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against ``probs`` (tokens with p = 0 must not occur)."""
    expected = probs * counts.sum()
    assert (counts[probs == 0] == 0).all()
    return float(((counts - expected)[probs > 0] ** 2 / expected[probs > 0]).sum())


@pytest.mark.parametrize("name", MODELS)
def test_generate_draws_tokens_with_the_model_probabilities(name, models):
    model, task, length = models[name]
    q = model.cfg.d_vocab
    prompts = sample_tokens(task, 2, length - 1, seed=5)
    prompts[1, -1] = 0  # the pad id of the vocabulary tokenizer: must not be masked
    n = 3000
    tokenizer = model.tokenizer
    torch.manual_seed(0)
    drawn = model.generate(prompts.repeat_interleave(n, dim=0), max_new_tokens=1, verbose=False)
    assert model.tokenizer is tokenizer  # set aside while generating from ids, then back
    assert drawn.shape == (2 * n, length) and torch.equal(drawn[:, :-1], prompts.repeat_interleave(n, dim=0))
    probs = predict_next(model, prompts)
    for row in range(2):
        counts = torch.bincount(drawn[row * n : (row + 1) * n, -1], minlength=q).double()
        # chi-square with q - 1 <= 4 degrees of freedom: P(> 25) < 1e-4 (the seed is fixed)
        assert chi_square(counts, probs[row]) < 25, (row, counts / n, probs[row])
        if model.output_type == "probs":  # the test tells TL's softmax-of-probabilities apart
            with torch.no_grad():
                raw = model(prompts[row : row + 1])[0, -1].double()
            assert chi_square(counts, torch.softmax(raw, -1)) > 100


@pytest.mark.parametrize("name", ["disentangled-3l", "standard-3l"])
def test_generate_from_one_string_draws_what_its_ids_draw(name, models):
    # The prompt ends in "0", the tokenizer's pad id: TransformerLens alone would mask it.
    model = models[name][0]
    assert model.tokenizer is not None
    torch.manual_seed(3)
    text = model.generate("1 2 0 0", max_new_tokens=4, verbose=False)
    torch.manual_seed(3)
    ids = model.generate(model.to_tokens("1 2 0 0"), max_new_tokens=4, verbose=False)
    assert isinstance(text, str) and text == model.to_string(ids[0]) and text.startswith("1 2 0 0 ")


def test_generate_temperature_and_greedy_act_on_the_probabilities(construction, task):
    prompt = sample_tokens(task, 1, T - 1, seed=6)
    p = predict_next(construction, prompt)[0]
    n = 4000
    torch.manual_seed(1)
    drawn = construction.generate(prompt.expand(n, -1), max_new_tokens=1, temperature=0.5, verbose=False)
    counts = torch.bincount(drawn[:, -1], minlength=Q).double()
    assert chi_square(counts, p**2 / (p**2).sum()) < 25  # temperature tau: p^(1/tau), renormalised
    greedy = construction.generate(prompt, max_new_tokens=1, do_sample=False, verbose=False)
    assert greedy[0, -1].item() == p.argmax().item()


def test_generate_stream_draws_the_same_tokens_as_generate(construction, task):
    prompt = sample_tokens(task, 2, 5, seed=7)
    torch.manual_seed(2)
    generated = construction.generate(prompt, max_new_tokens=4, verbose=False)
    torch.manual_seed(2)
    streamed = torch.cat(
        list(construction.generate_stream(prompt, max_new_tokens=4, verbose=False, max_tokens_per_yield=2)), dim=1
    )
    assert torch.equal(generated, streamed)
    assert not construction._log_probs_for_sampling  # plain forwards return the raw output again


def test_generate_refuses_what_it_cannot_sample(task):
    model = disentangled_transformer(Q, order=M, n_ctx=T, n_layers=1, dtype=torch.float64)
    prompt = sample_tokens(task, 1, 6, seed=8)
    with pytest.raises(ValueError, match="context"):
        model.generate(prompt, max_new_tokens=T - 5, verbose=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=0, verbose=False)
    with torch.no_grad():
        model.W_U.copy_(-model.W_U.abs() - 1.0)  # the residual is >= 0, so every output is < 0
    with pytest.raises(ValueError, match="no positive entry"):
        model.generate(prompt, max_new_tokens=1, verbose=False)


# ----------------------------------------------------------------------------------------------
# Gradients reach the embedding; W_E is not trained


@pytest.mark.parametrize("which", ["construction", "random"])
def test_embedding_gradient_equals_finite_differences(which, construction, task):
    if which == "construction":
        model = construction
    else:
        model = disentangled_transformer(Q, order=M, n_ctx=T, n_layers=3, dtype=torch.float64, seed=5)
        with torch.no_grad():
            model.W_U.add_(0.5)  # keep every output row positive
    tokens = sample_tokens(task, 2, T, seed=9)
    grads = {}

    def keep_grad(grad, hook):
        grads[hook.name] = grad.detach().clone()

    with model.hooks(bwd_hooks=[("hook_embed", keep_grad), ("blocks.0.hook_resid_pre", keep_grad)]):
        model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)
    grad = grads["hook_embed"]
    assert grad.shape == (2, T, model.cfg.d_model)
    assert torch.equal(grads["blocks.0.hook_resid_pre"], grad)  # resid_pre = embed + (zero) pos_embed
    assert not model.W_E.requires_grad and model.W_E.grad is None

    def loss_with_shift(index, eps):
        def shift(embed, hook):
            embed = embed.clone()
            embed[index] += eps
            return embed

        with torch.no_grad():
            return model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("hook_embed", shift)]).item()

    eps = 1e-6
    q, d_model = model.cfg.d_vocab, model.cfg.d_model
    # token coordinates (read by layer 1) and coordinates of later blocks (read by the readout)
    for index in [(0, T - 1, 0), (1, 5, 2), (0, 6, q - 1), (1, T - 2, d_model - 1), (0, 4, q + 2)]:
        finite_difference = (loss_with_shift(index, eps) - loss_with_shift(index, -eps)) / (2 * eps)
        assert abs(finite_difference - grad[index].item()) < 1e-6, index
    assert grad.abs().max() > 1e-3


def test_training_leaves_the_embedding_alone(task):
    model = disentangled_transformer(Q, order=M, n_ctx=T, n_layers=2, seed=1)
    embed, pos = model.W_E.clone(), model.W_pos.clone()
    frozen_names = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {"embed.W_E", "pos_embed.W_pos"} <= frozen_names
    config = TrainConfig(
        steps=3,
        batch_size=4,
        seq_len=T,
        lr=0.1,
        eval_every=0,
        eval_batch_size=4,
        eval_bayes=False,
        progress=False,
        device="cpu",
    )
    train(model, task, config)
    assert torch.equal(model.W_E, embed) and torch.equal(model.W_pos, pos)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen_names


# ----------------------------------------------------------------------------------------------
# In-place hook edits


HOOK_EDITS = {
    # hook name (layer 1 unless said) -> the entry edited: one that changes the output
    "blocks.0.attn.hook_rel_scores": (0, 0, T - 1, T - 2),
    "blocks.0.attn.hook_key_pos_scores": (0, 0, T - 1, T - 3),
    "blocks.1.attn.hook_key_pos_scores": (0, 0, T - 1, T - 2),
    "blocks.0.attn.hook_rel_query_scores": (0, 0, T - 1, 2),
    "blocks.0.attn.hook_rel_values": (0, T - 1, 0, 1),
    "blocks.0.attn.hook_attn_scores": (0, 0, T - 1, T - 2),
    "blocks.0.attn.hook_pattern": (0, 0, T - 1, T - 2),
    "blocks.0.attn.hook_q": (0, T - 1, 0, 1),
    "blocks.0.attn.hook_k": (0, T - 2, 0, 1),
    "blocks.2.attn.hook_v": (0, T - 2, 0, 0),  # token 0's coordinate of a key layer 3 copies
    "blocks.2.attn.hook_z": (0, T - 1, 0, 2),
    "hook_embed": (0, T - 1, 1),
    "blocks.1.hook_resid_pre": (0, T - 1, 9),  # L1.rel, lag 1: averaged by layer 2
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("hook_name", list(HOOK_EDITS))
def test_in_place_hook_edit_equals_a_returned_copy(hook_name, grad, construction, task):
    tokens = sample_tokens(task, 2, T, seed=10)
    index = HOOK_EDITS[hook_name]

    def in_place(activation, hook):
        activation[index] += 0.5

    def copy(activation, hook):
        activation = activation.clone()
        activation[index] += 0.5
        return activation

    with torch.set_grad_enabled(grad):
        plain = construction(tokens)
        edited = construction.run_with_hooks(tokens, fwd_hooks=[(hook_name, in_place)])
        copied = construction.run_with_hooks(tokens, fwd_hooks=[(hook_name, copy)])
    assert torch.equal(edited, copied)
    assert (edited[0] - plain[0]).abs().max() > 1e-4  # the edit matters ...
    assert torch.equal(edited[1], plain[1])  # ... for its own sequence only


@pytest.mark.parametrize("name", ["rel_scores", "key_pos_scores"])
def test_in_place_edits_across_the_batch_of_the_position_scores(name, construction, task):
    # The edit that used to raise "more than one element of the written-to tensor refers to a single
    # memory location" when the hook was handed a batch-expanded view.
    tokens = sample_tokens(task, 2, T, seed=10)

    def in_place(activation, hook):
        activation[:, :, T - 1, T - 3] -= 2.0

    def copy(activation, hook):
        activation = activation.clone()
        activation[:, :, T - 1, T - 3] -= 2.0
        return activation

    with torch.no_grad():
        edited = construction.run_with_hooks(tokens, fwd_hooks=[(act_name(name, 0), in_place)])
        copied = construction.run_with_hooks(tokens, fwd_hooks=[(act_name(name, 0), copy)])
        plain = construction(tokens)
    assert torch.equal(edited, copied) and (edited - plain).abs().max() > 1e-4


def test_cached_position_scores_are_editable_and_hold_the_tables(construction, task):
    tokens = sample_tokens(task, 2, T, seed=11)
    with torch.no_grad():
        _, cache = construction.run_with_cache(tokens)
    attn = construction.blocks[1].attn
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    causal = offset >= 0
    key_pos = cache["key_pos_scores", 1]
    expected = torch.where(causal, attn.key_pos_score[:T].expand(T, T), 0.0)
    assert torch.equal(key_pos[0, 0], expected) and torch.equal(key_pos[1, 0], expected)
    key_pos[0, 0, T - 1, T - 1] = 7.0  # each sequence has its own copy
    assert key_pos[1, 0, T - 1, T - 1].item() == 0.0


# ----------------------------------------------------------------------------------------------
# Bad token input


BAD_INPUTS = [
    ("negative id", lambda q, n: torch.tensor([[0, -1, 2]]), r"\[0, "),
    ("id = q", lambda q, n: torch.tensor([[0, q, 1]]), r"\[0, "),
    ("too long", lambda q, n: torch.zeros(1, n + 1, dtype=torch.long), "context"),
    ("float", lambda q, n: torch.zeros(1, 4), "integer"),
    ("bool", lambda q, n: torch.zeros(1, 4, dtype=torch.bool), "integer"),
    ("empty batch", lambda q, n: torch.zeros(0, 4, dtype=torch.long), "empty batch"),
    ("no positions", lambda q, n: torch.zeros(2, 0, dtype=torch.long), "no positions"),
    ("3-d", lambda q, n: torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case, make, message", BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_token_input_raises_a_value_error_naming_it(name, case, make, message, models):
    model = models[name][0]
    tokens = make(model.cfg.d_vocab, model.cfg.n_ctx)
    with pytest.raises(ValueError, match=message):
        model(tokens)
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(tokens)
    with pytest.raises(ValueError, match=message):
        model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[])
    if case != "too long":  # (a prompt of n_ctx + 1 tokens is refused for its length plus new tokens)
        with pytest.raises(ValueError, match=message):
            model.generate(tokens, max_new_tokens=1, verbose=False)


@pytest.mark.parametrize("name", MODELS)
def test_good_input_of_every_kind_still_runs(name, models):
    model, task, length = models[name]
    tokens = sample_tokens(task, 2, length, seed=12)
    with torch.no_grad():
        out = model(tokens)
        assert torch.equal(model(tokens[0]), out[:1])  # [T] gains a batch dimension
        assert torch.equal(model(tokens.int()), out)  # int32 ids
        _, cache = model.run_with_cache(tokens)
        # Residual input with start_at_layer is not token input: passed through.
        resumed = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1)
    torch.testing.assert_close(resumed, out, rtol=0, atol=1e-6)
    assert model(torch.zeros(1, model.cfg.n_ctx, dtype=torch.long)).shape == (1, model.cfg.n_ctx, model.cfg.d_vocab)


# ----------------------------------------------------------------------------------------------
# Rebuilding from mdlens_args; hook names; patching dtype


@pytest.mark.parametrize("name", MODELS)
def test_builder_arguments_rebuild_the_architecture(name, models, tmp_path):
    model = models[name][0]
    args = json.loads(json.dumps(model.mdlens_args))  # JSON-friendly, dtype by name
    assert args["dtype"] in ("float32", "float64")
    build = DisentangledTransformer if model.mdlens_kind == "disentangled" else standard_transformer
    rebuilt = build(**args)
    assert type(rebuilt) is type(model) and rebuilt.cfg.dtype == model.cfg.dtype
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    # A checkpoint round trip keeps the loss.
    tokens = sample_tokens(models[name][1], 2, models[name][2], seed=13)
    loaded = mdlens.load(mdlens.save(model, tmp_path / name))
    with torch.no_grad():
        assert model(tokens, return_type="loss").item() == loaded(tokens, return_type="loss").item()


def test_dtype_names_are_accepted_and_others_refused():
    assert disentangled_transformer(3, order=2, n_ctx=6, dtype="float64").cfg.dtype == torch.float64
    assert standard_transformer(3, 6, d_model=8, dtype="float32").W_E.dtype == torch.float32
    for dtype in ("float16", torch.float16, "int64"):
        with pytest.raises(ValueError, match="dtype"):
            DisentangledTransformer(3, 6, dtype=dtype)
        with pytest.raises(ValueError, match="dtype"):
            standard_transformer(3, 6, dtype=dtype)


def test_act_name_and_cache_shorthand_reach_the_relative_position_hooks(construction, task):
    for name in RPE_HOOKS:
        assert act_name(name, 2) == f"blocks.2.attn.hook_{name}"
        assert act_name(name, 2) in construction.hook_dict
    for args in [("pattern", 2), ("resid_pre", 0), ("embed",), ("k", 1, "a")]:
        assert act_name(*args) == get_act_name(*args)
    with pytest.raises(ValueError, match="layer"):
        act_name("rel_scores")
    tokens = sample_tokens(task, 2, T, seed=14)
    with torch.no_grad():
        _, cache = construction.run_with_cache(tokens)
    assert isinstance(cache, DisentangledActivationCache)
    for name in RPE_HOOKS:
        assert cache[name, 0] is cache[f"blocks.0.attn.hook_{name}"]
        assert cache[name, -1] is cache[f"blocks.2.attn.hook_{name}"]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]  # TL's shorthand as before
    assert cache.stack_activation("rel_values").shape == (3, 2, T, 1, M + 1)
    first = cache.apply_slice_to_batch_dim(slice(0, 1))
    assert torch.equal(first["rel_scores", 1], cache["rel_scores", 1][:1])


def test_patching_results_are_float32_for_a_float64_model(construction, task):
    """TransformerLens' patching allocates its result in the default dtype: documented, not changed."""
    clean, corrupted = sample_tokens(task, 2, T, seed=15), sample_tokens(task, 2, T, seed=16)
    with torch.no_grad():
        _, clean_cache = construction.run_with_cache(clean)
    result = patching.get_act_patch_resid_pre(construction, corrupted, clean_cache, lambda out: out[:, -1, 0].sum())
    assert construction.cfg.dtype == torch.float64 and result.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Tokens, head detection and composition on every model (the tokenizer, the lag detector and the
# composition scores have their own test files; these check them on the three models together)


@pytest.mark.parametrize("name", MODELS)
def test_tokens_and_str_tokens_work_as_on_any_transformer_lens_model(name, models):
    model, _, _ = models[name]
    assert torch.equal(model.to_tokens("3 1 2 1"), torch.tensor([[3, 1, 2, 1]]))
    assert model.to_str_tokens(torch.tensor([0, 3, 2])) == ["0", "3", "2"]
    assert model.to_string(torch.tensor([2, 2, 3])) == "2 2 3"


@pytest.mark.parametrize("name", MODELS)
def test_detect_head_with_the_lag_pattern_is_the_lag_mass_by_hand(name, models):
    from transformer_lens.head_detector import detect_head

    from mdlens.hooks.heads import lag_detection_pattern

    model, model_task, _ = models[name]
    m, length = model_task.order, min(20, model.cfg.n_ctx - 1)  # TL wants T < n_ctx
    tokens = sample_tokens(model_task, 1, length, seed=9)
    pattern = lag_detection_pattern(length, range(1, m + 1), first_query=m)
    text = model.to_string(tokens[0])  # detect_head reads text, through the model's tokenizer
    scores = detect_head(model, text, pattern, exclude_bos=False, exclude_current_token=False, error_measure="mul")
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        attention = cache[f"blocks.{layer}.attn.hook_pattern"][0, 0].to(torch.float64)
        # TL's "mul" score: the mass on the pattern's pairs, summed over rows, divided by all T rows.
        by_hand = sum(attention[i, i - g].item() for i in range(m, length) for g in range(1, m + 1)) / length
        assert abs(scores[layer, 0].item() - by_hand) < 1e-5


def test_composition_scores_have_no_silent_nan(construction):
    import warnings

    from mdlens.models import composition_scores

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        scores = composition_scores(construction, "Q")
    assert torch.isfinite(scores.total).all()
    # Layer 3 reads the mean responsibility layer 2 wrote (through rel_query): a nonzero Q-composition.
    assert scores.total[1, 0, 2, 0] > 0
