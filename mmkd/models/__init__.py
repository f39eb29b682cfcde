"""Model builders. Every builder returns a plain ``nn.Module`` whose module paths are the
library's own, so feature taps address ``layer3`` or ``blocks.7`` exactly as in timm."""

from mmkd.models.adapter import ImageAdapter
from mmkd.models.av import AudioCNN, AVFusionNet, LeNet5
from mmkd.models.detr import DFineDetector, FDRHead
from mmkd.models.clip import CLIPTrainer, ZeroShotClassifier, create_clip, zero_shot_weights
from mmkd.models.mae import MAEPretrainer, MaskedAutoencoder, load_mae_encoder, vit_from_mae
from mmkd.models.ravdess import AudioBranchNet, DualStreamCNN, VisualBranchNet
from mmkd.models.timm_models import imported_model, timm_model, torchvision_model
from mmkd.models.vit import DistilledViT

__all__ = [
    "AVFusionNet", "AudioCNN", "CLIPTrainer", "DFineDetector", "DistilledViT", "FDRHead", "ImageAdapter", "LeNet5", "MAEPretrainer", "MaskedAutoencoder", "ZeroShotClassifier",
    "AudioBranchNet", "DualStreamCNN", "VisualBranchNet",
    "create_clip", "imported_model", "load_mae_encoder", "timm_model", "torchvision_model", "vit_from_mae", "zero_shot_weights",
]  # fmt: skip
