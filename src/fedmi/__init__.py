"""fedmi: federated learning for medical image analysis."""

from fedmi.errors import FedmiError

__all__ = ["FedmiError"]
__version__ = "0.1.0"
