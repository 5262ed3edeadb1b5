"""Flower entry points: fedmi's ServerApp (`server`), ClientApp (`site`) and the flower-sim runner
(`simulation`). They sit above `experiments`: the ServerApp runs a whole fedmi run on Flower's Grid.
Importing this package imports Flower."""

import fedmi.runtime.flower  # noqa: F401  (Flower's telemetry and update checks off before Flower loads)
