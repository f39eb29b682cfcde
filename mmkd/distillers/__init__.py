"""One file per method. Classic distillers live in ``kd.py``."""

from mmkd.core import Distiller
from mmkd.distillers.dfine import DFine
from mmkd.distillers.dho import DHO, DualHeadStudent, dual_head_clip_student
from mmkd.distillers.g2sd import G2SDGeneric, G2SDSpecific
from mmkd.distillers.kd import AT, DKD, KD, RKD, FitNets
from mmkd.distillers.mst import MSTDistill

__all__ = ["AT", "DFine", "DHO", "DKD", "Distiller", "DualHeadStudent", "FitNets", "G2SDGeneric", "G2SDSpecific", "KD", "MSTDistill", "RKD", "dual_head_clip_student"]
