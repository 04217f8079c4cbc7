"""mdlens.hooks.alignment: distributed alignment search (DAS) for MD's variables.

Every number is checked against a computation made here: the high-level counterfactuals are
written out from the formulas of ``E.causal_md_weights``'s docstring with torch; the interchange on
a user's own model is redone with an explicit ``run_with_hooks`` patch; the planted test knows the
subspace it hid; the construction's named blocks are known to hold the variables exactly.
"""

import dataclasses
import math

import pytest
import torch
from matplotlib.figure import Figure
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.construction import build_md_transformer, build_mdk_transformer
from mdlens.hooks import (
    Alignment,
    AlignmentScan,
    MDCausalModel,
    align_variable,
    alignment_scan,
    counterfactual_prediction,
    high_level_model,
)
from mdlens.hooks.alignment import wrong_counterfactual

Q, M, T, ETA = 4, 3, 24, 0.2
N_PAIRS = 256
TWO_STEP_SCALES = (12.0, 6.0, 24.0, 12.0)  # a, b2, c2, d2: lambda1 and h_1 both move the prediction


@pytest.fixture(scope="module")
def task():
    return MTDTask(vocab_size=Q, order=M, seed=11)


@pytest.fixture(scope="module")
def pairs(task):
    generator = torch.Generator().manual_seed(1)
    return task.sample(N_PAIRS, T, generator=generator).tokens, task.sample(N_PAIRS, T, generator=generator).tokens


@pytest.fixture(scope="module")
def construction(task):
    return build_md_transformer(task.transition, M, T, ETA)


@pytest.fixture(scope="module")
def two_step(task):
    return build_mdk_transformer(task.transition, M, T, steps=2, scales=TWO_STEP_SCALES)


def foreign_model(attn_only: bool, seed: int) -> HookedTransformer:
    """A user's own small HookedTransformer (absolute positions), random weights."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=T,
        d_head=4,
        n_heads=2,
        d_vocab=Q,
        d_mlp=None if attn_only else 32,
        attn_only=attn_only,
        act_fn=None if attn_only else "gelu",
        positional_embedding_type="standard",
        seed=seed,
    )
    return HookedTransformer(cfg)


# ----------------------------------------------------------------------------------------------
# The high-level model, written out by hand
# ----------------------------------------------------------------------------------------------


def predictive_by_hand(tokens, pi, weights):
    """``sum_g w_g pi(y_{T+1-g}, .)``, a loop over the lags."""
    out = torch.zeros(tokens.shape[0], pi.shape[0], dtype=torch.float64)
    for g in range(1, weights.shape[1] + 1):
        out += weights[:, g - 1 : g] * pi[tokens[:, tokens.shape[1] - g]]
    return out


def two_step_weights_by_hand(gamma, g0, scales, lambda1=None, h1=None):
    """``lambda_2`` of causal 2-step MD (``E.causal_md_weights``'s docstring) from responsibilities
    ``gamma [B, N, m]`` and mean ``g0 [B, m]``, with ``lambda1`` or ``h1`` set when given."""
    a, b2, c2, d2 = scales
    if lambda1 is None:
        lambda1 = torch.softmax(a * g0, dim=-1)
    if h1 is None:
        key_weights = torch.softmax(-d2 * (gamma * lambda1[:, None, :]).sum(-1), dim=-1)  # [B, N]
        h1 = (key_weights[..., None] * gamma).sum(1)
    return torch.softmax(b2 * g0 + c2 * h1, dim=-1)


def test_one_step_counterfactual_is_b_weights_on_a_tokens(task, pairs):
    tokens_a, tokens_b = pairs
    pi, beta = task.transition, 9.0
    high_level = MDCausalModel(pi, M, (beta,))
    by_hand = predictive_by_hand(
        tokens_a, pi, torch.softmax(beta * E.responsibilities(tokens_b, pi, M).mean(1), dim=-1)
    )
    counterfactual = high_level.counterfactual(tokens_a, tokens_b, "mean_responsibility")
    assert counterfactual.shape == (N_PAIRS, Q)
    assert (counterfactual - by_hand).abs().max() < 1e-12
    assert (counterfactual - counterfactual_prediction(tokens_a, tokens_b, pi, M, beta)).abs().max() < 1e-12
    # With one step, B's responsibilities at every position give B's mean: the same counterfactual.
    all_positions = high_level.counterfactual(tokens_a, tokens_b, "responsibility")
    assert (all_positions - by_hand).abs().max() < 1e-12
    # And it is not A's own prediction (the test can fail).
    own = predictive_by_hand(tokens_a, pi, torch.softmax(beta * E.responsibilities(tokens_a, pi, M).mean(1), dim=-1))
    assert (counterfactual - own).abs().max() > 1e-2


def test_two_step_counterfactuals_follow_the_causal_formula(task, pairs):
    tokens_a, tokens_b = pairs
    pi, scales = task.transition, TWO_STEP_SCALES
    high_level = MDCausalModel(pi, M, scales)
    assert high_level.steps == 2
    assert high_level.variables == ["responsibility", "mean_responsibility", "lambda1", "second_step_mean", "lambda2"]
    gamma_a, gamma_b = E.responsibilities(tokens_a, pi, M), E.responsibilities(tokens_b, pi, M)
    g0_a, g0_b = gamma_a.mean(1), gamma_b.mean(1)
    lambda1_b = torch.softmax(scales[0] * g0_b, dim=-1)
    key_weights_b = torch.softmax(-scales[3] * (gamma_b * lambda1_b[:, None, :]).sum(-1), dim=-1)
    h1_b = (key_weights_b[..., None] * gamma_b).sum(1)
    expected = {
        "lambda1": two_step_weights_by_hand(gamma_a, g0_a, scales, lambda1=lambda1_b),
        "second_step_mean": two_step_weights_by_hand(gamma_a, g0_a, scales, h1=h1_b),
        "mean_responsibility": two_step_weights_by_hand(gamma_a, g0_b, scales),
        "responsibility": two_step_weights_by_hand(gamma_b, g0_b, scales),
    }
    for variable, weights in expected.items():
        counterfactual = high_level.counterfactual(tokens_a, tokens_b, variable)
        assert (counterfactual - predictive_by_hand(tokens_a, pi, weights)).abs().max() < 1e-12, variable
    # Unintervened, the hand formula is the estimator (so the intervened ones above are not trivially equal).
    own = two_step_weights_by_hand(gamma_a, g0_a, scales)
    assert (own - E.causal_md_weights(tokens_a, pi, M, list(scales))).abs().max() < 1e-12
    assert (expected["lambda1"] - own).abs().max() > 1e-2 and (expected["second_step_mean"] - own).abs().max() > 1e-2


def test_wrong_high_level_models(task, pairs):
    tokens_a, tokens_b = pairs
    pi, beta = task.transition, 9.0
    high_level = MDCausalModel(pi, M, (beta,))
    weights_b = torch.softmax(beta * E.responsibilities(tokens_b, pi, M).mean(1), dim=-1)
    # Lag g takes lag g+1's weight (cyclically).
    permuted = wrong_counterfactual(high_level, tokens_a, tokens_b, "mean_responsibility", "permuted_lags")
    shifted = torch.cat([weights_b[:, 1:], weights_b[:, :1]], dim=1)
    assert (permuted - predictive_by_hand(tokens_a, pi, shifted)).abs().max() < 1e-12
    # A random point of the simplex per pair, fixed by the seed, unrelated to B.
    first = wrong_counterfactual(high_level, tokens_a, tokens_b, "mean_responsibility", "random_weights", seed=3)
    assert torch.equal(
        first, wrong_counterfactual(high_level, tokens_a, tokens_b, "mean_responsibility", "random_weights", seed=3)
    )
    assert not torch.equal(
        first, wrong_counterfactual(high_level, tokens_a, tokens_b, "mean_responsibility", "random_weights", seed=4)
    )
    assert (first.sum(-1) - 1).abs().max() < 1e-12 and (first >= 0).all()
    with pytest.raises(ValueError, match="wrong_model must be one of"):
        wrong_counterfactual(high_level, tokens_a, tokens_b, "mean_responsibility", "reversed")


def test_high_level_model_takes_the_construction_scales_or_the_model_step(task, pairs, construction, two_step):
    tokens_a, _ = pairs
    pi = task.transition
    recorded = high_level_model(construction, tokens_a, pi, M)
    assert recorded.source == "construction" and recorded.scales == (pytest.approx(ETA * M * (T - M)),)
    assert high_level_model(two_step, tokens_a, pi, M, steps=2).scales == TWO_STEP_SCALES
    # A one-step model that does not record its step: the step is read off its predictions, and the
    # construction *is* one-step MD with beta = eta m (T - m).
    unrecorded = build_md_transformer(pi, M, T, ETA)
    unrecorded.md_params = {}
    fitted = high_level_model(unrecorded, tokens_a[:64], pi, M)
    assert fitted.source == "effective_step"
    assert fitted.scales[0] == pytest.approx(ETA * M * (T - M), rel=1e-2)  # up to tune_eta_refined's grid


# ----------------------------------------------------------------------------------------------
# Known answers on the constructions
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mean_responsibility_alignment(task, pairs, construction):
    tokens_a, tokens_b = pairs
    return align_variable(
        construction, "mean_responsibility", "blocks.1.hook_resid_post", tokens_a, tokens_b, task.transition, M,
        controls=True, rank_sweep=False,
    )  # fmt: skip


def test_das_finds_mean_responsibility_after_layer_2(mean_responsibility_alignment):
    alignment = mean_responsibility_alignment
    assert isinstance(alignment, Alignment) and alignment.rank == M and alignment.n_held_out == N_PAIRS // 4
    assert alignment.interchange_fidelity >= 0.99
    assert alignment.named_block == "L2.mean_responsibility"
    assert abs(alignment.named_block_fidelity - 1.0) <= 1e-9 and alignment.named_block_max_deviation <= 1e-9
    # The learned basis is orthonormal.
    gram = alignment.basis.T @ alignment.basis
    assert (gram - torch.eye(M, dtype=torch.float64)).abs().max() < 1e-9
    # Controls: a random subspace does nothing, nor does DAS on a random-init model or against a wrong model.
    assert abs(alignment.random_subspace_fidelity) <= 0.1
    assert alignment.random_model_fidelity <= 0.1  # read through a softmax (module docstring)
    assert alignment.wrong_model == "permuted_lags" and alignment.wrong_model_fidelity <= 0.5
    assert alignment.subspace_r2 >= 0.9
    summary = alignment.to_dict()
    assert summary["interchange_fidelity"] == alignment.interchange_fidelity and "basis" not in summary
    assert "interchange fidelity" in str(alignment) and isinstance(alignment.plot(), Figure)


def test_das_finds_nothing_in_the_embedding_and_responsibility_after_layer_1(task, pairs, construction):
    tokens_a, tokens_b = pairs
    options = {"controls": False, "rank_sweep": False}
    embed = align_variable(
        construction, "mean_responsibility", "hook_embed", tokens_a, tokens_b, task.transition, M, **options
    )
    assert embed.interchange_fidelity <= 0.1
    responsibility = align_variable(
        construction, "responsibility", "blocks.0.hook_resid_post", tokens_a, tokens_b, task.transition, M, **options
    )
    assert responsibility.positions == "scored" and responsibility.interchange_fidelity >= 0.99
    assert abs(responsibility.named_block_fidelity - 1.0) <= 1e-9


@pytest.mark.parametrize("variable, hook_name", [("lambda1", "blocks.2.hook_resid_post"),
                                                 ("second_step_mean", "blocks.3.hook_resid_post")])  # fmt: skip
def test_the_two_step_named_blocks_are_exact(task, pairs, two_step, variable, hook_name):
    """Swapping ``L3.lambda1`` / ``L4.second_step_mean`` whole gives the 2-step counterfactual to rounding."""
    tokens_a, tokens_b = pairs
    alignment = align_variable(
        two_step, variable, hook_name, tokens_a, tokens_b, task.transition, M, steps=1, controls=False, rank_sweep=False
    )
    assert alignment.named_block == {"lambda1": "L3.lambda1", "second_step_mean": "L4.second_step_mean"}[variable]
    assert abs(alignment.named_block_fidelity - 1.0) <= 1e-9 and alignment.named_block_max_deviation <= 1e-9
    assert alignment.kl_base > 0.05  # the variable moves the prediction, so exactness is not trivial


@pytest.mark.parametrize("variable, hook_name", [("lambda1", "blocks.2.hook_resid_post"),
                                                 ("second_step_mean", "blocks.3.hook_resid_post")])  # fmt: skip
def test_das_finds_the_two_step_variables(task, pairs, two_step, variable, hook_name):
    tokens_a, tokens_b = pairs
    alignment = align_variable(
        two_step, variable, hook_name, tokens_a, tokens_b, task.transition, M, controls=True, rank_sweep=False
    )
    assert alignment.interchange_fidelity >= 0.99
    assert alignment.wrong_model_fidelity <= 0.5
    # DAS on an untrained network of this architecture, its output read through a softmax, does not
    # make it produce the counterfactual (floored as probabilities it would score 0.07-0.22 here).
    assert alignment.random_model_fidelity <= 0.1


# ----------------------------------------------------------------------------------------------
# A planted subspace
# ----------------------------------------------------------------------------------------------


def principal_angles(first, second):
    """Principal angles between two column spaces: ``arcsin`` of the singular values of the part of
    ``second``'s orthonormal basis outside ``first``'s (accurate for small angles, unlike ``arccos``)."""
    first, second = torch.linalg.qr(first)[0], torch.linalg.qr(second)[0]
    outside = second - first @ (first.T @ second)
    return torch.linalg.svdvals(outside).clamp(max=1.0).arcsin()


def test_das_recovers_a_planted_rotation(task, pairs):
    """The construction with its layer-2 residual rotated by a random orthogonal ``R`` (and rotated back
    before layer 3): the same function, with the mean responsibility in a rotated subspace."""
    tokens_a, tokens_b = pairs
    model = build_md_transformer(task.transition, M, T, ETA)
    width = model.cfg.d_model
    rotation = torch.linalg.qr(
        torch.randn(width, width, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )[0]
    with torch.no_grad():
        before = model(tokens_a)
    model.add_perma_hook("blocks.1.hook_resid_post", lambda resid, hook: resid @ rotation)
    model.add_perma_hook("blocks.2.hook_resid_pre", lambda resid, hook: resid @ rotation.T)
    with torch.no_grad():
        assert (model(tokens_a) - before).abs().max() < 1e-12
    # Gamma_bar sums to 1: only its centred directions e_g - e_{g+1} inside the block carry anything.
    block = model.layout["L2.mean_responsibility"]
    centred = torch.zeros(width, M - 1, dtype=torch.float64)
    for g in range(M - 1):
        centred[block.start + g, g], centred[block.start + g + 1, g] = 1.0, -1.0
    planted = rotation.T @ centred  # h @ v == (h @ rotation) @ (rotation.T @ v)
    alignment = align_variable(
        model, "mean_responsibility", "blocks.1.hook_resid_post", tokens_a, tokens_b, task.transition, M,
        rank=M - 1, controls=False, rank_sweep=False,
    )  # fmt: skip
    assert alignment.interchange_fidelity >= 0.99
    assert principal_angles(alignment.basis, planted).max() < 1e-3
    # From random starts alone the search reaches the same fidelity, but stops short in angle (~0.03 rad
    # here): the KL is flat in the directions that mix the plane with ones the swap barely moves.
    # A random plane is ~pi/2 away.
    random_starts = align_variable(
        model, "mean_responsibility", "blocks.1.hook_resid_post", tokens_a, tokens_b, task.transition, M,
        rank=M - 1, controls=False, rank_sweep=False, probe_start=False,
    )  # fmt: skip
    assert random_starts.interchange_fidelity >= 0.99
    assert principal_angles(random_starts.basis, planted).max() < 0.5
    # The probe's subspace alone (no random start) is already the planted plane's neighbourhood.
    probe_only = align_variable(
        model, "mean_responsibility", "blocks.1.hook_resid_post", tokens_a, tokens_b, task.transition, M,
        rank=M - 1, controls=False, rank_sweep=False, restarts=0,
    )  # fmt: skip
    assert probe_only.interchange_fidelity >= 0.99
    assert principal_angles(probe_only.basis, planted).max() < 1e-3


def test_the_same_seed_gives_the_same_basis(task, pairs, construction):
    tokens_a, tokens_b = pairs
    options = {"steps": 5, "controls": False, "rank_sweep": False, "probe_start": False}
    first, second, other = (
        align_variable(
            construction, "mean_responsibility", "blocks.1.hook_resid_post", tokens_a[:64], tokens_b[:64],
            task.transition, M, seed=seed, **options,
        ).basis
        for seed in (0, 0, 1)
    )  # fmt: skip
    assert torch.equal(first, second) and not torch.equal(first, other)


# ----------------------------------------------------------------------------------------------
# A user's own HookedTransformer
# ----------------------------------------------------------------------------------------------


def kl_by_hand(p, q):
    return (p * (p / q).log()).sum(-1)


@pytest.mark.parametrize("attn_only", [True, False])
@pytest.mark.parametrize("hook_name", ["blocks.1.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_post"])
def test_das_on_a_plain_hooked_transformer_is_the_hand_interchange(task, pairs, attn_only, hook_name):
    """On a model mdlens did not build: the reported KLs are those of an explicit ``run_with_hooks``
    interchange with the learned basis on the held-out pairs."""
    model = foreign_model(attn_only, seed=3)
    tokens_a, tokens_b = pairs[0][:64], pairs[1][:64]
    pi, beta = task.transition, 6.0
    high_level = MDCausalModel(pi, M, (beta,))
    alignment = align_variable(
        model, "mean_responsibility", hook_name, tokens_a, tokens_b, pi, M,
        high_level=high_level, steps=20, controls=False, rank_sweep=False,
    )  # fmt: skip
    held_a, held_b = tokens_a[-alignment.n_held_out :], tokens_b[-alignment.n_held_out :]
    counterfactual = predictive_by_hand(
        held_a, pi, torch.softmax(beta * E.responsibilities(held_b, pi, M).mean(1), dim=-1)
    )
    with torch.no_grad():
        _, source_cache = model.run_with_cache(held_b, names_filter=hook_name)
        base = torch.softmax(model(held_a)[:, -1].double(), dim=-1)
    source = source_cache[hook_name][:, -1]
    basis = alignment.basis.to(source.dtype)
    projector = basis @ basis.T

    def interchange(activation, hook):
        last = activation[:, -1].flatten(1)  # heads x d_head flattened for hook_z
        swapped = last + (source.flatten(1) - last) @ projector
        activation = activation.clone()
        activation[:, -1] = swapped.reshape(activation[:, -1].shape)
        return activation

    with torch.no_grad():
        intervened = torch.softmax(
            model.run_with_hooks(held_a, fwd_hooks=[(hook_name, interchange)])[:, -1].double(), -1
        )
    kl_base, kl_intervened = kl_by_hand(counterfactual, base).mean(), kl_by_hand(counterfactual, intervened).mean()
    assert alignment.kl_base == pytest.approx(float(kl_base), rel=1e-6)
    assert alignment.kl_intervened == pytest.approx(float(kl_intervened), rel=1e-4)
    assert alignment.interchange_fidelity == pytest.approx(float(1 - kl_intervened / kl_base), abs=1e-4)
    assert alignment.basis.shape == (source.flatten(1).shape[1], M)
    assert math.isfinite(alignment.probe_fidelity) and math.isfinite(alignment.random_subspace_fidelity)


def test_rank_sweep_and_controls_on_a_plain_hooked_transformer(task, pairs):
    model = foreign_model(attn_only=False, seed=6)
    alignment = align_variable(
        model, "mean_responsibility", "blocks.1.hook_resid_post", pairs[0][:64], pairs[1][:64], task.transition, M,
        high_level=MDCausalModel(task.transition, M, (6.0,)), steps=5, wrong_model="random_weights",
    )  # fmt: skip
    assert list(alignment.rank_sweep) == list(range(M - 1, 2 * M + 1))
    assert alignment.rank_sweep[M] == alignment.interchange_fidelity
    best = max(alignment.rank_sweep.values())
    assert alignment.saturation_rank == min(r for r, f in alignment.rank_sweep.items() if f >= best - 0.01)
    assert alignment.wrong_model == "random_weights" and alignment.named_block is None
    for control in ("random_model_fidelity", "wrong_model_fidelity", "subspace_r2", "read_fraction"):
        assert math.isfinite(getattr(alignment, control)), control
    assert 0.0 <= alignment.read_fraction <= 1.0 + 1e-9
    assert "rank sweep" in str(alignment) and isinstance(alignment.plot(), Figure)


@pytest.mark.parametrize("attn_only", [True, False])
def test_alignment_scan_runs_on_a_plain_hooked_transformer(task, pairs, attn_only):
    model = foreign_model(attn_only, seed=4)
    tokens_a, tokens_b = pairs[0][:64], pairs[1][:64]
    scan = alignment_scan(
        model, "mean_responsibility", tokens_a, tokens_b, task.transition, M, steps=10, progress=False
    )
    assert isinstance(scan, AlignmentScan) and scan.layers == ["embed", "L1", "L2"]
    assert scan.hooks == ["resid_post", "attn_out"] and scan.rank == M
    assert set(scan.alignments) == {
        "hook_embed", "blocks.0.hook_resid_post", "blocks.0.hook_attn_out",
        "blocks.1.hook_resid_post", "blocks.1.hook_attn_out",
    }  # fmt: skip
    assert math.isnan(scan.fidelity[0][1])  # no attention output before layer 1
    cells = [value for row in scan.fidelity for value in row if not math.isnan(value)]
    assert len(cells) == 5 and all(math.isfinite(value) for value in cells)
    assert scan.fidelity[2][0] == scan.alignments["blocks.1.hook_resid_post"].interchange_fidelity
    assert scan.best.interchange_fidelity == max(cells)
    table = str(scan)
    assert "L2" in table and "resid_post" in table and len(table.splitlines()) == 2 + len(scan.layers)
    assert isinstance(scan.plot(), Figure)
    assert scan.to_dict()["fidelity"][0][1] is None


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return foreign_model(attn_only=False, seed=5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"variable": "lambda7"}, "unknown variable"),
        ({"variable": "lag_weights"}, "unknown variable"),
        ({"hook_name": "blocks.5.hook_resid_post"}, "residual hooks"),
        ({"hook_name": "blocks.0.attn.hook_pattern"}, "attention scores or weights"),
        ({"hook_name": "blocks.0.attn.hook_attn_scores"}, "attention scores or weights"),
        ({"rank": 0}, "rank must be an int in 1..16"),
        ({"rank": 17}, "rank must be an int in 1..16"),
        ({"rank": 2.0}, "rank must be an int"),
        ({"held_out": 0.0}, "held_out"),
        ({"held_out": 1.0}, "held_out"),
        ({"held_out": 1.5}, "held_out"),
        ({"wrong_model": "shuffled"}, "wrong_model must be one of"),
        ({"restarts": -1}, "restarts must be an int >= 0"),
        ({"restarts": 1.5}, "restarts must be an int >= 0"),
        ({"restarts": 0, "probe_start": False}, "no starting basis"),
    ],
)
def test_bad_arguments_raise(task, pairs, small_model, change, message):
    arguments = {"variable": "mean_responsibility", "hook_name": "blocks.0.hook_resid_post", **change}
    variable, hook_name = arguments.pop("variable"), arguments.pop("hook_name")
    with pytest.raises(ValueError, match=message):
        align_variable(small_model, variable, hook_name, pairs[0][:16], pairs[1][:16], task.transition, M,
                       high_level=MDCausalModel(task.transition, M, (6.0,)), steps=1, **arguments)  # fmt: skip


def test_bad_pairs_raise(task, pairs, small_model):
    tokens_a, tokens_b = pairs[0][:16], pairs[1][:16]
    pi, hook_name = task.transition, "blocks.0.hook_resid_post"
    cases = [
        ((tokens_a, tokens_b[:, :-1]), "same shape"),  # different lengths
        ((tokens_a, tokens_b[:-1]), "same shape"),  # different numbers of pairs
        ((tokens_a.clone().index_fill_(1, torch.tensor([4]), Q), tokens_b), r"\[0, 4\)"),  # outside the vocabulary
        ((tokens_a[:4], tokens_b[:4]), "at least 8 pairs"),
    ]
    for (base, source), message in cases:
        with pytest.raises(ValueError, match=message):
            align_variable(small_model, "mean_responsibility", hook_name, base, source, pi, M, steps=1)
        with pytest.raises(ValueError, match=message):
            alignment_scan(small_model, "mean_responsibility", base, source, pi, M, steps=1, progress=False)
    with pytest.raises(ValueError, match="hooks must be a non-empty tuple"):
        alignment_scan(small_model, "mean_responsibility", tokens_a, tokens_b, pi, M, hooks=(), progress=False)
    with pytest.raises(ValueError, match="d_vocab"):
        align_variable(small_model, "mean_responsibility", hook_name, tokens_a, tokens_b, torch.eye(5) * 0 + 0.2, M)


def test_a_layout_block_as_the_site(task, pairs, construction):
    """``hook_name`` may name a block of ``model.layout``: the search stays inside its coordinates."""
    tokens_a, tokens_b = pairs
    alignment = align_variable(
        construction, "mean_responsibility", "L2.mean_responsibility", tokens_a, tokens_b, task.transition, M,
        rank=M - 1, controls=False, rank_sweep=False,
    )  # fmt: skip
    block = construction.layout["L2.mean_responsibility"]
    assert alignment.hook_name == "blocks.1.hook_resid_post" and alignment.coordinates == (block.start, block.stop)
    outside = torch.ones(alignment.basis.shape[0], dtype=torch.bool)
    outside[block] = False
    assert alignment.basis[outside].abs().max() == 0
    assert alignment.interchange_fidelity >= 0.99
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.3"):
        align_variable(
            construction, "mean_responsibility", "L2.mean_responsibility", tokens_a, tokens_b, task.transition, M,
            rank=4, controls=False, rank_sweep=False,
        )  # fmt: skip


@pytest.mark.parametrize("which", ["construction", "foreign-mlp"])
def test_a_last_position_site_resumes_after_the_cached_prefix(task, pairs, construction, which):
    """Where only the last position is intervened, DAS runs the later blocks on it alone after TL's
    key/value cache of the base prefix: the intervened outputs are those of the run on every position."""
    from mdlens.hooks.alignment import _Intervener, _prepare, _random_basis, _site

    model = construction if which == "construction" else foreign_model(attn_only=False, seed=3).double()
    tokens_a, tokens_b = pairs[0][:32], pairs[1][:32]
    counterfactual = torch.full((32, Q), 1.0 / Q, dtype=torch.float64)
    site = _site(model, "blocks.0.hook_resid_post", "mean_responsibility", tokens_a)
    intervener = _Intervener(model, site, M)
    cached = _prepare(intervener, tokens_a, tokens_b, counterfactual)
    assert cached.prefix is not None and cached.prefix[0][0].shape[:2] == (32, T - 1)
    every_position = dataclasses.replace(cached, prefix=None)
    basis = _random_basis(site.width, M, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            intervener.output(cached.rows(slice(3, 19)), basis),
            intervener.output(every_position.rows(slice(3, 19)), basis),
            atol=1e-12,
            rtol=0,
        )
    all_positions = _site(model, "blocks.0.hook_resid_post", "responsibility", tokens_a)
    assert _prepare(_Intervener(model, all_positions, M), tokens_a, tokens_b, counterfactual).prefix is None
