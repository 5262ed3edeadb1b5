"""Differential privacy: budgets (`accountant`) and, built on them, the mechanisms a run applies.

A layer of its own between `core` and the method packages (client, server), which use it.
"""

from fedmi.privacy.accountant import GaussianRounds, PrivacyAccountant, calibrate_noise, gaussian_epsilon
from fedmi.privacy.mechanisms import clip_to_norm, float_norm, gaussian_noise_like

__all__ = ["GaussianRounds", "PrivacyAccountant", "calibrate_noise", "gaussian_epsilon", "clip_to_norm", "float_norm",
           "gaussian_noise_like"]
