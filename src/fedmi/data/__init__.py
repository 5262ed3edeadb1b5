"""Data sources, partitioners and simulated acquisition shift.

Every source returns a `Federation`: an ordered set of `Site`s, each one hospital's (or one
simulated site's) raw features and binary labels.
"""

from fedmi.data.federation import Federation, Site, stratified_test_mask
from fedmi.data.registry import DATASETS, describe_datasets, load_federation

__all__ = ["DATASETS", "Federation", "Site", "describe_datasets", "load_federation", "stratified_test_mask"]
