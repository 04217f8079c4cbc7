"""TransformerLens's key/value cache on every mdlens model, and the disentangled forward's shortcuts.

The disentangled attention takes TL's ``past_kv_cache`` (queries at positions ``past..``, keys at
every position so far): a run split into a cached prefix and the rest must give the one full run's
outputs, the second computation here. Its forward also places ``z``'s two parts into the residual
instead of multiplying by the frozen copy map ``W_O``, and pads ``q``/``k``/``v``/``z`` only where a
hook sees them: checked against TL's own formula ``attn_out = z W_O + b_O`` on the cached ``z``, and
against a run with every hook attached (bit for bit).
"""

import warnings

import pytest
import torch
from helpers import M, Q, sample_tokens
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

import mdlens
from mdlens.construction import build_md_transformer
from mdlens.models import disentangled_transformer

LENGTH = 24  # longer than the relative-position window (m + 1 = 4), shorter than the shipped n_ctx


@pytest.fixture(scope="module")
def models(task):
    found = {"construction": build_md_transformer(task.transition, M, LENGTH, 0.2)}
    found["untrained-5l"] = disentangled_transformer(Q, order=M, n_ctx=LENGTH, n_layers=5, init_std=0.3, seed=2)
    for name in ("disentangled-3l", "disentangled-5l", "standard-3l"):
        found[name] = mdlens.load_pretrained(name)[0]
    return found


def tokens_for(model, seed: int) -> torch.Tensor:
    q = model.cfg.d_vocab
    pi = torch.softmax(torch.randn(q, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), -1)
    tokens = sample_tokens(pi, M, 6, LENGTH, seed)
    tokens[0, :2] = 0  # the tokenizer's pad id is a real token: it must not be masked
    return tokens


def tolerance(model, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max())
    return (1e-12 if model.cfg.dtype == torch.float64 else 3e-6) * max(1.0, scale)


@pytest.mark.filterwarnings("ignore::mdlens.models.disentangled.RescaledStepWarning")  # the construction's prefix
@pytest.mark.parametrize("name", ["construction", "untrained-5l", "disentangled-3l", "disentangled-5l", "standard-3l"])
@pytest.mark.parametrize("split", [1, 2, M + 2, LENGTH - 1])
def test_a_run_after_a_cached_prefix_gives_the_full_run(name, split, models):
    model = models[name]
    tokens = tokens_for(model, seed=split)
    with torch.no_grad():
        full = model(tokens)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
        prefix = model(tokens[:, :split], past_kv_cache=cache)
        rest = model(tokens[:, split:], past_kv_cache=cache)
    assert cache.entries[0].past_keys.shape[1] == LENGTH
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full, atol=tolerance(model, full), rtol=0)


@pytest.mark.parametrize("name", ["construction", "disentangled-3l"])
def test_a_frozen_cache_resumes_the_last_position_from_a_layer(name, models):
    # What distributed alignment search does: the blocks after layer 1 on the last position alone.
    model = models[name]
    tokens = tokens_for(model, seed=3)
    with torch.no_grad():
        _, activations = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        full = model(tokens)[:, -1]
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
        model(tokens[:, :-1], past_kv_cache=cache)
        cache.freeze()
        last = model(activations["blocks.0.hook_resid_post"][:, -1:], start_at_layer=1, past_kv_cache=cache)[:, -1]
    assert cache.entries[0].past_keys.shape[1] == LENGTH - 1  # frozen: left as it was
    torch.testing.assert_close(last, full, atol=tolerance(model, full), rtol=0)


@pytest.mark.parametrize("name", ["construction", "disentangled-5l"])
def test_attention_output_is_tl_formula_on_z_and_hooks_change_nothing(name, models):
    model = models[name]
    tokens = tokens_for(model, seed=4)
    with torch.no_grad():
        plain = model(tokens)
        hooked, cache = model.run_with_cache(tokens)  # every hook point attached: z, q, k, v padded
    assert torch.equal(plain, hooked)
    for layer in range(model.cfg.n_layers):
        attn = model.blocks[layer].attn
        z = cache["z", layer].to(torch.float64)
        assert z.shape[-1] == model.cfg.d_head
        by_formula = torch.einsum("bphd,hdm->bpm", z, attn.W_O.to(torch.float64)) + attn.b_O.to(torch.float64)
        torch.testing.assert_close(cache["attn_out", layer].to(torch.float64), by_formula, atol=1e-12, rtol=0)


def test_a_hook_edit_of_z_reaches_the_output_as_through_w_o(models):
    model = models["construction"]
    tokens = tokens_for(model, seed=5)
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=name)
        edited_z = cache[name] * 0.5
        edited = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda z, hook: z * 0.5)])
        attn = model.blocks[1].attn
        resid_mid = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")[1]["blocks.1.hook_resid_pre"]
        resid_post = resid_mid + torch.einsum("bphd,hdm->bpm", edited_z, attn.W_O) + attn.b_O
        expected = model(resid_post, start_at_layer=2)
    torch.testing.assert_close(edited, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["disentangled-3l", "standard-3l"])
def test_generate_recomputes_the_prefix_even_when_asked_for_the_cache(name, models):
    # TransformerLens 3.9's cached generation embeds the wrong positions: standard-3l (learned absolute
    # positions) drew other tokens with it (56 of 64 x 6 here), the disentangled models failed past
    # n_ctx / 2. mdlens generates without it, and says so when asked.
    model = models[name]
    prompt = tokens_for(model, seed=6)[:, :8].repeat(8, 1)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="use_past_kv_cache=True is ignored"):
        asked = model.generate(prompt, max_new_tokens=6, verbose=False, use_past_kv_cache=True)
    torch.manual_seed(4)
    recomputed = model.generate(prompt, max_new_tokens=6, verbose=False, use_past_kv_cache=False)
    torch.manual_seed(4)
    default = model.generate(prompt, max_new_tokens=6, verbose=False)
    assert torch.equal(asked, recomputed) and torch.equal(default, recomputed)


def test_the_cached_prefix_run_knows_its_length(models):
    # A construction built for LENGTH, run on LENGTH tokens in two pieces: no rescaled-step warning.
    model = build_md_transformer(models["construction"].md_params["transition"], M, LENGTH, 0.2)
    tokens = tokens_for(model, seed=7)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", tokens.shape[0])
    with torch.no_grad():
        model(tokens[:, :2], past_kv_cache=cache)  # T = 2 <= m: no step to rescale yet
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(tokens[:, 2:], past_kv_cache=cache)
