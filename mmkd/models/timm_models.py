"""timm and torchvision models by name, and any model by the import path of its builder, with
optional local weights."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from mmkd.core.checkpoint import load_weights
from mmkd.core.imports import import_object


def timm_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 1,
    pretrained: bool = False,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    checkpoint_drop_head: bool = False,
    checkpoint_prefix: str | None = None,
    checkpoint_ema: bool = True,
) -> nn.Module:
    """``timm.create_model(name, ...)`` plus optional local weights.

    Args:
        name: any timm model name (``timm.list_models()``).
        num_classes: classifier outputs.
        in_chans: input channels (1 for greyscale).
        pretrained: timm's pretrained weights (needs the hub or timm's cache; never used in tests).
        checkpoint: local weights loaded strictly after creation: ``.safetensors``, a ``.pth``/``.bin``
            state dict, a timm training checkpoint (``state_dict``/``state_dict_ema``), a dict with
            ``model``, or a Lightning ``.ckpt`` of an mmkd run (of a ``Distiller``: its student);
            a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix on every key is
            stripped (see :func:`mmkd.core.checkpoint.load_state_dict_file`).
        model_args: extra keyword arguments for the model class, e.g. ``{"channels": [8, 16, 32, 64]}``
            to make a narrow ResNet for 28x28 inputs.
        checkpoint_drop_head: load everything but the classifier (the modules named by the model's
            ``pretrained_cfg["classifier"]``, as timm does), which stays newly initialised: an
            ImageNet backbone for a student of ``num_classes`` other classes.
        checkpoint_prefix: load only the file's keys under this prefix, stripped of it (e.g.
            ``"backbone."``).
        checkpoint_ema: of a timm checkpoint with EMA weights, load those (timm's default).
    """
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(model_args or {})
    )
    if checkpoint:
        load_weights(model, checkpoint, checkpoint_prefix, drop_head=checkpoint_drop_head, use_ema=checkpoint_ema)
    return model


def torchvision_model(
    name: str,
    num_classes: int = 10,
    checkpoint: str | None = None,
    model_args: dict[str, Any] | None = None,
    checkpoint_drop_head: bool = False,
    checkpoint_prefix: str | None = None,
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` plus optional local
    weights, as :func:`timm_model` (torchvision's own pretrained weights would be downloaded; save
    them to a file elsewhere and pass it as ``checkpoint``).

    Args:
        name: a torchvision classification model (``torchvision.models.list_models()``), e.g.
            ``"resnet18"``.
        num_classes: classifier outputs.
        checkpoint: local weights, in any form :func:`timm_model` reads.
        model_args: extra keyword arguments of the model builder (e.g. ``{"width_per_group": 32}``).
        checkpoint_drop_head: load everything but the classifier (the model's last ``nn.Linear``:
            ``fc`` of a ResNet), which stays newly initialised.
        checkpoint_prefix: load only the file's keys under this prefix, stripped of it.
    """
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        near = difflib.get_close_matches(name, names, n=5)
        raise ValueError(f"unknown torchvision classification model {name!r}; close names: {near}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **(model_args or {}))
    if checkpoint:
        load_weights(model, checkpoint, checkpoint_prefix, drop_head=checkpoint_drop_head)
    return model


def imported_model(
    builder: str,
    model_args: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    checkpoint_drop_head: bool = False,
    checkpoint_prefix: str | None = None,
) -> nn.Module:
    """The model that ``builder(**model_args)`` returns, plus optional local weights.

    ``class_path`` alone takes a class or a factory whose return annotation is an ``nn.Module``;
    many libraries' factories have none (torchdistill's ``resnet20``, for one), which jsonargparse
    refuses. This takes any callable by its import path and checks what it returns.

    Args:
        builder: ``"package.module.name"`` of a class or function, e.g.
            ``"torchdistill.models.classification.resnet.resnet20"``.
        model_args: its keyword arguments, e.g. ``{"num_classes": 10}``.
        checkpoint: local weights, in any form :func:`timm_model` reads.
        checkpoint_drop_head: load everything but the classifier (the model's last ``nn.Linear``).
        checkpoint_prefix: load only the file's keys under this prefix, stripped of it.
    """
    model = import_object(builder, "builder")(**(model_args or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"{builder}(**{model_args or {}}) returned a {type(model).__name__}, not an nn.Module")
    if checkpoint:
        load_weights(model, checkpoint, checkpoint_prefix, drop_head=checkpoint_drop_head)
    return model
