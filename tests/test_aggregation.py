import weakref
from collections import OrderedDict

import pytest
import torch

from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.server import krum, mean, median, parse_pipeline, server_sgd, weighted_mean

INFO = RoundInfo(0, 1, 0)


def _u(site, values, n):
    return Update(site, OrderedDict(w=torch.tensor(values, dtype=torch.float32)), n)


def test_weighted_mean_by_hand():
    updates = [_u("a", [1.0, 0.0], 10), _u("b", [4.0, 2.0], 30), _u("c", [-2.0, 6.0], 60)]
    # (10*1 + 30*4 + 60*-2)/100 = 0.1 ; (0 + 60 + 360)/100 = 4.2
    delta = weighted_mean().reduce(updates, OrderedDict(w=torch.zeros(2)))
    assert torch.allclose(delta["w"], torch.tensor([0.1, 4.2]))
    unweighted = mean().reduce(updates, OrderedDict(w=torch.zeros(2)))
    assert torch.allclose(unweighted["w"], torch.tensor([1.0, 8.0 / 3]))


def test_pipeline_applies_server_step():
    params = OrderedDict(w=torch.tensor([1.0, 1.0]))
    updates = [_u("a", [2.0, 0.0], 1), _u("b", [0.0, 4.0], 3)]  # weighted mean [0.5, 3.0]
    pipe = weighted_mean() | server_sgd(0.5)
    new, _ = pipe.aggregate(pipe.init(params), params, updates, INFO)
    assert torch.allclose(new["w"], torch.tensor([1.25, 2.5]))
    assert torch.equal(params["w"], torch.tensor([1.0, 1.0]))  # inputs untouched


def test_default_server_step_is_plain_average():
    params = OrderedDict(w=torch.tensor([1.0]))
    pipe = parse_pipeline("weighted_mean")
    new, _ = pipe.aggregate(pipe.init(params), params, [_u("a", [3.0], 2)], INFO)
    assert torch.allclose(new["w"], torch.tensor([4.0]))


def test_parse_pipeline_text():
    pipe = parse_pipeline("weighted_mean | server_sgd(lr=0.25)")
    assert str(pipe) == "weighted_mean() | server_sgd(lr=0.25)"


@pytest.mark.parametrize("text, message", [
    ("median_of_means", "unknown step"),
    ("weighted_mean | server_sgd(lr=)", "cannot read"),
    ("weighted_mean | server_sgd(rate=1)", "server_sgd"),
    ("weighted_mean | mean", "at most one reducer"),
    ("server_sgd | server_sgd", "at most one reducer and at most one server optimiser"),
])
def test_bad_pipelines_are_clear_errors(text, message):
    with pytest.raises(FedmiError, match=message):
        parse_pipeline(text)


def test_a_pipeline_without_a_reducer_averages_as_fedavg():
    pipe = parse_pipeline("server_sgd(lr=0.5)")
    transforms, reducer, _, optimiser = pipe.parts()
    assert not transforms and reducer.name == "weighted_mean" and optimiser.lr == 0.5


def test_update_boundary_rejects_data_shaped_extras():
    delta = OrderedDict(w=torch.zeros(3))
    with pytest.raises(TypeError, match="no larger than the model"):
        Update("a", delta, 5, extras={"images": torch.zeros(100, 28, 28)})
    with pytest.raises(TypeError, match="scalar"):
        Update("a", delta, 5, metrics={"labels": [0, 1, 1]})
    Update("a", delta, 5, extras={"label_histogram": torch.tensor([2.0, 3.0])})


def _random_updates(k, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Update(f"s{i}", OrderedDict((name, torch.randn(*shape, generator=g)) for name, shape in shapes.items()),
                   int(torch.randint(1, 200, (1,), generator=g)))
            for i in range(k)]


def test_streaming_weighted_mean_equals_batch_formula():
    shapes = {"w": (7, 3), "b": (3,)}
    updates = _random_updates(25, shapes)
    like = OrderedDict((k, torch.zeros(s)) for k, s in shapes.items())
    n = sum(u.num_examples for u in updates)
    for k in shapes:  # the batch formula, all updates stacked at once, in float64
        stacked = torch.stack([u.delta[k].double() * u.num_examples for u in updates])
        expected = stacked.sum(0) / n
        streamed = weighted_mean().reduce(updates, like)[k]
        assert streamed.dtype == torch.float32
        assert torch.allclose(streamed.double(), expected, rtol=1e-5, atol=1e-6)
        reordered = weighted_mean().reduce(updates[::-1], like)[k]
        assert torch.allclose(reordered, streamed, rtol=1e-5, atol=1e-6)


class _TrackedUpdates:
    """Yields updates one at a time and records how many earlier ones are still alive."""

    def __init__(self, k, size):
        self.k, self.size, self.alive_at_yield = k, size, []

    def __iter__(self):
        refs = []  # reference counting frees a dropped update at once; no collector run needed
        for i in range(self.k):
            self.alive_at_yield.append(sum(r() is not None for r in refs))
            u = Update(f"s{i}", OrderedDict(w=torch.full((self.size,), float(i))), 1)
            refs.append(weakref.ref(u.delta["w"]))
            yield u
            del u


def test_streaming_round_holds_one_update_at_a_time():
    params = OrderedDict(w=torch.zeros(1000))
    stream = _TrackedUpdates(20, 1000)
    pipe = weighted_mean() | server_sgd(1.0)
    assert not pipe.needs_all_updates
    new, _ = pipe.aggregate(pipe.init(params), params, stream, INFO)
    assert max(stream.alive_at_yield) <= 1  # only the update being folded
    assert torch.allclose(new["w"], torch.full((1000,), 9.5))
    buffered = _TrackedUpdates(20, 1000)
    pipe = median() | server_sgd(1.0)
    assert pipe.needs_all_updates  # declared: it keeps every update
    new, _ = pipe.aggregate(pipe.init(params), params, buffered, INFO)
    assert buffered.alive_at_yield[-1] == 19
    assert torch.allclose(new["w"], torch.full((1000,), 9.5))


def test_median_by_hand():
    like = OrderedDict(w=torch.zeros(2))
    odd = [_u("a", [1.0, 5.0], 1), _u("b", [2.0, -1.0], 50), _u("c", [10.0, 0.0], 9)]
    assert torch.equal(median().reduce(odd, like)["w"], torch.tensor([2.0, 0.0]))  # weights ignored
    even = [*odd, _u("d", [4.0, 1.0], 1)]  # middle pairs (2, 4) and (0, 1)
    assert torch.equal(median().reduce(even, like)["w"], torch.tensor([3.0, 0.5]))


@pytest.mark.parametrize("block_elements", [1 << 22, 20])  # one block per tensor; many small blocks
def test_median_matches_torch_median(monkeypatch, block_elements):
    from functools import partial

    from fedmi.server import robust

    monkeypatch.setattr(robust.blocks, "column_blocks", partial(robust.blocks.column_blocks, max_elements=block_elements))
    updates = _random_updates(9, {"w": (300,), "b": (4, 5)}, seed=3)
    like = OrderedDict(w=torch.zeros(300), b=torch.zeros(4, 5))
    got = median().reduce(updates, like)
    for k in like:  # an odd count: torch's median is the true median
        assert torch.equal(got[k], torch.stack([u.delta[k] for u in updates]).median(0).values)


def test_krum_by_hand():
    # scalars 0, 1, 3, 10, 11 with f=1: each scores its 2 nearest squared distances:
    # 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 1+49=50, 11: 1+64=65 -> site "1" wins.
    updates = [_u(f"v{v}", [float(v)], 1) for v in (0, 1, 3, 10, 11)]
    like = OrderedDict(w=torch.zeros(1))
    assert torch.allclose(krum(f=1).scores(updates, like), torch.tensor([10.0, 5, 13, 50, 65], dtype=torch.float64))
    assert torch.equal(krum(f=1).reduce(updates, like)["w"], torch.tensor([1.0]))
    assert torch.equal(krum(f=1, m=2).reduce(updates, like)["w"], torch.tensor([0.5]))  # Multi-Krum: 1 and 0
    with pytest.raises(FedmiError, match="at least 5 updates"):
        krum(f=1).reduce(updates[:4], like)
    with pytest.raises(FedmiError, match="krum f"):
        parse_pipeline("krum(f=-1)")


def test_the_chain_keeps_its_order_and_a_delta_transform_acts_on_the_reducers_delta():
    from fedmi.server import GaussianNoise, Mean, NormBound, ServerSGD

    with pytest.raises(FedmiError, match="must come before the reducer"):
        (Mean() | NormBound(max_norm=1.0) | ServerSGD(1.0)).parts()
    with pytest.raises(FedmiError, match="must come before the server optimiser"):
        (Mean() | ServerSGD(1.0) | GaussianNoise(1.0, 1.0)).parts()
    params = OrderedDict(w=torch.zeros(4))
    updates = [Update("a", OrderedDict(w=torch.ones(4)), 1), Update("b", OrderedDict(w=3 * torch.ones(4)), 1)]
    pipe = NormBound(max_norm=1e9) | Mean() | GaussianNoise(clip_norm=1.0, noise_multiplier=0.0) | ServerSGD(0.5)
    assert not pipe.needs_all_updates and len(pipe.init(params)) == 4
    new, _ = pipe.aggregate(pipe.init(params), params, updates, RoundInfo(0, 1, 0))
    assert torch.equal(new["w"], torch.ones(4))  # 0.5 · mean(1, 3); no noise at z = 0
