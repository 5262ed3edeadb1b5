"""Server end (survey §V): aggregation pipelines and site selection."""

from fedmi.server.aggregation import (
    AggregationPipeline,
    CoordinateMedian,
    Krum,
    Mean,
    RoundAggregation,
    ServerSGD,
    WeightedMean,
    krum,
    make_aggregator,
    mean,
    median,
    parse_pipeline,
    server_sgd,
    weighted_mean,
)
from fedmi.server.selection import AllSites, FractionSelector, Selector

__all__ = [
    "AggregationPipeline", "AllSites", "CoordinateMedian", "FractionSelector", "Krum", "Mean", "RoundAggregation",
    "Selector", "ServerSGD", "WeightedMean", "krum", "make_aggregator", "mean", "median", "parse_pipeline",
    "server_sgd", "weighted_mean",
]
