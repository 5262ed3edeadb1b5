"""Server end (survey §V): aggregation steps by family, the pipeline, and site selection.

Every module here registers its steps in `STEPS` when imported; this package imports them all.
"""

from fedmi.core.registry import import_submodules
from fedmi.server.base import STEPS, Reducer, ServerOptimizer, Step, UpdateTransform
from fedmi.server.pipeline import AggregationPipeline, RoundAggregation, make_aggregator, parse_pipeline
from fedmi.server.reducers import Mean, WeightedMean
from fedmi.server.robust import CoordinateMedian, Krum
from fedmi.server.optimizers import ServerSGD
from fedmi.server.selection import AllSites, FractionSelector, Selector, make_selector

import_submodules(__name__)

# The names pipelines are written with in code: `weighted_mean() | server_sgd(0.5)`.
weighted_mean, mean, median, krum, server_sgd = WeightedMean, Mean, CoordinateMedian, Krum, ServerSGD

__all__ = [
    "STEPS", "AggregationPipeline", "AllSites", "CoordinateMedian", "FractionSelector", "Krum", "Mean", "Reducer",
    "RoundAggregation", "Selector", "ServerOptimizer", "ServerSGD", "Step", "UpdateTransform", "WeightedMean",
    "krum", "make_aggregator", "make_selector", "mean", "median", "parse_pipeline", "server_sgd", "weighted_mean",
]
