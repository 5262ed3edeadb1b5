"""Server end, domain shift among sites (survey §V-B): aggregation that serves sites whose data differ."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
