"""One file per method. Classic distillers live in ``kd.py``."""

from mmkd.core import Distiller
from mmkd.distillers.g2sd import G2SDGeneric, G2SDSpecific
from mmkd.distillers.kd import AT, DKD, KD, RKD, FitNets

__all__ = ["AT", "DKD", "Distiller", "FitNets", "G2SDGeneric", "G2SDSpecific", "KD", "RKD"]
