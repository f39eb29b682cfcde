"""timm models by name."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from mmkd.core.checkpoint import load_weights


def timm_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 1,
    pretrained: bool = False,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model(name, ...)`` plus optional local weights.

    Args:
        name: any timm model name (``timm.list_models()``).
        num_classes: classifier outputs.
        in_chans: input channels (1 for greyscale).
        pretrained: timm's pretrained weights (needs the hub or timm's cache; never used in tests).
        checkpoint: local ``.safetensors``/``.ckpt``/``.pt`` loaded strictly after creation.
        model_args: extra keyword arguments for the model class, e.g. ``{"channels": [8, 16, 32, 64]}``
            to make a narrow ResNet for 28x28 inputs.
    """
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_args or {})
    )
    if checkpoint:
        load_weights(model, checkpoint)
    return model
