"""Explicit random streams. Every draw takes a generator derived from (seed, purpose ...)."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)


def torch_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*key))


def numpy_generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*key))
