"""Client side of the survey's weight-aggregation family (§V-A): methods whose server end is a
plain weighted mean of what the sites choose to send (Progressive Fourier Aggregation)."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
