"""Settings of fedmi's runtime on Flower (no Flower import: configs read them without loading Flower)."""

from __future__ import annotations

from pydantic import Field

from fedmi.core.schema import Settings


class DeploymentConfig(Settings):
    """How the server waits for sites on Flower's runtimes (`fedmi submit`, `runtime: flower-sim`)."""

    sites: int | None = Field(None, ge=1)  # start once this many have connected (default: min_sites)
    connect_timeout: float = Field(300.0, gt=0)  # seconds to wait for them
    round_timeout: float = Field(600.0, gt=0)  # seconds a round waits for replies; late ones are left out
    max_message_mb: float | None = Field(None, gt=0)  # larger replies are refused; default 3 x model + 1 MiB
    input_shape: list[int] | None = None  # the model's input when only plain Flower clients connect
