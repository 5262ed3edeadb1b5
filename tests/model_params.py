"""Helpers the tests share about a model's parameters."""

from fedmi.core import params as P


def initial(model):
    """A model's parameters and buffers, copied: a run's starting point."""
    return P.Params((k, v.detach().clone()) for k, v in model.state_dict().items())
