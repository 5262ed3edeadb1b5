"""Client end, client drift under heterogeneous data: local methods that correct where local
training wanders from the federation's objective (SCAFFOLD)."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
