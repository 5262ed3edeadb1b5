"""The robust aggregation family (survey §V-C): each test is a property the maths must have."""

import math
from collections import OrderedDict
from functools import partial

import pytest
import torch

from fedmi.core import params as P
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.server import (DOS, GeometricMedian, MultiKrum, NormBound, TrimmedMean, dos, geometric_median, krum,
                          mean, median, multi_krum, norm_bound, parse_pipeline, trimmed_mean)
from fedmi.server.robust import blocks, copod_scores
from fedmi.server.robust.dos import distance_matrices

INFO = RoundInfo(0, 1, 0)


def _u(site, values, n=1):
    return Update(site, OrderedDict(w=torch.as_tensor(values, dtype=torch.float32)), n)


def _like(d):
    return OrderedDict(w=torch.zeros(d))


def _honest(k, d, seed=0, spread=0.1):
    """k similar updates: one shared direction plus small site noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    return [_u(f"h{i}", base + spread * torch.randn(d, generator=g), int(torch.randint(1, 50, (1,), generator=g)))
            for i in range(k)]


def _stack(updates):
    return torch.stack([u.delta["w"] for u in updates])


# --- coordinate-wise: median, trimmed mean ---------------------------------------------------------------------

def _with_two_outliers(d=20):
    """n = 7: five honest updates and f = 2 huge ones, on the same side in some coordinates and apart in others."""
    honest = _honest(5, d, seed=1, spread=1.0)
    same_side = torch.full((d,), 1e6)
    mixed = torch.where(torch.arange(d) % 2 == 0, -1e6, 1e6)
    return honest, [honest[0], _u("bad1", same_side), *honest[1:3], _u("bad2", mixed), *honest[3:]]


@pytest.mark.parametrize("reducer", [median(), trimmed_mean(beta=0.3)])  # beta = 0.3: b = floor(2.1) = 2 = f
def test_coordinatewise_stays_within_honest_range(reducer):
    honest, updates = _with_two_outliers()
    got = reducer.reduce(updates, _like(20))["w"]
    lo, hi = _stack(honest).min(0).values, _stack(honest).max(0).values
    assert bool(((lo <= got) & (got <= hi)).all())


def test_trimmed_mean_trimming_fewer_than_f_is_dragged_out():
    honest, updates = _with_two_outliers()  # beta = 0.2: b = 1 < f = 2, so one outlier survives where both agree
    got = trimmed_mean(beta=0.2).reduce(updates, _like(20))["w"]
    assert float(got.abs().max()) > 1e5


def test_trimmed_mean_by_hand():
    # coordinate 0: 1, 2, 3, 100, -50 -> drop -50 and 100 -> 2;  coordinate 1: 5, 5, 0, 1, 10 -> (1 + 5 + 5) / 3
    updates = [_u("a", [1.0, 5.0], 9), _u("b", [2.0, 5.0]), _u("c", [3.0, 0.0]), _u("d", [100.0, 1.0]),
               _u("e", [-50.0, 10.0])]
    got = trimmed_mean(beta=0.2).reduce(updates, _like(2))["w"]  # K = 5: b = floor(1.0) = 1; sizes ignored
    assert torch.allclose(got, torch.tensor([2.0, 11.0 / 3]))
    got = trimmed_mean(beta=0.2).reduce(updates[:4], _like(2))["w"]  # K = 4: b = floor(0.8) = 0, the mean
    assert torch.allclose(got, torch.tensor([106.0 / 4, 11.0 / 4]))


def test_trimmed_mean_beta_zero_is_the_mean():
    updates = _honest(6, 30, seed=2, spread=1.0)
    assert torch.allclose(trimmed_mean(beta=0.0).reduce(updates, _like(30))["w"],
                          mean().reduce(updates, _like(30))["w"], atol=1e-6)


def test_small_column_blocks_change_nothing(monkeypatch):
    g = torch.Generator().manual_seed(3)
    updates = [Update(f"s{i}", OrderedDict(w=torch.randn(50, generator=g), b=torch.randn(3, 4, generator=g)), i + 1)
               for i in range(7)]
    like = OrderedDict(w=torch.zeros(50), b=torch.zeros(3, 4))
    steps = [median(), trimmed_mean(beta=0.2), geometric_median(), dos()]
    whole = [s.reduce(updates, like) for s in steps]
    monkeypatch.setattr(blocks, "column_blocks", partial(blocks.column_blocks, max_elements=20))
    for step, expected in zip(steps, whole):
        assert P.allclose(step.reduce(updates, like), expected, atol=1e-6), step
    trimmed = trimmed_mean(beta=0.2).reduce(updates, like)["w"]  # b = 1, straight from torch.sort
    assert torch.allclose(trimmed, _stack(updates).sort(0).values[1:-1].mean(0))


# --- Krum and Multi-Krum -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_krum_never_selects_a_far_outlier(seed):
    honest = _honest(6, 10, seed=seed)
    bad = _u("bad", -10 * honest[0].delta["w"])
    for at in (0, 3, 6):
        updates = [*honest[:at], bad, *honest[at:]]
        got = krum(f=1).reduce(updates, _like(10))["w"]
        assert not torch.equal(got, bad.delta["w"])
        assert any(torch.equal(got, h.delta["w"]) for h in honest)


def test_multi_krum_keeps_exactly_the_honest_updates():
    honest = _honest(5, 10, seed=4)
    far = [_u("bad1", torch.full((10,), 1e3)), _u("bad2", torch.full((10,), -1e3))]
    updates = [honest[0], far[0], *honest[1:4], far[1], honest[4]]
    got = multi_krum(f=2).reduce(updates, _like(10))  # m = K - f = 5
    assert torch.equal(got["w"], mean().reduce(honest, _like(10))["w"])
    assert torch.equal(multi_krum(f=2, m=1).reduce(updates, _like(10))["w"],
                       krum(f=2).reduce(updates, _like(10))["w"])  # m = 1 is Krum


def test_multi_krum_needs_enough_updates():
    assert multi_krum(f=2).min_updates() == 7
    assert multi_krum(f=0, m=4).min_updates() == 4
    with pytest.raises(FedmiError, match="m=4 needs at least 4"):
        multi_krum(f=0, m=4).reduce(_honest(3, 2), _like(2))


# --- geometric median --------------------------------------------------------------------------------------------

def test_geometric_median_of_symmetric_points_is_the_centre():
    g = torch.Generator().manual_seed(5)
    centre = torch.randn(8, generator=g)
    updates = []
    for i, n in enumerate((3, 10, 40)):  # each pair +-v shares a size; the pairs differ
        v = torch.randn(8, generator=g) * (i + 1)
        updates += [_u(f"p{i}", centre + v, n), _u(f"m{i}", centre - v, n)]
    assert torch.allclose(geometric_median().reduce(updates, _like(8))["w"], centre, atol=1e-5)


def test_geometric_median_of_collinear_points_is_the_middle_one():
    v = torch.tensor([1.0, -2.0, 0.5])
    updates = [_u("a", 0 * v), _u("b", 1 * v), _u("c", 10 * v)]  # weighted mean 11/3 v; median v
    assert torch.allclose(geometric_median().reduce(updates, _like(3))["w"], v, atol=1e-5)


def test_geometric_median_minimises_the_weighted_distance_sum():
    g = torch.Generator().manual_seed(6)
    points = torch.randn(7, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5])
    sizes = [1, 5, 2, 8, 3, 3, 9]
    updates = [_u(f"s{i}", p, n) for i, (p, n) in enumerate(zip(points, sizes))]
    z = geometric_median(tol=1e-12, max_iter=1000).reduce(updates, _like(5))["w"].double()
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    diff = points.double() - z
    grad = -(w[:, None] * diff / diff.norm(dim=1, keepdim=True)).sum(0)  # zero at the minimiser
    assert float(grad.norm()) < 1e-4

    def objective(y):
        return float((w * (points.double() - y).norm(dim=1)).sum())

    weighted_mean = (w[:, None] * points.double()).sum(0)
    assert objective(z) < objective(weighted_mean)
    for i in range(5):  # no nudge along an axis does better
        for s in (1e-3, -1e-3):
            assert objective(z) <= objective(z + s * torch.eye(5, dtype=torch.float64)[i]) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_geometric_median_resists_one_far_outlier(seed):
    honest = _honest(4, 6, seed=seed)
    # As large as the largest honest site; still under half the weight, which the median tolerates.
    updates = [*honest, _u("bad", torch.full((6,), 1e6), max(u.num_examples for u in honest))]
    got = geometric_median().reduce(updates, _like(6))["w"]
    lo, hi = _stack(honest).min(0).values, _stack(honest).max(0).values
    assert bool(((lo - 1e-5 <= got) & (got <= hi + 1e-5)).all())


# --- norm bounding -----------------------------------------------------------------------------------------------

def _norm_updates(norms):
    g = torch.Generator().manual_seed(7)
    out = []
    for i, r in enumerate(norms):
        w, b = torch.randn(4, generator=g), torch.randn(2, generator=g)
        s = r / math.sqrt(float((w ** 2).sum() + (b ** 2).sum()))
        out.append(Update(f"s{i}", OrderedDict(w=w * s, b=b * s, steps=torch.tensor(5)), 1))
    return out


def _bounded(step, updates):
    out, state = step.transform(updates, step.init(None), INFO)
    assert state is None and [u.site for u in out] == [u.site for u in updates]
    return out


def test_norm_bound_clips_to_max_norm():
    norms = [0.5, 2.0, 3.0, 10.0]
    updates = _norm_updates(norms)
    out = _bounded(norm_bound(max_norm=2.5), updates)
    for u, before, r in zip(out, updates, norms):
        assert NormBound.norm(u) == pytest.approx(min(r, 2.5), rel=1e-6)
        s = min(1.0, 2.5 / r)
        assert all(torch.allclose(u.delta[k], before.delta[k] * s) for k in ("w", "b"))  # same direction
        assert torch.equal(u.delta["steps"], torch.tensor(5))  # a count, not scaled
    assert out[0] is updates[0]  # within the bound: passed on as it came


@pytest.mark.parametrize("norms, factor, bound", [
    ([1.0, 2.0, 3.0, 4.0, 100.0], 1.5, 4.5),  # median 3
    ([1.0, 2.0, 4.0, 8.0], 1.0, 3.0),  # even count: median (2 + 4) / 2
])
def test_norm_bound_factor_uses_the_median_norm(norms, factor, bound):
    out = _bounded(norm_bound(factor=factor), _norm_updates(norms))
    assert [NormBound.norm(u) for u in out] == pytest.approx([min(r, bound) for r in norms], rel=1e-6)


# --- DOS ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_dos_suppresses_a_sign_flipped_scaled_update(seed):
    honest = _honest(5, 50, seed=seed)
    bad = _u("bad", -10 * honest[0].delta["w"])
    updates = [*honest[:2], bad, *honest[2:]]
    a = dos().weights(updates, _like(50))
    assert float(a.sum()) == pytest.approx(1.0)
    others = torch.cat([a[:2], a[3:]])
    assert float(a[2]) < 0.01 * float(others.mean())
    assert float(a[2]) < float(others.min())
    # Why: the outlier is the extreme of every column of both distance matrices on the skewed side,
    # so its COPOD score is the largest possible, K log K.
    for dist in distance_matrices(updates, _like(50)):
        scores = copod_scores(dist)
        assert float(scores[2]) == pytest.approx(6 * math.log(6))
        assert int(scores.argmax()) == 2
    got = dos().reduce(updates, _like(50))["w"]
    expected = sum(float(ai) * u.delta["w"].double() for ai, u in zip(a, updates))
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_dos_gives_identical_updates_equal_weights():
    same = [_u(f"s{i}", [0.3, -1.2, 2.5], 10 * i + 1) for i in range(5)]
    a = dos().weights(same, _like(3))
    assert torch.allclose(a, torch.full((5,), 0.2, dtype=torch.float64))
    assert torch.allclose(dos().reduce(same, _like(3))["w"], same[0].delta["w"])


def test_copod_by_hand():
    # One feature, values 0, 1, 2, 10: left tails 1/4, 2/4, 3/4, 1; right tails 1, 3/4, 2/4, 1/4;
    # skewness > 0, so the skew-corrected tail is the right one, and O = max(-log left, -log right).
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    expected = torch.tensor([math.log(4), math.log(2), math.log(2), math.log(4)], dtype=torch.float64)
    assert torch.allclose(copod_scores(x), expected)
    # Two features, the second skewed left: p_l = p_r = -log[1/4, 2/4, 3/4, 1] - log[1, 3/4, 2/4, 1/4] and
    # p_s = -2 log[1, 3/4, 2/4, 1/4] (right tail of the first, left of the second). The three sums are
    # compared, so O = [log 4, log 2 + log 4/3, 2 log 2, 2 log 4], not the sum of per-feature maxima (2 log 4, ...).
    x2 = torch.cat([x, -x], dim=1)
    expected = torch.tensor([math.log(4), math.log(2) + math.log(4 / 3), 2 * math.log(2), 2 * math.log(4)],
                            dtype=torch.float64)
    assert torch.allclose(copod_scores(x2), expected)


# --- integer entries, pipelines, arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("step", [trimmed_mean(beta=0.2), geometric_median(), dos(), multi_krum(f=1)])
def test_integer_entries_keep_their_dtype(step):
    updates = [Update(f"s{i}", OrderedDict(w=torch.randn(3), steps=torch.tensor(4 + i % 2)), 2) for i in range(5)]
    like = OrderedDict(w=torch.zeros(3), steps=torch.tensor(0))
    got = step.reduce(updates, like)
    assert got["w"].dtype == torch.float32 and got["steps"].dtype == torch.int64
    assert 4 <= int(got["steps"]) <= 5


def test_every_step_parses_and_runs_in_a_pipeline():
    pipe = parse_pipeline("norm_bound(max_norm=1.0) | trimmed_mean(beta=0.2)")
    assert [type(s) for s in pipe.steps] == [NormBound, TrimmedMean]
    assert str(pipe) == "norm_bound(max_norm=1.0, factor=None) | trimmed_mean(beta=0.2)"
    for text, kind in [
        ("multi_krum(f=1, m=3)", MultiKrum), ("geometric_median(eps=1e-8, max_iter=50)", GeometricMedian),
        ("dos", DOS), ("norm_bound(factor=2.0) | geometric_median", GeometricMedian), ("trimmed_mean", TrimmedMean),
    ]:
        assert isinstance(parse_pipeline(text).parts()[1], kind)
    assert parse_pipeline("multi_krum(f=2) | server_sgd(lr=0.5)").min_updates() == 7

    params = OrderedDict(w=torch.ones(3))
    updates = [_u("a", [1.0, 0.0, 0.0]), _u("b", [0.0, 1.0, 0.0]), _u("c", [30.0, 40.0, 0.0])]  # c clipped to norm 5
    pipe = parse_pipeline("norm_bound(max_norm=5.0) | mean | server_sgd(lr=1.0)")
    assert not pipe.needs_all_updates  # a fixed bound clips each update as it arrives
    new, _ = pipe.aggregate(pipe.init(params), params, updates, INFO)
    assert torch.allclose(new["w"], torch.tensor([1 + 4 / 3, 1 + 5 / 3, 1.0]))
    buffered = parse_pipeline("norm_bound(factor=1e9) | norm_bound(max_norm=5.0) | mean | server_sgd(lr=1.0)")
    assert buffered.needs_all_updates  # the round's median norm needs the whole list: the same result
    assert torch.equal(buffered.aggregate(buffered.init(params), params, updates, INFO)[0]["w"], new["w"])


@pytest.mark.parametrize("text, message", [
    ("trimmed_mean(beta=0.6)", "trimmed_mean beta must be .* < 0.5"),
    ("trimmed_mean(beta=-0.1)", "trimmed_mean beta"),
    ("norm_bound(max_norm=-1.0)", "norm_bound max_norm must be .* > 0"),
    ("norm_bound(factor=0)", "norm_bound factor"),
    ("norm_bound(max_norm=1.0, factor=2.0)", "exactly one of max_norm"),
    ("norm_bound", "exactly one of max_norm"),
    ("multi_krum(m=0)", "multi_krum m"),
    ("multi_krum(f=-1)", "multi_krum f"),
    ("geometric_median(eps=0)", "geometric_median eps"),
    ("geometric_median(max_iter=0)", "geometric_median max_iter"),
    ("geometric_median(tol=-1.0)", "geometric_median tol"),
    ("dos(k=3)", "dos"),
])
def test_bad_arguments_are_clear_errors(text, message):
    with pytest.raises(FedmiError, match=message):
        parse_pipeline(text)
