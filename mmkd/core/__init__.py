"""The distillation core: frozen teacher, feature taps, the Distiller LightningModule."""

from mmkd.core.cache import TeacherCache, TeacherCacheError, build_teacher_cache
from mmkd.core.checkpoint import load_state_dict_file, load_weights, sha256_file, state_dict_sha256
from mmkd.core.class_map import ClassMap, ClassMapError, build_class_map
from mmkd.core.classifier import Classifier, NonFiniteLossError, TrainingModule
from mmkd.core.distiller import LOGITS, Distiller, LossTerm
from mmkd.core.taps import FeatureTap, UnknownModulePathError, get_module
from mmkd.core.teacher import Teacher

__all__ = [
    "LOGITS", "ClassMap", "ClassMapError", "Classifier", "Distiller", "FeatureTap", "LossTerm", "NonFiniteLossError", "Teacher",
    "TeacherCache", "TeacherCacheError", "TrainingModule", "UnknownModulePathError", "build_class_map", "build_teacher_cache", "get_module", "load_state_dict_file", "load_weights", "sha256_file",
    "state_dict_sha256",
]  # fmt: skip
