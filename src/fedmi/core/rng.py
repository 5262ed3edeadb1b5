"""Explicit random streams. Every draw takes a generator derived from (stream, seed, ...).

Each use has its own `Stream` tag and a fixed number of key fields, so no two uses can end up
on the same stream (a key of one use is never a prefix or a copy of another's).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from fedmi.errors import FedmiError

MAX_SEED = 2**63 - 1  # seeds travel as signed 64-bit integers (torch.manual_seed, safetensors metadata)


def check_seed(seed: int) -> int:
    """`seed` if it is an integer from 0 to MAX_SEED, else a FedmiError saying so."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FedmiError(f"seed must be an integer from 0 to 2^63-1, got {seed!r}")
    return seed


class Stream(IntEnum):
    REPEAT = 1  # (seed, repeat): the seed of one repeat of an experiment
    SPLIT = 2  # (seed, site): a site's train/test split
    SIMULATION = 3  # (seed,): simulated partitions, scanners, synthetic cohorts
    LOCAL_TRAINING = 4  # (seed, round, site): a site's batches in a round (the tag of core.batches' hash)
    CENTRAL_TRAINING = 5  # (seed, which, site): centralised baselines
    SELECTION = 6  # (seed,): which sites train in each round
    AUGMENTATION = 7  # (seed, round, site, step): a site's random augmentation of one batch
    PRIVACY_NOISE = 8  # (seed, round): the Gaussian noise a differentially private aggregate adds
    SAMPLE_NOISE = 9  # (seed, round, site, step): the noise DP-SGD adds to one step's gradient at a site
    POISSON_BATCHES = 10  # (seed, round, site): which samples a Poisson-sampled batch holds (core.batches' hash)
    UPDATE_NOISE = 11  # (seed, round, site): the noise a site adds to its own update (local DP)


def torch_generator(stream: Stream, *key: int) -> torch.Generator:
    """A torch CPU generator seeded from a stream and key (as `numpy_generator`)."""
    return torch.Generator().manual_seed(derive_seed(stream, *key))


def derive_seed(stream: Stream, *key: int) -> int:
    """A 63-bit seed from a stream tag and non-negative integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(stream), *key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def numpy_generator(stream: Stream, *key: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(stream, *key))


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of one repeat of an experiment: the seed itself for the first, so that a single run
    (`fedmi run`, `fedmi.run`) with seed s is exactly the first repeat of Table II with seed s."""
    return seed if repeat == 0 else derive_seed(Stream.REPEAT, seed, repeat)
