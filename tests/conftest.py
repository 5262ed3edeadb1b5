import numpy as np
import pytest
import torch

from fedmi.core.types import SiteData
from fedmi.data.federation import Federation, Site


def make_site_data(name: str, n: int, d: int, seed: int, n_test: int = 10) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(n + n_test, d, generator=g)
    y = (x @ w + 0.5 * torch.randn(n + n_test, generator=g) > 0).float()
    return SiteData(name, x[:n], y[:n], x[n:], y[n:])


@pytest.fixture
def three_sites() -> list[SiteData]:
    """Three sites of different sizes (the weighted mean must weigh them differently)."""
    return [make_site_data("a", 40, 5, 1), make_site_data("b", 25, 5, 2), make_site_data("c", 60, 5, 3)]


@pytest.fixture
def small_federation() -> Federation:
    rng = np.random.default_rng(0)
    sites = []
    for k, n in enumerate((60, 45, 50)):
        x = rng.normal(size=(n, 6)).astype(np.float32) + k * 0.3
        y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=n) > k * 0.3).astype(np.int64)
        sites.append(Site(f"site-{k}", x, y))
    return Federation("toy", sites, kind="tabular")


def tree_leaves(obj):
    """The leaves of nested dicts, lists and tuples (a state, a message), depth first."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from tree_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tree_leaves(v)
    else:
        yield obj


@pytest.fixture(scope="module")
def heart():
    """UCI Heart Disease's four hospitals and their seed-0 splits."""
    from fedmi.data.registry import load_federation

    fed = load_federation("heart-disease", 0)
    return fed, fed.split(0, 0.2)
