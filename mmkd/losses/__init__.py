"""Distillation losses: plain functions, and small modules with a ``loss_weight``.

A module whose class sets ``needs_labels = True`` is called as ``loss(student, teacher, labels)``.
"""

from mmkd.losses.feature import (
    ATLoss,
    FeatureLoss,
    FitNetsLoss,
    attention_map,
    attention_transfer_loss,
    feature_loss,
    fitnets_loss,
    normalize_target,
)
from mmkd.losses.logit import DKDLoss, KDLoss, dkd_loss, kd_loss
from mmkd.losses.relation import RKDLoss, pairwise_distances, rkd_angle_loss, rkd_distance_loss

__all__ = [
    "ATLoss", "DKDLoss", "FeatureLoss", "FitNetsLoss", "KDLoss", "RKDLoss",
    "attention_map", "attention_transfer_loss", "dkd_loss", "feature_loss", "fitnets_loss",
    "kd_loss", "normalize_target", "pairwise_distances", "rkd_angle_loss", "rkd_distance_loss",
]  # fmt: skip
