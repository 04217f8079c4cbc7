"""The exact one-step mirror-descent construction (paper-notes §4) as a ``DisentangledTransformer``.

Three layers, one arrow of "responsibilities -> mean over the sequence -> softmax" each:

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
Positions ``t <= m`` have no full lag window: their outputs mean nothing.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mdlens._validation import check_order, check_positive, check_transition
from mdlens.models.disentangled import DisentangledTransformer
from mdlens.models.layout import ResidualBlock

# Score added to a key that must get zero attention. It only ever meets scores in
# [LOG_ZERO, beta], so exp(MASK_SCORE - max) underflows to exactly 0 in float64 and float32.
MASK_SCORE = -1e9
# Stand-in for log(0) in layer 1's content score. Every positive float64 has log >= -745, so a
# floored entry next to any positive one gets weight exp(<= -9255) == 0 exactly.
LOG_ZERO = -1e4
# beta above this would bring the allowed layer-3 scores close to MASK_SCORE.
MAX_BETA = 1e7


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
    pi = check_transition(transition)
    m = check_order(order)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= m:
        raise ValueError(f"seq_len must be an int > order={m} (positions m+1..T are scored), got {seq_len!r}")
    eta = check_positive(eta, "eta")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    beta = eta * m * (seq_len - m)
    if beta > MAX_BETA:
        raise ValueError(
            f"beta = eta * m * (seq_len - m) = {beta:.3g} exceeds {MAX_BETA:.0e}: layer 3's scores would "
            f"approach the mask ({MASK_SCORE:.0e}); use a smaller eta"
        )
    q = pi.shape[0]

    model = DisentangledTransformer(q, seq_len, n_layers=3, window=m + 1, dtype=dtype, order=m, output="probs")
    layout = model.layout
    tokens = layout["tokens"]
    offsets = torch.arange(seq_len)  # rel_score index o = i - j; key_pos_score index j
    positions = torch.arange(seq_len)

    def masked_unless(allowed: Tensor) -> Tensor:
        """0 where allowed, MASK_SCORE elsewhere, in the model's dtype."""
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, MASK_SCORE)

    with torch.no_grad():
        # Start from a blank slate: every trainable term zero, then set what the construction uses.
        for block in model.blocks:
            attn = block.attn
            for param in (attn.W_Q, attn.rel_score, attn.key_pos_score, attn.rel_query, attn.rel_value):
                param.zero_()
        layer1, layer2, layer3 = (block.attn for block in model.blocks)

        # Layer 1: score(i, j) = h_i W_A h_j^T = W_A[y_i, y_j] = log pi(y_j, y_i), so W_A = (log pi)^T.
        log_pi = torch.where(pi > 0, torch.log(pi), torch.full_like(pi, LOG_ZERO))
        layer1.W_Q[0, tokens, tokens] = log_pi.T.to(dtype)
        # Keys at offsets 1..m only (offset 0, the query itself, and offsets > m are masked).
        in_lag_window = (offsets >= 1) & (offsets <= m)
        layer1.rel_score.copy_(masked_unless(in_lag_window))
        # Value RPE r(o) = e_o: coordinate o of L1.rel receives sum_j A_ij [i - j = o] = gamma_i(o).
        layer1.rel_value.copy_(torch.eye(m + 1, dtype=dtype))

        # Layer 2: mask the keys at positions 1..m (0-based 0..m-1), no other score: uniform over m+1..t.
        layer2.key_pos_score.copy_(masked_unless(positions >= m))

        # Layer 3: keys at offsets 0..m-1 (lags g = 1..m); score beta * Gamma_bar(g) at offset g - 1,
        # read from the query's copy of L1.rel made by layer 2 (coordinate g = lag g).
        layer3.rel_score.copy_(masked_unless(offsets < m))
        mean_rel = layout["L2.L1.rel"]
        for lag in range(1, m + 1):
            layer3.rel_query[mean_rel.start + lag, lag - 1] = beta
        # Value RPE r(o) = e_o: coordinate g - 1 of L3.rel receives lambda_g.
        layer3.rel_value.copy_(torch.eye(m + 1, dtype=dtype))

        # Readout: p(v) = sum_g lambda_g pi(y_{t+1-g}, v) = (L3.tokens) @ pi.
        model.unembed.W_U.zero_()
        model.unembed.W_U[layout["L3.tokens"]] = pi.to(dtype)

    def alias(name: str, parent: str, first: int, count: int, meaning: str) -> ResidualBlock:
        start = layout.block(parent).start + first
        return ResidualBlock(name, start, start + count, meaning)

    model.layout = layout.with_aliases(
        [
            alias("L1.responsibility", "L1.rel", 1, m, "gamma_t(g), g = 1..m: the lag posterior of y_t"),
            alias("L2.mean_responsibility", "L2.L1.rel", 1, m, "mean of gamma_k(g) over k = m+1..t, g = 1..m"),
            alias("L3.lag_weights", "L3.rel", 0, m, "lambda_g = softmax(beta * mean responsibility), g = 1..m"),
            alias("L3.lagged_tokens", "L3.tokens", 0, q, "sum_g lambda_g onehot(y_{t+1-g})"),
        ]
    )
    model.md_params = {"transition": pi.clone(), "order": m, "seq_len": seq_len, "eta": eta, "beta": beta}
    return model
