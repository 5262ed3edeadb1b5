from collections import OrderedDict

import pytest
import torch

from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.server.aggregation import mean, parse_pipeline, server_sgd, weighted_mean

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
    ("server_sgd(lr=1)", "exactly one reducer"),
    ("weighted_mean | mean", "exactly one reducer"),
])
def test_bad_pipelines_are_clear_errors(text, message):
    with pytest.raises(FedmiError, match=message):
        parse_pipeline(text)


def test_update_boundary_rejects_data_shaped_extras():
    delta = OrderedDict(w=torch.zeros(3))
    with pytest.raises(TypeError, match="no larger than the model"):
        Update("a", delta, 5, extras={"images": torch.zeros(100, 28, 28)})
    with pytest.raises(TypeError, match="scalar"):
        Update("a", delta, 5, metrics={"labels": [0, 1, 1]})
    Update("a", delta, 5, extras={"label_histogram": torch.tensor([2.0, 3.0])})
