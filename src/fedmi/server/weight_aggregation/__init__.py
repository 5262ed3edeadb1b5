"""Server end, weight aggregation (survey §V-A): reducers that choose how much each site's update counts."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
