"""Partitioners: split one dataset into simulated sites.

Each returns one index array per site; every sample lands in exactly one site.
"""

from __future__ import annotations

import numpy as np

from fedmi.errors import FedmiError


def _check(num_sites: int, n: int, min_size: int) -> None:
    if num_sites < 1:
        raise FedmiError(f"number of sites must be at least 1, got {num_sites}")
    if num_sites * min_size > n:
        raise FedmiError(f"cannot give {num_sites} sites {min_size} samples each from {n} samples")


def iid(n: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-sized sites."""
    _check(num_sites, n, 1)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_sites)]


def dirichlet_label_skew(
    y: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator, min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: for each class c, site proportions p_c ~ Dir(alpha * 1_K) (Hsu et al. 2019).

    Small alpha gives sites dominated by one class; large alpha approaches IID. Draws are
    repeated until every site holds at least `min_size` samples.
    """
    if alpha <= 0:
        raise FedmiError(f"Dirichlet alpha must be positive, got {alpha}")
    _check(num_sites, len(y), min_size)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise FedmiError(
        f"Dirichlet label skew with alpha={alpha} could not give {num_sites} sites {min_size} samples "
        f"each in {max_tries} draws; raise alpha or lower the number of sites"
    )


def quantity_skew(
    n: int, num_sites: int, alpha: float, rng: np.random.Generator, min_size: int = 10
) -> list[np.ndarray]:
    """Quantity skew: site sizes proportional to q ~ Dir(alpha * 1_K), labels IID within sites."""
    if alpha <= 0:
        raise FedmiError(f"Dirichlet alpha must be positive, got {alpha}")
    _check(num_sites, n, min_size)
    q = rng.dirichlet(np.full(num_sites, alpha))
    sizes = min_size + np.floor(q * (n - num_sites * min_size)).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the remainder of the floor
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


PARTITIONERS = ("iid", "dirichlet", "quantity")


def partition(kind: str, y: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator,
              min_size: int = 10) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(y), num_sites, rng)
    if kind == "dirichlet":
        return dirichlet_label_skew(y, num_sites, alpha, rng, min_size)
    if kind == "quantity":
        return quantity_skew(len(y), num_sites, alpha, rng, min_size)
    raise FedmiError(f"unknown partition '{kind}'; choose one of {', '.join(PARTITIONERS)}")
