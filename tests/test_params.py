from collections import OrderedDict

import pytest
import torch

from fedmi.core import params as P
from fedmi.errors import FedmiError


def _p(a, b):
    return OrderedDict(w=torch.tensor(a, dtype=torch.float32), b=torch.tensor(b, dtype=torch.float32))


def test_arithmetic_and_flatten_roundtrip():
    x, y = _p([[1.0, 2.0], [3.0, 4.0]], [0.5]), _p([[1.0, 1.0], [1.0, 1.0]], [1.5])
    assert torch.equal(P.add(x, y)["w"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert torch.equal(P.sub(x, y)["b"], torch.tensor([-1.0]))
    assert torch.equal(P.axpy(2.0, y, x)["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(P.scale(x, 2.0)["b"], torch.tensor([1.0]))
    assert torch.equal(P.zeros_like(x)["w"], torch.zeros(2, 2))
    c = P.clone(x)
    c["w"] += 1
    assert torch.equal(x["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # a clone shares no storage
    flat = P.flatten(x)
    assert flat.tolist() == [1.0, 2.0, 3.0, 4.0, 0.5]
    assert P.allclose(P.unflatten(flat, x), x)
    assert P.l2_norm(x) == pytest.approx((1 + 4 + 9 + 16 + 0.25) ** 0.5)
    assert P.num_parameters(x) == 5


def test_save_load_roundtrip(tmp_path):
    x = _p([[1.0, 2.0]], [3.0])
    P.save(x, tmp_path / "m.safetensors", metadata={"round": "3"})
    y = P.load(tmp_path / "m.safetensors")
    assert list(y) == ["w", "b"] and P.allclose(x, y)
    with pytest.raises(FedmiError, match="no parameter file"):
        P.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "candidate, message",
    [
        (OrderedDict(w=torch.zeros(1, 2)), "names differ"),
        (OrderedDict(w=torch.zeros(2, 2), b=torch.zeros(1)), "shape"),
        (OrderedDict(w=torch.zeros(1, 2, dtype=torch.float64), b=torch.zeros(1)), "dtype"),
        (OrderedDict(w=torch.tensor([[float("nan"), 0.0]]), b=torch.zeros(1)), "NaN"),
        (OrderedDict(w=torch.tensor([[float("inf"), 0.0]]), b=torch.zeros(1)), "NaN or Inf"),
    ],
)
def test_check_compatible_rejects(candidate, message):
    with pytest.raises(FedmiError, match=message):
        P.check_compatible(candidate, _p([[1.0, 2.0]], [3.0]), "update from site x")


def test_a_saved_model_has_the_same_bytes_every_time(tmp_path):
    """safetensors writes its metadata from a hash map, in a new order at each save; fedmi sorts it."""
    import hashlib

    p = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(2)}
    meta = {"dataset": "heart-disease", "model": "logistic", "rounds": "3", "seed": "0"}
    digests = set()
    for i in range(12):
        P.save(p, tmp_path / f"m{i}.safetensors", metadata=meta)
        digests.add(hashlib.sha256((tmp_path / f"m{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    back = P.load(tmp_path / "m0.safetensors")
    assert list(back) == ["b.weight", "a.bias"] and torch.equal(back["b.weight"], p["b.weight"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m0.safetensors"), framework="pt") as f:
        assert {k: v for k, v in f.metadata().items() if k != "fedmi.order"} == meta
