"""Column blocks: the robust reducers' view of K updates as a (coordinates x K) matrix, in pieces.

A robust statistic is taken across the sites for each coordinate (median, trimmed mean) or from
sums over the coordinates (Krum's distances, the geometric median's). Stacking the updates one
block of columns at a time bounds the working set beyond the updates themselves.

The reducers call `blocks.column_blocks` through this module, so a test can make the blocks small
for the whole family with one patch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import Update


def column_blocks(updates: Sequence[Update], like: P.ParamsT, max_elements: int = 1 << 22
                  ) -> Iterable[tuple[str, slice, torch.Tensor]]:
    """(name, columns, columns x K matrix of the updates' values) for blocks of each tensor.

    Stacking block by block keeps the working set to about `max_elements` beyond the updates.
    """
    width = max(1, max_elements // len(updates))
    for k, ref in like.items():
        n = ref.numel()
        for start in range(0, n, width):
            cols = slice(start, min(n, start + width))
            yield k, cols, torch.stack([u.delta[k].reshape(-1)[cols] for u in updates], dim=1)
