"""Model builders. Every builder returns a plain ``nn.Module`` whose module paths are the
library's own, so feature taps address ``layer3`` or ``blocks.7`` exactly as in timm."""

from mmkd.models.timm_models import timm_model

__all__ = ["timm_model"]
