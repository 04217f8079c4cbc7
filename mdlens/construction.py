"""Exact mirror-descent constructions (paper-notes §4) as ``DisentangledTransformer``s.

**One step, three layers** (:func:`build_md_transformer`), one arrow of "responsibilities -> mean
over the sequence -> softmax" each:

1. **Layer 1 = responsibilities.** Content score ``log pi(y_j, y_i)`` on the ``tokens`` block,
   keys restricted to offsets ``1 <= i - j <= m``. The softmax gives
   ``A_ij = pi(y_j, y_i) / sum_h pi(y_{i-h}, y_i) = gamma_i(i - j)`` and the one-hot value RPE
   writes ``gamma_i(g)`` at coordinate ``g`` of ``L1.rel`` (alias ``L1.responsibility``).
2. **Layer 2 = mean.** No content score; keys at positions ``1..m`` (1-based) are masked, so
   position ``t`` attends uniformly to ``m+1..t`` and its copy of ``L1.rel`` (``L2.L1.rel``,
   alias ``L2.mean_responsibility``) holds ``(1/(t-m)) sum_{k=m+1..t} gamma_k``.
3. **Layer 3 = softmax readout.** Only offsets ``0..m-1`` are allowed; the query-dependent
   relative score gives the key at offset ``g - 1`` (the token ``y_{t+1-g}``) the score
   ``beta * Gamma_bar_t(g)``, so the pattern is ``lambda = softmax(beta * Gamma_bar_t)`` and the
   copied token block ``L3.tokens`` (alias ``L3.lagged_tokens``) holds ``sum_g lambda_g e_{y_{t+1-g}}``.
   The one-hot value RPE also writes ``lambda_g`` at coordinate ``g - 1`` of ``L3.rel``
   (alias ``L3.lag_weights``).

The readout ``W_U = pi`` on ``L3.tokens`` gives ``sum_g lambda_g pi(y_{t+1-g}, .)``. Since
``softmax(beta * mean_k gamma_k) = softmax(eta_t * m * sum_k gamma_k)`` with
``eta_t = beta / (m (t - m))``, position ``t > m`` outputs one-step MD on ``y_1..y_t`` with step
``eta_t``; ``beta = eta * m * (T - m)`` makes the last position ``T = seq_len`` use ``eta``.
Positions ``t <= m`` have no full lag window: their outputs mean nothing. A construction read on
``T < seq_len`` tokens therefore runs MD with the larger step ``eta_T = beta / (m (T - m))`` at its last
position: exact, and said once per model by a warning (build it with ``seq_len = T`` for ``eta`` at ``T``).

**S steps, 2S + 1 layers** (:func:`build_mdk_transformer`): layers 1-3 as above with ``beta = a``
(``L3.lambda1``), then two layers per further step ``s = 2..S``, the causal multi-step MD of
:func:`mdlens.estimators.causal_md_weights`:

- **Layer 2s = attend with the last estimate.** Position ``t`` attends over positions ``k = m+1..t``
  with the content score ``-d_s <lambda_{s-1}(t), gamma_k>``: bilinear in the query's
  ``L{2s-1}.lambda{s-1}`` and the key's ``L1.responsibility``, so ``W_A`` holds ``-d_s I`` on that
  pair of blocks. Its copy of ``L1.rel`` is ``h_{s-1} = sum_k w_k gamma_k`` (``L4.second_step_mean``,
  ``L6.third_step_mean``).
- **Layer 2s+1 = readout.** As layer 3, with the lag score ``b_s g0 + c_2 h_1 + .. + c_s h_{s-1}`` read
  from ``L2.mean_responsibility`` and the step means: ``lambda_s`` in ``L{2s+1}.lambda{s}``.

Every quantity is a mean over the prefix, so the scales are the same at every position: position
``t`` outputs the estimator on ``y_1..y_t`` with the same ``(a, b_s, c_s, d_s)``. In MD terms the
first step has ``eta_t = a / (m (t - m))``, the step sizes shrink like ``1 / (t - m)`` as for the
one-step model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mdlens import estimators as E
from mdlens.models.disentangled import MAX_LAYERS, DisentangledTransformer
from mdlens.models.layout import ResidualBlock, paper_layer
from mdlens.validation import check_int, check_order, check_positive, check_transition

# Score added to a key that must get zero attention. It only ever meets scores in
# [LOG_ZERO, beta], so exp(MASK_SCORE - max) underflows to exactly 0 in float64 and float32.
MASK_SCORE = -1e9
# Stand-in for log(0) in layer 1's content score. Every positive float64 has log >= -745, so a
# floored entry next to any positive one gets weight exp(<= -9255) == 0 exactly.
LOG_ZERO = -1e4
# beta above this would bring the allowed layer-3 scores close to MASK_SCORE.
MAX_BETA = 1e7
# The most mirror-descent steps a construction can hold: 2S + 1 layers, at most MAX_LAYERS.
MAX_STEPS = (MAX_LAYERS - 1) // 2


def build_md_transformer(
    transition: Float[Tensor, "q q"],
    order: int,
    seq_len: int,
    eta: float,
    dtype: torch.dtype = torch.float64,
) -> DisentangledTransformer:
    """A 3-layer disentangled transformer whose output is one-step MD's predictive, exactly.

    ``model(tokens)[:, -1] == E.predictive(tokens, pi, E.md_weights(tokens, pi, m, eta))`` for
    ``tokens`` of length ``seq_len``; position ``t > m`` (1-based) of the output is one-step MD on
    the prefix ``y_1..y_t`` with ``eta_t = beta / (m (t - m))``, ``beta = eta * m * (seq_len - m)``.
    The model has window ``W = m + 1``, vocabulary ``q``, ``n_ctx = seq_len`` and output type
    ``"probs"``; ``model.layout`` names where each quantity lives (``L1.responsibility``,
    ``L2.mean_responsibility``, ``L3.lag_weights``, ``L3.lagged_tokens``) and
    ``model.md_params`` records ``transition``, ``order``, ``seq_len``, ``eta`` and ``beta``.
    It is ``build_mdk_transformer(transition, order, seq_len, steps=1, scales=(beta,))``.

    Small and zero entries of ``pi``: layer 1 scores ``log pi`` directly, so entries as small as
    1e-8 (or any positive float64) give the responsibilities to rounding error. A zero entry is
    scored ``LOG_ZERO = -1e4``: at a position where at least one lag likelihood
    ``pi(y_{k-g}, y_k)`` is positive, the zero ones get weight exactly 0, as the responsibility
    does. At a position where *every* lag likelihood is zero (tokens this MTD cannot produce) the
    responsibility is 0/0; layer 1 then gives that position the uniform ``1/m`` instead, which is
    not a responsibility, and the output no longer matches one-step MD (``E.responsibilities``
    raises ``ValueError`` on such tokens; the model returns a finite number without complaint).

    Raises ``ValueError`` for a transition that is not a row-stochastic square matrix (a zero
    row included), an order < 1, ``seq_len <= order``, an ``eta`` that is not finite and
    positive, a ``beta`` above 1e7, or a dtype other than float32/float64.
    """
    m = check_order(order)
    seq_len = _check_seq_len(seq_len, m)
    eta = check_positive(eta, "eta")
    beta = E.beta_from_eta(eta, m, seq_len)
    if beta > MAX_BETA:
        raise ValueError(
            f"beta = eta * m * (seq_len - m) = {beta:.3g} exceeds {MAX_BETA:.0e}: layer 3's scores would "
            f"approach the mask ({MASK_SCORE:.0e}); use a smaller eta"
        )
    model = build_mdk_transformer(transition, m, seq_len, steps=1, scales=(beta,), dtype=dtype)
    model.md_params = {**model.md_params, "eta": eta, "beta": beta}
    return model


def build_mdk_transformer(
    transition: Float[Tensor, "q q"],
    order: int,
    seq_len: int,
    steps: int,
    scales,
    dtype: torch.dtype = torch.float64,
) -> DisentangledTransformer:
    """A ``2 steps + 1``-layer disentangled transformer whose output is causal ``steps``-step MD, exactly.

    ``model(tokens)[:, t - 1] == E.predictive(y_1..y_t, pi, E.causal_md_weights(y_1..y_t, pi, m, scales))``
    at every position ``t > m`` (module docstring): the scales ``(a, b2, c2, d2, .., bS, cS, dS)`` act on
    prefix *means*, so they are the same at every position, and the first step's MD step size is
    ``eta_t = a / (m (t - m))``. ``steps = 1`` is :func:`build_md_transformer` with ``beta = a``.

    ``model.layout`` aliases (``s = 1..S``; the ordinal name of step ``s >= 2`` in
    ``E.STEP_MEAN_NAMES``): ``L1.responsibility`` (``gamma_t``), ``L2.mean_responsibility`` (``g0``),
    ``L{2s}.<ordinal>_step_mean`` (``h_{s-1}``, e.g. ``L4.second_step_mean``), ``L{2s+1}.lambda{s}``,
    ``L{2s+1}.lagged_tokens`` (``sum_g lambda_s(g) onehot(y_{t+1-g})``) and ``L{2S+1}.lag_weights``
    (the weights of the prediction). ``model.md_params`` records ``transition``, ``order``,
    ``seq_len``, ``steps`` and ``scales``. Small and zero ``pi`` entries: as :func:`build_md_transformer`.

    Raises ``ValueError`` for a bad transition, order or ``seq_len`` (as :func:`build_md_transformer`),
    ``steps`` outside ``1..MAX_STEPS``, scales that are not ``3 steps - 2`` finite numbers, lag or key
    scores that could reach the mask (``|b_s| + sum |c_r|`` or ``|d_s|`` above 1e7), or a dtype other
    than float32/float64.
    """
    pi = check_transition(transition)
    m = check_order(order)
    seq_len = _check_seq_len(seq_len, m)
    steps, scale = _check_steps_and_scales(steps, scales)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    q = pi.shape[0]

    n_layers = 2 * steps + 1
    model = DisentangledTransformer(q, seq_len, n_layers=n_layers, window=m + 1, dtype=dtype, order=m, output="probs")
    layout = model.layout.with_aliases(_aliases(model.layout, m, steps))
    with torch.no_grad():
        # Start from a blank slate: every trainable term zero, then set what the construction uses.
        layers = {paper_layer(index): _zeroed(block.attn) for index, block in enumerate(model.blocks)}  # 1-based
        _write_responsibility_layers(layers, layout, pi, m, seq_len, dtype)
        for step in range(1, steps + 1):
            _write_step_layers(layers, layout, step, scale, m, seq_len, dtype)
        # Readout: p(v) = sum_g lambda_S(g) pi(y_{t+1-g}, v) = (L{2S+1}.lagged_tokens) @ pi.
        model.unembed.W_U.zero_()
        model.unembed.W_U[layout[f"L{n_layers}.lagged_tokens"]] = pi.to(dtype)

    model.layout = layout
    model.md_params = {
        "transition": pi.clone(),
        "order": m,
        "seq_len": seq_len,
        "steps": steps,
        "scales": list(scale.values()),
    }
    return model


def _check_steps_and_scales(steps: int, scales) -> tuple[int, dict[str, float]]:
    """The number of MD steps (``1..MAX_STEPS``) and its ``3 steps - 2`` scales by name
    (:func:`mdlens.estimators.causal_md_scale_names`), checked to keep every score above the mask."""
    steps = check_int(steps, "steps", 1)
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS} (2 steps + 1 <= {MAX_LAYERS} layers), got {steps}")
    scale_names = E.causal_md_scale_names(steps)
    values = E.check_causal_scales(scales)[0].detach()
    if values.numel() != len(scale_names):
        raise ValueError(
            f"steps={steps} needs {len(scale_names)} scales ({', '.join(scale_names)}), got {values.numel()}"
        )
    scale = dict(zip(scale_names, values.tolist(), strict=True))
    _check_scores_stay_above_mask(scale, steps)
    return steps, scale


def _zeroed(attn):
    """``attn`` (a ``DisentangledAttention``) with every trainable term set to zero."""
    for param in (attn.W_Q, attn.rel_score, attn.key_pos_score, attn.rel_query, attn.rel_value):
        param.zero_()
    return attn


def _masked_unless(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, MASK_SCORE elsewhere, in the model's dtype."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, MASK_SCORE)


def _write_responsibility_layers(layers: dict, layout, pi: Tensor, m: int, seq_len: int, dtype: torch.dtype) -> None:
    """Layers 1 and 2 (``layers`` by the paper's 1-based number): the responsibilities ``gamma_t`` and
    their prefix mean ``g0``."""
    positions = torch.arange(seq_len)  # key_pos_score index j; rel_score index o = i - j
    # Layer 1: score(i, j) = h_i W_A h_j^T = W_A[y_i, y_j] = log pi(y_j, y_i), so W_A = (log pi)^T.
    tokens = layout["tokens"]
    log_pi = torch.where(pi > 0, torch.log(pi), torch.full_like(pi, LOG_ZERO))
    layers[1].W_Q[0, tokens, tokens] = log_pi.T.to(dtype)
    # Keys at offsets 1..m only (offset 0, the query itself, and offsets > m are masked).
    layers[1].rel_score.copy_(_masked_unless((positions >= 1) & (positions <= m), dtype))
    # Value RPE r(o) = e_o: coordinate o of L1.rel receives sum_j A_ij [i - j = o] = gamma_i(o).
    layers[1].rel_value.copy_(torch.eye(m + 1, dtype=dtype))

    # Layer 2: mask the keys at positions 1..m (0-based 0..m-1), no other score: uniform over m+1..t.
    layers[2].key_pos_score.copy_(_masked_unless(positions >= m, dtype))


def _write_step_layers(
    layers: dict, layout, step: int, scale: dict[str, float], m: int, seq_len: int, dtype: torch.dtype
) -> None:
    """The layers of MD step ``step``: layer ``2 step`` (from step 2 on: the step mean ``h_{step-1}``)
    and layer ``2 step + 1`` (the lag weights ``lambda_step`` and the lagged tokens they mix)."""
    positions = torch.arange(seq_len)  # key_pos_score index j; rel_score index o = i - j
    lag_offsets = torch.eye(m, dtype=dtype)  # lag g -> relative offset g - 1 (a readout's rel_query columns)
    if step >= 2:
        # Layer 2s: keys m+1..t, content score -d_s <lambda_{s-1}(query), gamma_k(key)>.
        attend = layers[2 * step]
        attend.key_pos_score.copy_(_masked_unless(positions >= m, dtype))
        last_estimate = layout[f"L{2 * step - 1}.lambda{step - 1}"]
        key_score = -scale[f"d{step}"] * torch.eye(m, dtype=dtype)
        attend.W_Q[0, last_estimate, layout["L1.responsibility"]] = key_score
    # Layer 2s+1: keys at offsets 0..m-1 (lags g = 1..m), the lag score of lag g at offset g - 1.
    readout = layers[2 * step + 1]
    readout.rel_score.copy_(_masked_unless(positions < m, dtype))
    lag_scale = scale["a"] if step == 1 else scale[f"b{step}"]
    readout.rel_query[layout["L2.mean_responsibility"], :m] = lag_scale * lag_offsets
    for earlier in range(2, step + 1):  # + c_r h_{r-1}, r = 2..s
        step_mean = layout[f"L{2 * earlier}.{E.STEP_MEAN_NAMES[earlier]}"]
        readout.rel_query[step_mean, :m] = scale[f"c{earlier}"] * lag_offsets
    # Value RPE r(o) = e_o: coordinate g - 1 of L{2s+1}.rel receives lambda_s(g).
    readout.rel_value.copy_(torch.eye(m + 1, dtype=dtype))


def _check_seq_len(seq_len: int, order: int) -> int:
    try:
        return check_int(seq_len, "seq_len", order + 1)
    except ValueError:
        raise ValueError(
            f"seq_len must be an int > order={order} (positions m+1..T are scored), got {seq_len!r}"
        ) from None


def _check_scores_stay_above_mask(scale: dict[str, float], steps: int) -> None:
    """Every allowed score must stay far from MASK_SCORE: |lag score| <= |b_s| + sum |c_r|, |key score| <= |d_s|."""
    for step in range(1, steps + 1):
        lag_bound = abs(scale["a"] if step == 1 else scale[f"b{step}"])
        lag_bound += sum(abs(scale[f"c{r}"]) for r in range(2, step + 1))
        key_bound = abs(scale[f"d{step}"]) if step >= 2 else 0.0
        if max(lag_bound, key_bound) > MAX_BETA:
            raise ValueError(
                f"step {step}'s scores can reach {max(lag_bound, key_bound):.3g}, above {MAX_BETA:.0e}: they would "
                f"approach the mask ({MASK_SCORE:.0e}); use smaller scales"
            )


def variable_block(variable: str) -> str:
    """The named block where the (k-step) construction keeps causal MD's ``variable``: layer 1 writes
    ``L1.responsibility``, layer 2 ``L2.mean_responsibility``; step ``s`` attends at layer ``2s``
    (``L{2s}.<step mean>``, ``s >= 2``) and reads out ``lambda{s}`` at layer ``2s + 1``."""
    if variable in FIRST_LAYERS_BLOCKS:
        return FIRST_LAYERS_BLOCKS[variable]
    step = E.causal_md_step_of(variable)  # ValueError for a name causal MD does not have
    if variable == "responsibilities":
        raise ValueError("the construction keeps one position's responsibility: 'responsibility' (L1)")
    return f"L{2 * step + 1}.{variable}" if variable.startswith("lambda") else f"L{2 * step}.{variable}"


# Layers 1 and 2, shared by every k-step construction: the responsibilities and their mean.
FIRST_LAYERS_BLOCKS = {"responsibility": "L1.responsibility", "mean_responsibility": "L2.mean_responsibility"}


def _aliases(layout, m: int, steps: int) -> list[ResidualBlock]:
    """The construction's names for its algorithmic quantities (see :func:`build_mdk_transformer`)."""

    def alias(name: str, parent: str, first: int, count: int, meaning: str) -> ResidualBlock:
        start = layout.block(parent).start + first
        return ResidualBlock(name, start, start + count, meaning)

    q = layout.block("tokens").width
    blocks = [
        alias(variable_block("responsibility"), "L1.rel", 1, m, "gamma_t(g), g = 1..m: the lag posterior of y_t"),
        alias(variable_block("mean_responsibility"), "L2.L1.rel", 1, m, "mean of gamma_k(g) over k = m+1..t, g = 1..m"),
    ]
    for step in range(1, steps + 1):
        readout = f"L{2 * step + 1}"
        if step >= 2:
            attend = f"L{2 * step}"
            blocks.append(
                alias(
                    variable_block(E.STEP_MEAN_NAMES[step]),
                    f"{attend}.L1.rel",
                    1,
                    m,
                    f"h_{step - 1} = sum_k w_k gamma_k, w = softmax_k(-d{step} <lambda{step - 1}, gamma_k>)",
                )
            )
        score = "a g0" if step == 1 else f"b{step} g0 + " + " + ".join(f"c{r} h_{r - 1}" for r in range(2, step + 1))
        blocks.append(
            alias(variable_block(f"lambda{step}"), f"{readout}.rel", 0, m, f"lambda{step} = softmax({score})")
        )
        blocks.append(
            alias(f"{readout}.lagged_tokens", f"{readout}.tokens", 0, q, f"sum_g lambda{step}(g) onehot(y_(t+1-g))")
        )
    final = f"L{2 * steps + 1}"
    blocks.append(alias(f"{final}.lag_weights", f"{final}.rel", 0, m, "the lag weights of the prediction"))
    return blocks


def build_tuned_mdk_transformer(
    tokens: Int[Tensor, "batch pos"],
    target_probs: Float[Tensor, "batch q"],
    transition: Float[Tensor, "q q"],
    order: int,
    steps: int,
    starts: list | None = None,
    max_iter: int = 50,
    dtype: torch.dtype = torch.float64,
) -> DisentangledTransformer:
    """The ``steps``-step construction with its scales fitted to a tuning batch of length ``seq_len = T``.

    The scales minimise the batch-mean ``KL(target_probs || predictive)`` of
    :func:`mdlens.estimators.causal_md_weights` (:func:`mdlens.estimators.fit_causal_md_scales`, L-BFGS
    from ``starts``, at most ``max_iter`` iterations each; default
    :func:`mdlens.estimators.default_causal_md_starts`), as tuned MD fits its step size per length.
    ``model.md_params`` also records ``tuning_kl``. Score it on fresh sequences.
    """
    pi = check_transition(transition)
    m = check_order(order)
    if starts is None:
        starts = E.default_causal_md_starts(tokens, pi, m, target_probs, steps)
    fit = E.fit_causal_md_scales(tokens, pi, m, target_probs, starts, max_iter=max_iter)
    model = build_mdk_transformer(pi, m, tokens.shape[-1], steps, fit["scales"], dtype=dtype)
    model.md_params["tuning_kl"] = fit["tuning_kl"]
    return model
