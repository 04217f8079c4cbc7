"""The old home of the models' TransformerLens glue, now split by job; these names still import from
here for the modules that have not moved to the new homes yet:

- :class:`~mdlens.models.base.MDLensTransformer` (``mdlens.models.base``, also ``mdlens.models``);
- reading a raw output (``OUTPUT_TYPES``, ``check_output_type``, ``output_to_probs``,
  ``probs_cross_entropy``): ``mdlens.models.outputs``;
- ``DTYPES``, ``resolve_dtype``, ``dtype_name``: ``mdlens.models.dtypes``;
- building without side effects (``quiet_hooked_transformer_deprecation``, ``preserve_global_rng``):
  ``mdlens.models.building``;
- ``check_model_input_tokens``: ``mdlens.validation.check_context_tokens``.
"""

from mdlens.models.base import MDLensTransformer
from mdlens.models.building import DEPRECATION_MESSAGE, preserve_global_rng, quiet_hooked_transformer_deprecation
from mdlens.models.dtypes import DTYPES, dtype_name, resolve_dtype
from mdlens.models.outputs import OUTPUT_TYPES, check_output_type, output_to_probs, probs_cross_entropy
from mdlens.validation import check_context_tokens as check_model_input_tokens

__all__ = [
    "DEPRECATION_MESSAGE",
    "DTYPES",
    "OUTPUT_TYPES",
    "MDLensTransformer",
    "check_model_input_tokens",
    "check_output_type",
    "dtype_name",
    "output_to_probs",
    "preserve_global_rng",
    "probs_cross_entropy",
    "quiet_hooked_transformer_deprecation",
    "resolve_dtype",
]
