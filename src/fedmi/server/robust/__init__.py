"""Byzantine-robust aggregation (survey §V-C): steps that bound what a few bad sites can do.

Every step here needs the round's updates at once (O(sites x model) server memory):

- `median`, `trimmed_mean` (Yin et al. 2018): coordinate-wise robust statistics.
- `krum`, `multi_krum` (Blanchard et al. 2017; El Mhamdi et al. 2018): keep the updates that lie
  closest to their neighbours.
- `geometric_median` (Pillutla et al. 2022, RFA): the point of least summed distance, by Weiszfeld.
- `norm_bound` (Sun et al. 2019): an update transform that clips each update's norm.
- `dos` (Alkhunaizi et al. 2022): weights sites by softmax(-COPOD outlier score) of their distances.

`blocks.column_blocks` stacks the updates a block of coordinates at a time, for all of them.
"""

from fedmi.core.registry import import_submodules
from fedmi.server.robust.blocks import column_blocks
from fedmi.server.robust.dos import DOS, copod_scores
from fedmi.server.robust.geometric_median import GeometricMedian
from fedmi.server.robust.krum import Krum, MultiKrum
from fedmi.server.robust.median import CoordinateMedian, TrimmedMean
from fedmi.server.robust.norm_bound import NormBound

import_submodules(__name__)

__all__ = ["DOS", "CoordinateMedian", "GeometricMedian", "Krum", "MultiKrum", "NormBound", "TrimmedMean",
           "column_blocks", "copod_scores"]
