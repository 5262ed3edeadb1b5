"""Data sources, partitioners and simulated acquisition shift.

Every dataset returns a `Federation`: an ordered set of `Site`s, each one hospital's (or one
simulated site's) raw features and labels, and the task the labels define. Each module here
registers its datasets in `DATASETS` when imported; this package imports them all.
"""

from fedmi.core.registry import import_submodules
from fedmi.data.federation import Federation, Site, stratified_test_mask
from fedmi.data.registry import DATASETS, Dataset, DatasetOptions, dataset_options, describe_datasets, load_federation

import_submodules(__name__)

__all__ = ["DATASETS", "Dataset", "DatasetOptions", "Federation", "Site", "dataset_options", "describe_datasets",
           "load_federation", "stratified_test_mask"]
