"""Server end, privacy (survey §VI-A): aggregates that are differentially private."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
