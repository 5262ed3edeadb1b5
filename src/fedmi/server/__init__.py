"""Server end (survey §V): aggregation steps by family, the pipeline, and site selection.

Every module here registers its steps in `STEPS` when imported; this package imports them all.
"""

from fedmi.core.registry import import_submodules
from fedmi.server.base import STEPS, DeltaTransform, Reducer, ServerOptimizer, Step, UpdateTransform
from fedmi.server.pipeline import AggregationPipeline, RoundAggregation, make_aggregator, parse_pipeline
from fedmi.server.reducers import Mean, WeightedMean
from fedmi.server.robust import (DOS, CoordinateMedian, GeometricMedian, Krum, MultiKrum, NormBound,
                                 TrimmedMean)
from fedmi.server.optimizers import AdaptiveServerOptimizer, FedAdagrad, FedAdam, FedYogi, ServerSGD
from fedmi.server.selection import AllSites, CyclicSelector, FractionSelector, Selector, make_selector
from fedmi.server.weight_aggregation.loss_weighted import LossWeighted
from fedmi.server.domain_shift.guided import Guided
from fedmi.server.domain_shift.qffl import QFFL
from fedmi.server.drift.fednova import FedNova
from fedmi.server.drift.scaffold import Scaffold
from fedmi.server.privacy.dp_mean import FixedMean, GaussianNoise, dp_mean

import_submodules(__name__)

# The names pipelines are written with in code: `weighted_mean() | server_sgd(0.5)`.
weighted_mean, mean, median, krum, server_sgd = WeightedMean, Mean, CoordinateMedian, Krum, ServerSGD
trimmed_mean, multi_krum, geometric_median, norm_bound, dos = TrimmedMean, MultiKrum, GeometricMedian, NormBound, DOS
fedadagrad, fedadam, fedyogi = FedAdagrad, FedAdam, FedYogi
loss_weighted, qffl, guided = LossWeighted, QFFL, Guided
scaffold, fednova = Scaffold, FedNova

__all__ = [
    "STEPS", "AggregationPipeline", "RoundAggregation", "DeltaTransform", "Reducer", "ServerOptimizer", "Step",
    "UpdateTransform",
    "make_aggregator", "parse_pipeline",
    # selection
    "AllSites", "CyclicSelector", "FractionSelector", "Selector", "make_selector",
    # means and server optimisers
    "Mean", "WeightedMean", "ServerSGD", "AdaptiveServerOptimizer", "FedAdagrad", "FedAdam", "FedYogi",
    "mean", "weighted_mean", "server_sgd", "fedadagrad", "fedadam", "fedyogi",
    # survey §V-A and §V-B, drift correction
    "LossWeighted", "QFFL", "Guided", "Scaffold", "FedNova", "loss_weighted", "qffl", "guided", "scaffold", "fednova",
    # survey §VI-A, client-level differential privacy
    "FixedMean", "GaussianNoise", "dp_mean",
    # survey §V-C, robust aggregation
    "CoordinateMedian", "Krum", "DOS", "GeometricMedian", "MultiKrum", "NormBound", "TrimmedMean",
    "median", "krum", "dos", "geometric_median", "multi_krum", "norm_bound", "trimmed_mean",
]
