"""Membership inference on a trained model: can an attacker tell the records it was trained on from
others of the same population? (survey §VI-A(3).)

The loss-threshold attack (Yeom, Giacomelli, Fredrikson and Jha, CSF 2018): a record whose loss
under the model is low was probably in its training set; the attacker's score is −loss. Reported
as Carlini et al. (S&P 2022, "Membership Inference Attacks From First Principles") argue: the ROC
AUC, and the true-positive rate at a low false-positive rate (1 % and 0.1 %), where an attack that
is right about a few records with confidence shows, though its AUC is near 0.5. A rate below
1 / (number of non-members) cannot be resolved by the records at hand and is reported as None.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedmi.errors import FedmiError

LOW_FPRS = (0.01, 0.001)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float, negatives: int) -> float | None:
    """The highest TPR over the ROC's thresholds whose FPR is at most `target`; None where `target`
    is finer than one negative in `negatives`."""
    if target < 1.0 / negatives:
        return None
    return float(tpr[fpr <= target].max())


def loss_threshold_attack(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> dict:
    """The loss-threshold attack's success at telling members from non-members.

    Args:
      member_losses: each training record's loss under the model.
      nonmember_losses: each held-out record's loss.
    Returns:
      {"auc", "tpr_at_1%", "tpr_at_0.1%", "members", "nonmembers"}.
    Example: ``loss_threshold_attack(train_losses, test_losses)["auc"]``
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    members, others = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if len(members) == 0 or len(others) == 0:
        raise FedmiError("membership inference needs members and non-members, got "
                         f"{len(members)} and {len(others)}")
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise FedmiError("membership inference: a loss is not finite (the model diverged)")
    truth = np.r_[np.ones(len(members)), np.zeros(len(others))]
    score = -np.r_[members, others]
    fpr, tpr, _ = roc_curve(truth, score)
    out = {"auc": float(roc_auc_score(truth, score)), "members": len(members), "nonmembers": len(others)}
    for target in LOW_FPRS:
        out[f"tpr_at_{target:.1%}".replace(".0%", "%")] = tpr_at_fpr(fpr, tpr, target, len(others))
    return out
