"""Assigning rows to columns of a cost matrix at the least total cost (used to pair heads).

- :func:`min_cost_assignment`: each row and each column used at most once, ``min(rows, cols)``
  pairs (the linear assignment problem, solved by ``scipy.optimize.linear_sum_assignment``);
- :func:`ordered_assignment`: every row placed, with the columns' layers strictly increasing along
  the rows (an order-preserving matching, which the linear assignment does not do): dynamic
  programming over (row, column).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def min_cost_assignment(cost: Float[Tensor, "rows cols"]) -> list[tuple[int, int]]:
    """Pairs ``(row, col)`` sorted by row, each row and column used at most once,
    ``min(rows, cols)`` pairs, minimising the total cost. Among assignments of equal total cost,
    which one is returned is scipy's choice."""
    rows, cols = linear_sum_assignment(cost.detach().to(torch.float64).cpu().numpy())
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def ordered_assignment(
    cost: Float[Tensor, "rows cols"], row_layers: Sequence[int], col_layers: Sequence[int]
) -> list[tuple[int, int]]:
    """Pairs ``(row, col)`` for every row, sorted by row, minimising the total cost under the
    constraint that the columns' layers strictly increase with the rows' layers (row layer ``l`` is
    matched below row layer ``l + 1``).

    Args:
        cost: ``[rows, cols]``.
        row_layers: the layer of each row, strictly increasing (one row per layer).
        col_layers: the layer of each column, in any order.

    Raises:
        ValueError: rows share a layer or are not in layer order, or there are fewer column layers
            than rows.
    """
    n_rows, n_cols = cost.shape
    if len(row_layers) != n_rows or len(col_layers) != n_cols:
        raise ValueError(
            f"row_layers and col_layers must have one entry per row and column of the {n_rows}x{n_cols} cost; "
            f"got {len(row_layers)} and {len(col_layers)}"
        )
    if any(low >= high for low, high in itertools.pairwise(row_layers)):
        raise ValueError(
            f"matching='ordered' needs one reference head per layer, in layer order; got layers {row_layers}"
        )
    inf = float("inf")
    best = [[inf] * n_cols for _ in range(n_rows)]  # best[r][c]: rows 0..r placed, row r on column c
    came_from = [[-1] * n_cols for _ in range(n_rows)]
    for c in range(n_cols):
        best[0][c] = float(cost[0, c])
    for r in range(1, n_rows):
        for c in range(n_cols):
            options = [(best[r - 1][p], p) for p in range(n_cols) if col_layers[p] < col_layers[c]]
            if options:
                value, previous = min(options)
                if value < inf:
                    best[r][c], came_from[r][c] = value + float(cost[r, c]), previous
    last = min(range(n_cols), key=lambda c: best[n_rows - 1][c])
    if best[n_rows - 1][last] == inf:
        raise ValueError("matching='ordered' needs at least as many model layers as reference layers")
    pairs = [(n_rows - 1, last)]
    for r in range(n_rows - 1, 0, -1):
        pairs.append((r - 1, came_from[r][pairs[-1][1]]))
    return sorted(pairs)
