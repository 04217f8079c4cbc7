"""mdlens.hooks: measure any ``HookedTransformer`` against the mirror-descent algorithm.

Everything here reads a model through TransformerLens's hooks and caches (``run_with_cache``,
``run_with_hooks``, ``transformer_lens.patching``), never by reaching into a forward, so it works on
the construction, the shipped disentangled models and plain ``HookedTransformer``s alike.

- targets: :func:`targets` (the algorithm's quantities at every position, ``[B, T, k]``, NaN
  where undefined), :func:`control_target`;
- probes: :func:`fit_probe`, :func:`probe_model` (held-out R^2 with a random-model and a
  control-target control);
- attention: :func:`attention_agreement`, :func:`responsibility_tv`, :func:`offset_mass`,
  :func:`key_score_correlation`;
- heads: :func:`lag_head_scores`, :func:`lag_detection_pattern` (a pattern for TransformerLens's
  ``detect_head``);
- weights: :func:`learned_transition`, :func:`learned_transition_kl`,
  :func:`score_block_correlation`, :func:`weight_alignment`, :func:`softmax_transition_kl` (the
  paper's KL between pi and a softmax of layer 1's scores);
- behaviour: :func:`sensitivity_alignment`, :func:`input_jacobian`, :func:`implicit_weights`,
  :func:`implicit_weights_distances`;
- patching: :func:`patch_mean_responsibility`, :func:`patching_heatmap`,
  :func:`plot_patching_heatmap`;
- construction: :func:`compare_with_construction` (a model against the one-step construction with
  its own step: attention, responsibility, learned pi; :class:`ConstructionComparison`),
  :func:`own_step`;
- causal abstraction: :func:`align_variable` (distributed alignment search for one MD variable at
  one hook: held-out interchange fidelity with its controls), :func:`alignment_scan` (every layer),
  :class:`MDCausalModel` and :func:`high_level_model` (the MD it is compared with);
- views: :func:`attention_view`, :func:`compare_attention_view`, :func:`probe_view` (CircuitsVis and
  HTML that render offline; ``.save(path)``).
"""

from mdlens.hooks.alignment import (
    Alignment,
    AlignmentScan,
    MDCausalModel,
    align_variable,
    alignment_scan,
    high_level_model,
)
from mdlens.hooks.attention import AttentionAgreement, attention_agreement, offset_mass, responsibility_tv
from mdlens.hooks.behaviour import (
    ImplicitWeights,
    closest_mtd_weights,
    implicit_weights,
    implicit_weights_distances,
    input_jacobian,
    sensitivity_alignment,
)
from mdlens.hooks.construction_comparison import ConstructionComparison, compare_with_construction, own_step
from mdlens.hooks.heads import lag_detection_pattern, lag_head_scores
from mdlens.hooks.patching import (
    PatchResult,
    counterfactual_prediction,
    patch_mean_responsibility,
    patching_heatmap,
    plot_patching_heatmap,
)
from mdlens.hooks.probes import Probe, ProbeReport, fit_probe, probe_model
from mdlens.hooks.scores import key_score_correlation
from mdlens.hooks.targets import control_target, targets
from mdlens.hooks.viz import (
    HeadView,
    ProbeView,
    View,
    attention_view,
    compare_attention_view,
    probe_view,
    token_labels,
)
from mdlens.hooks.weights import (
    PAPER_LEARNED_TRANSITION_KL,
    learned_transition,
    learned_transition_kl,
    score_block_correlation,
    softmax_transition_kl,
    token_score_block,
    weight_alignment,
)

__all__ = [
    "PAPER_LEARNED_TRANSITION_KL",
    "Alignment",
    "AlignmentScan",
    "AttentionAgreement",
    "ConstructionComparison",
    "HeadView",
    "ImplicitWeights",
    "MDCausalModel",
    "PatchResult",
    "Probe",
    "ProbeReport",
    "ProbeView",
    "View",
    "align_variable",
    "alignment_scan",
    "attention_agreement",
    "attention_view",
    "closest_mtd_weights",
    "compare_attention_view",
    "compare_with_construction",
    "control_target",
    "counterfactual_prediction",
    "fit_probe",
    "high_level_model",
    "implicit_weights",
    "implicit_weights_distances",
    "input_jacobian",
    "key_score_correlation",
    "lag_detection_pattern",
    "lag_head_scores",
    "learned_transition",
    "learned_transition_kl",
    "offset_mass",
    "own_step",
    "patch_mean_responsibility",
    "patching_heatmap",
    "plot_patching_heatmap",
    "probe_model",
    "probe_view",
    "responsibility_tv",
    "score_block_correlation",
    "sensitivity_alignment",
    "softmax_transition_kl",
    "targets",
    "token_labels",
    "token_score_block",
    "weight_alignment",
]
