"""Composition scores (Elhage et al. 2021) that include the disentangled transformer's position terms.

TransformerLens's ``model.all_composition_scores(mode)`` scores a head ``h1`` (layer ``l1``) against
a head ``h2`` of a later layer ``l2 > l1`` by

    score = ||W M||_F / (||W||_F ||M||_F),

with the *writer* ``W = W_OV^{h1} = W_V W_O`` (residual -> residual, row vectors as in
TransformerLens) and the *reader* ``M = W_QK^{h2} = W_Q W_K^T`` for Q-composition (``x W_QK``
reads ``x`` as the query), ``W_QK^T`` for K-composition (key side), ``W_OV^{h2}`` for V. ``W M`` is
the part of what ``h2`` reads that ``h1`` writes. Only content maps enter.

A disentangled head has two more maps, one on each side:

- **writer ``R = rel_value @ W_O[d_model:]``** (``[W, d_model]``). Besides its OV copy of the residual,
  the head writes the value RPE ``sum_j A_ij r(i - j)`` into its block ``L{l}.rel``: a linear map
  from the attention-averaged offset one-hot ``e_{i-j}`` to the residual. The construction's layer 1
  writes the responsibilities this way, not through ``W_OV``.
- **query-side reader ``U = rel_query``** (``[d_model, W]``). The score has the query-dependent
  relative term ``h_i . U[:, i - j] = h_i U e_{i-j}``: ``U`` reads the query residual as ``W_QK``
  does, but maps it to offsets instead of keys. The construction's layer 3 reads the mean
  responsibility that layer 2 copied (``L2.L1.rel``) this way; its ``W_QK`` is zero.

The other position terms (``rel_score``, ``key_pos_score``, the value RPE's input) read positions,
not the residual: K- and V-readers are TransformerLens's. So a head's whole output map is
``[h ; e] -> [W_OV ; R]`` and its whole query-side read ``h -> [W_QK | U]``, and
:func:`composition_scores` returns every writer term against every reader term, plus, as ``total``,
Elhage's score of the stacked maps,

    total = ||[W_OV ; R] [W_QK | U]||_F / (||[W_OV ; R]||_F ||[W_QK | U]||_F),

where ``||[W_OV ; R] [W_QK | U]||_F^2`` is the sum of the four terms' squared norms ``||W_a M_b||_F^2``.
On a standard ``HookedTransformer`` there are no position terms and ``total`` is TransformerLens's
``all_composition_scores`` (MLPs and LayerNorm ignored, as there).

Reading the numbers. The disentangled ``W_OV`` is a copy map: a partial isometry of rank
``r = D_{l-1}`` that moves the whole residual before layer ``l`` into a fresh block. ``||W M||_F`` is
then the Frobenius mass of ``M`` on the rows of that block, and the Frobenius score is at most
``1/sqrt(r)``: it ranks which earlier block a later layer reads, it is not an absolute strength.
``normalization="spectral"`` divides by the writer's largest singular value instead,
``||W M||_F / (sigma_max(W) ||M||_F)``, which lies in ``[0, 1]`` (``||W M||_F <= sigma_max(W) ||M||_F``)
and, for a copy map, is exactly the fraction of the reader's mass on the block the writer fills.

Zero matrices (the construction's ``W_QK`` in layers 2-3, its unused ``rel_query`` and
``rel_value``) make the ratio 0/0, where TransformerLens returns NaN without a word. Here the score
is 0 (the composed map is zero: nothing composes) and one warning names the zero matrices.

Every mdlens model's own ``model.all_composition_scores(mode)`` returns ``composition_scores(model,
mode).total`` (:class:`~mdlens.models.base.MDLensTransformer`), so a TransformerLens notebook gets these
scores; ``HookedTransformer.all_composition_scores(model, mode)`` is still TransformerLens's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens.models.disentangled import DisentangledAttention

KINDS = ("Q", "K", "V")
NORMALIZATIONS = ("frobenius", "spectral")


@dataclass(frozen=True)
class CompositionScores:
    """Scores of every head ``(l1, h1)`` against every head ``(l2, h2)`` of a later layer.

    ``total`` and each ``terms[name]`` are ``[n_layers, n_heads, n_layers, n_heads]`` float64,
    indexed like TransformerLens's ``all_composition_scores`` (0-based layers), zero where
    ``l2 <= l1``. Term names are ``"{writer}->{reader}"``: writers ``"ov"`` and, on disentangled
    models, ``"rel_value"``; readers ``"qk"`` and ``"rel_query"`` (Q), ``"qk"`` (K, its key side),
    ``"ov"`` (V).
    """

    kind: str
    normalization: str
    total: Float[Tensor, "layer1 head1 layer2 head2"]
    terms: dict[str, Float[Tensor, "layer1 head1 layer2 head2"]]


def composition_scores(model: HookedTransformer, kind: str, normalization: str = "frobenius") -> CompositionScores:
    """Q-, K- or V-composition scores with the disentangled position terms (module docstring).

    Args:
        model: any ``HookedTransformer``; disentangled layers add the ``rel_value`` writer and,
            for ``kind="Q"``, the ``rel_query`` reader.
        kind: ``"Q"``, ``"K"`` or ``"V"``.
        normalization: ``"frobenius"`` (Elhage et al., TransformerLens) or ``"spectral"`` (the
            writer's largest singular value in place of its Frobenius norm).
    """
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"model must be a HookedTransformer, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        writers = [[_writers(block.attn, h) for h in range(n_heads)] for block in model.blocks]
        readers = [[_readers(block.attn, h, kind) for h in range(n_heads)] for block in model.blocks]

    shape = (n_layers, n_heads, n_layers, n_heads)
    names = {(a, b): f"{a}->{b}" for a in writers[0][0] for b in readers[0][0]}
    terms = {name: torch.zeros(shape, dtype=torch.float64) for name in names.values()}
    total = torch.zeros(shape, dtype=torch.float64)
    zero = set()  # the zero matrices met, named for the warning
    for l1 in range(n_layers - 1):
        for h1 in range(n_heads):
            writer = writers[l1][h1]
            writer_norms = {a: _writer_norm(w, normalization) for a, w in writer.items()}
            writer_total = _writer_norm(torch.cat(list(writer.values())), normalization)
            zero |= {f"{a} of blocks.{l1} head {h1}" for a, norm in writer_norms.items() if norm == 0}
            for l2 in range(l1 + 1, n_layers):
                for h2 in range(n_heads):
                    reader = readers[l2][h2]
                    reader_norms = {b: torch.linalg.matrix_norm(m).item() for b, m in reader.items()}
                    zero |= {f"{b} of blocks.{l2} head {h2}" for b, norm in reader_norms.items() if norm == 0}
                    squared = 0.0
                    for (a, b), name in names.items():
                        composed = torch.linalg.matrix_norm(_matmul(writer[a], reader[b])).item()
                        squared += composed**2
                        terms[name][l1, h1, l2, h2] = _ratio(composed, writer_norms[a], reader_norms[b])
                    reader_total = sum(norm**2 for norm in reader_norms.values()) ** 0.5
                    total[l1, h1, l2, h2] = _ratio(squared**0.5, writer_total, reader_total)
    if zero:
        warnings.warn(
            f"{kind}-composition: these matrices are zero, so every score with them is 0 (the composed "
            f"map is zero; TransformerLens's all_composition_scores divides 0 by 0 there and returns NaN): "
            + ", ".join(sorted(zero)),
            stacklevel=2,
        )
    return CompositionScores(kind=kind, normalization=normalization, total=total, terms=terms)


def _writers(attn, head: int) -> dict[str, Float[Tensor, "input d_model"]]:
    """What a head writes: ``"ov"`` (``W_V W_O``, residual -> residual) and, on a disentangled
    layer, ``"rel_value"`` (``rel_value @ W_O[d_model:]``, offset one-hot -> residual)."""
    W_O = _float64(attn.W_O[head])
    writers = {"ov": _matmul(_float64(attn.W_V[head]), W_O)}
    if isinstance(attn, DisentangledAttention):
        writers["rel_value"] = _matmul(_float64(attn.rel_value), W_O[attn.cfg.d_model :])
    return writers


def _readers(attn, head: int, kind: str) -> dict[str, Float[Tensor, "d_model output"]]:
    """What a head reads on the ``kind`` side, as maps from the residual (rows)."""
    W_Q, W_K = _float64(attn.W_Q[head]), _float64(attn.W_K[head])
    if kind == "Q":
        readers = {"qk": _matmul(W_Q, W_K.T)}
        if isinstance(attn, DisentangledAttention):
            readers["rel_query"] = _float64(attn.rel_query)
        return readers
    if kind == "K":
        return {"qk": _matmul(W_K, W_Q.T)}
    return {"ov": _matmul(_float64(attn.W_V[head]), _float64(attn.W_O[head]))}


def _float64(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.float64)


def _matmul(a: Float[Tensor, "n k"], b: Float[Tensor, "k p"]) -> Float[Tensor, "n p"]:
    """``a @ b``, computed only over the inner indices where ``a``'s column and ``b``'s row are both
    non-zero, and only for the rows and columns they reach. The same matrix; on a disentangled
    model, whose layers read and write a few blocks of a wide residual, a fraction of the work."""
    inner = a.ne(0).any(dim=0) & b.ne(0).any(dim=1)
    a, b_inner = a[:, inner], b[inner]
    rows, cols = a.ne(0).any(dim=1), b_inner.ne(0).any(dim=0)
    out = a.new_zeros(a.shape[0], b.shape[1])
    out[rows[:, None] & cols[None, :]] = (a[rows] @ b_inner[:, cols]).reshape(-1)
    return out


def _writer_norm(writer: Tensor, normalization: str) -> float:
    if normalization == "frobenius":
        return torch.linalg.matrix_norm(writer).item()
    # Largest singular value, on the non-zero rows and columns (the rest adds only zero ones).
    block = writer[writer.ne(0).any(dim=1)][:, writer.ne(0).any(dim=0)]
    return torch.linalg.matrix_norm(block, ord=2).item() if block.numel() else 0.0


def _ratio(composed: float, writer_norm: float, reader_norm: float) -> float:
    """``composed / (writer_norm * reader_norm)``; 0 when either norm is 0 (then so is ``composed``)."""
    if writer_norm == 0 or reader_norm == 0:
        return 0.0
    return composed / (writer_norm * reader_norm)


__all__ = ["CompositionScores", "composition_scores"]
