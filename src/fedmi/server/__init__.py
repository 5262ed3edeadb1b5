"""Server end (survey §V): aggregation pipelines and site selection."""

from fedmi.server.aggregation import (
    AggregationPipeline,
    Mean,
    ServerSGD,
    WeightedMean,
    make_aggregator,
    mean,
    parse_pipeline,
    server_sgd,
    weighted_mean,
)
from fedmi.server.selection import AllSites, FractionSelector, Selector

__all__ = [
    "AggregationPipeline", "AllSites", "FractionSelector", "Mean", "Selector", "ServerSGD",
    "WeightedMean", "make_aggregator", "mean", "parse_pipeline", "server_sgd", "weighted_mean",
]
