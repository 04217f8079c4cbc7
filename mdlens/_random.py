"""Gamma and Dirichlet sampling driven by a ``torch.Generator``.

``torch.distributions.Gamma`` / ``Dirichlet`` draw from the global RNG and accept no generator, so
they cannot be seeded per call. These samplers take every random number from the generator they
are given, which makes ``MTDTask`` and the Gibbs sampler reproducible from a seed.

Gamma(a) is drawn with Marsaglia & Tsang (2000): for ``a >= 1`` set ``d = a - 1/3``,
``c = 1 / sqrt(9 d)``, propose ``v = (1 + c x)^3`` with ``x ~ N(0, 1)`` and accept when
``log u < x^2 / 2 + d - d v + d log v`` (``u ~ U(0, 1)``); the draw is ``d v``. For ``a < 1`` the
boost ``Gamma(a) = Gamma(a + 1) * U^(1/a)`` is used. Everything is returned in log space so that
tiny shape parameters (whose draws underflow float64) still give a valid Dirichlet.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def log_gamma_sample(shape_param: Float[Tensor, "*shape"], generator: torch.Generator) -> Float[Tensor, "*shape"]:
    """``log X`` with ``X ~ Gamma(shape_param, 1)`` elementwise (float64, all shapes > 0)."""
    shape_param = shape_param.to(torch.float64)
    if not (shape_param > 0).all():
        raise ValueError("gamma shape parameters must be > 0")
    boosted = shape_param < 1
    a = torch.where(boosted, shape_param + 1, shape_param)  # Marsaglia-Tsang needs a >= 1
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)

    log_draw = torch.empty_like(a)
    pending = torch.ones_like(a, dtype=torch.bool)
    # Each round proposes for every still-pending entry; acceptance is >= 95 % per round, so a
    # handful of rounds finish. The generator is consumed in a fixed order -> deterministic.
    while pending.any():
        idx = pending.nonzero(as_tuple=True)
        d_p, c_p = d[idx], c[idx]
        x = torch.randn(d_p.shape, generator=generator, dtype=torch.float64)
        u = torch.rand(d_p.shape, generator=generator, dtype=torch.float64)
        v = (1.0 + c_p * x) ** 3
        positive = v > 0
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        accept = positive & (torch.log(u) < 0.5 * x * x + d_p - d_p * v + d_p * log_v)
        log_draw[idx] = torch.where(accept, torch.log(d_p) + log_v, log_draw[idx])
        still = pending.clone()
        still[idx] = ~accept
        pending = still

    # Boost for a < 1: log Gamma(a) = log Gamma(a + 1) + log(U) / a.
    if boosted.any():
        u = 1.0 - torch.rand(shape_param.shape, generator=generator, dtype=torch.float64)  # in (0, 1]
        log_draw = torch.where(boosted, log_draw + torch.log(u) / shape_param, log_draw)
    return log_draw


def dirichlet_sample(concentration: Float[Tensor, "*batch k"], generator: torch.Generator) -> Float[Tensor, "*batch k"]:
    """Rows ``~ Dirichlet(concentration)``: independent gammas normalised, computed as a softmax of
    their logs so that no row is ever 0/0."""
    return torch.softmax(log_gamma_sample(concentration, generator), dim=-1)
