"""mdlens.hooks: measure any ``HookedTransformer`` against the mirror-descent algorithm.

Everything here reads a model through TransformerLens's hooks and caches (``run_with_cache``,
``run_with_hooks``, ``transformer_lens.patching``), never by reaching into a forward, so it works on
the construction, the shipped disentangled models and plain ``HookedTransformer``s alike.

- :func:`targets`: the algorithm's quantities at every position (responsibilities, their mean,
  one- and two-step MD, Bayes, the latent lag), ``[B, T, k]``, NaN where undefined.
- :func:`fit_probe` / :func:`probe_model`: held-out linear probes with controls.
"""

from mdlens.hooks.probes import Probe, ProbeReport, fit_probe, probe_model
from mdlens.hooks.targets import control_target, targets

__all__ = ["Probe", "ProbeReport", "control_target", "fit_probe", "probe_model", "targets"]
