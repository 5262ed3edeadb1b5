"""Server end, client drift and unequal local work: SCAFFOLD's control variates and FedNova's
normalised averaging."""

from fedmi.core.registry import import_submodules

import_submodules(__name__)
