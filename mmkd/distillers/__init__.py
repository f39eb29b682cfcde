"""One file per method. Classic distillers live in ``kd.py``."""

from mmkd.core import Distiller
from mmkd.distillers.kd import AT, DKD, KD, RKD, FitNets

__all__ = ["AT", "DKD", "Distiller", "FitNets", "KD", "RKD"]
