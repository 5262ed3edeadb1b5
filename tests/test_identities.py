"""Identities that hold only if the federated maths is right."""

from collections import OrderedDict

import torch
import torch.nn.functional as F

from fedmi.client import make_method
from fedmi.client.fedsgd import FedSGD
from fedmi.client.sgd import FedAvg, FedProx
from fedmi.core import params as P
from fedmi.core.batches import LocalSchedule, site_batches
from fedmi.core.tasks import BinaryTask
from fedmi.core.runner import Runner
from fedmi.core.types import RoundInfo
from fedmi.models import build_model
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.core.site_loop import train_site
from fedmi.server import make_aggregator, server_sgd, weighted_mean


def _init(model):
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def test_fedsgd_equals_centralised_full_batch_gradient_descent(three_sites):
    lr, rounds = 0.7, 15
    model = build_model("logistic", (5,), seed=3)
    init = _init(model)
    fed = Runner(SequentialRuntime(model, three_sites), FedSGD(), weighted_mean() | server_sgd(lr),
                 rounds=rounds, evaluate_every=0).run(init).params

    central = build_model("logistic", (5,), seed=3)
    x = torch.cat([s.x_train for s in three_sites])
    y = torch.cat([s.y_train for s in three_sites])
    opt = torch.optim.SGD(central.parameters(), lr=lr)
    for _ in range(rounds):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(central(x), y).backward()
        opt.step()
    assert P.allclose(fed, _init(central), rtol=1e-5, atol=1e-6)
    assert not P.allclose(fed, init)  # it did move


def test_fedavg_equals_a_plain_pytorch_loop(three_sites):
    """fedmi's FedAvg against an independent loop: same batches, same sample-weighted average."""
    rounds, steps, lr, bs = 4, 5, 0.1, 8
    model = build_model("mlp", (5,), seed=0)
    init = _init(model)
    fedmi_params = Runner(SequentialRuntime(model, three_sites),
                          FedAvg(lr=lr, batch_size=bs, local_steps=steps), make_aggregator("fedavg"),
                          rounds=rounds, seed=11, evaluate_every=0).run(init).params

    ref = build_model("mlp", (5,), seed=0)
    global_w = _init(ref)
    n_total = sum(s.num_train for s in three_sites)
    for r in range(rounds):
        new = OrderedDict((k, torch.zeros_like(v)) for k, v in global_w.items())
        for i, s in enumerate(three_sites):
            ref.load_state_dict(global_w)
            opt = torch.optim.SGD(ref.parameters(), lr=lr)
            # The documented batch stream: keyed by (seed, round, the site's position).
            for idx in site_batches(LocalSchedule(bs, steps), s.num_train, i, 11, r):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(ref(s.x_train[idx]), s.y_train[idx]).backward()
                opt.step()
            for k, v in ref.state_dict().items():
                new[k] += v * (s.num_train / n_total)
        global_w = new
    assert P.allclose(fedmi_params, global_w, rtol=1e-4, atol=1e-6)


def test_fedprox_with_mu_zero_equals_fedavg(three_sites):
    """mu = 0 runs the proximal branch with a zero coefficient; it must leave FedAvg's result."""
    def run(trainer):
        model = build_model("logistic", (5,), seed=1)
        return Runner(SequentialRuntime(model, three_sites), trainer, make_aggregator("fedavg"),
                      rounds=5, seed=2, evaluate_every=0).run(_init(model)).params

    fedavg = run(make_method("fedavg", local_steps=None, local_epochs=1))
    assert make_method("fedprox", mu=0.0).mu == 0.0 and not hasattr(make_method("fedavg"), "mu")
    prox0 = run(make_method("fedprox", mu=0.0))
    prox = run(make_method("fedprox", mu=5.0))
    assert P.allclose(fedavg, prox0, rtol=0, atol=0)
    assert not P.allclose(fedavg, prox, rtol=1e-3, atol=1e-4)


def test_fedprox_proximal_gradient_by_hand(three_sites):
    """Two full-batch steps: w2 = w1 - lr * (grad F(w1) + mu * (w1 - w0))."""
    site, lr, mu = three_sites[0], 0.3, 2.0
    model = build_model("logistic", (5,), seed=4)
    w0 = _init(model)
    method = FedProx(mu=mu, lr=lr, batch_size=None, local_steps=2)
    update, _ = train_site(method, model, BinaryTask(), site, w0, None, RoundInfo(0, 1, 0), 0)

    def grad(w):
        m = build_model("logistic", (5,), seed=0)
        m.load_state_dict(w)
        F.binary_cross_entropy_with_logits(m(site.x_train), site.y_train).backward()
        return OrderedDict((k, p.grad.detach()) for k, p in m.named_parameters())

    w1 = P.axpy(-lr, grad(w0), w0)
    g1 = grad(w1)
    w2 = OrderedDict((k, w1[k] - lr * (g1[k] + mu * (w1[k] - w0[k]))) for k in w0)
    assert P.allclose(P.add(w0, update.delta), w2, rtol=1e-5, atol=1e-6)


def test_same_seed_same_result_and_seed_matters(three_sites):
    def run(seed):
        model = build_model("mlp", (5,), seed=seed)
        return Runner(SequentialRuntime(model, three_sites), make_method("fedavg"), make_aggregator("fedavg"),
                      rounds=3, seed=seed, evaluate_every=0).run(_init(model)).params

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not P.allclose(a, c)
