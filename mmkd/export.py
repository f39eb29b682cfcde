"""Exporting a trained student to ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mmkd.core.checkpoint import load_state, load_state_dict_file


def student_from_checkpoint(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """``model`` (the student built from a config) with the student weights of a Lightning
    checkpoint, a consolidated or sharded FSDP2 checkpoint, or a weights file."""
    load_state(model, load_state_dict_file(checkpoint), str(checkpoint))
    return model.eval()


PREPROCESSING_KEY, CLASS_NAMES_KEY = "mmkd.preprocessing", "mmkd.class_names"  # ONNX metadata_props


def image_preprocessing(datamodule: Any, key: str) -> dict[str, Any] | None:
    """How the images of ``datamodule`` reach a model's input ``key``, as a ``ViewSpec`` dict
    (size, channels, mean, std, interpolation, crop_pct): a file data module's view of that key,
    or an in-memory image set's whole images at their stored size with its normalisation. None
    for inputs that are not images."""
    from mmkd.data.views import ViewSpec

    views = getattr(datamodule, "views", None)
    if isinstance(views, dict) and isinstance(views.get(key), ViewSpec):
        return views[key].as_dict()
    shape, mean, std = (getattr(datamodule, name, None) for name in ("input_shape", "mean", "std"))
    if key != "image" or not isinstance(shape, tuple) or len(shape) != 3 or mean is None or std is None:
        return None
    return ViewSpec(size=tuple(shape[1:]), channels=shape[0], mean=mean, std=std, interpolation="bilinear", crop_pct=1.0).as_dict()


def example_batch(datamodule: Any, key: str, size: int = 8) -> torch.Tensor:
    """Up to ``size`` inputs ``key`` of the first split the data has among validation, test and
    training (a run trained without a validation split is still exported and checked)."""
    for stage, split, loader in (("validate", "val", "val_dataloader"), ("test", "test", "test_dataloader"), ("fit", "train", "train_dataloader")):
        datamodule.setup(stage)
        splits = getattr(datamodule, "splits", None)
        if isinstance(splits, dict) and not len(splits.get(split) or ()):
            continue
        batch = next(iter(getattr(datamodule, loader)()), None)
        if batch is not None:
            return batch[key][:size]
    raise ValueError("the data module has no validation, test or training samples to check the ONNX model on")


def export_metadata(preprocessing: dict[str, Any] | None, class_names: Sequence[str] | None) -> dict[str, str]:
    """ONNX metadata that lets a reader prepare inputs and name outputs as training did (``mmkd
    predict --onnx`` reads it; onnxruntime gives it as ``get_modelmeta().custom_metadata_map``)."""
    metadata = {}
    if preprocessing:
        metadata[PREPROCESSING_KEY] = json.dumps(preprocessing)
    if class_names:
        metadata[CLASS_NAMES_KEY] = json.dumps([str(name) for name in class_names])
    return metadata


@torch.no_grad()
def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 18, input_name: str = "image", metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` (in eval mode) to ONNX with a dynamic batch dimension: input ``input_name``,
    output ``output``, whatever the model's ``forward`` returns (a dict of tensors, as a
    detector's ``pred_logits`` and ``pred_boxes``: one output per key, named by it). What a model
    computes in ``forward`` is in the graph: DHO's head mix with its alpha and beta, G2SD's mean
    of the class and distillation heads. ``metadata`` goes to the model's ``metadata_props``
    (see :func:`export_metadata`). Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.eval()
    outputs = model(example)
    tensors = outputs.values() if isinstance(outputs, dict) else [outputs]
    if not all(isinstance(value, torch.Tensor) for value in tensors):
        raise ValueError(
            f"{type(model).__name__} returns {type(outputs).__name__}, not a tensor or a dict of tensors: export takes "
            "students whose forward returns predictions (a classifier's logits, a detector's boxes and scores)"
        )
    output_names = list(outputs) if isinstance(outputs, dict) else ["output"]
    batch = torch.export.Dim("batch", min=1)
    for name in ("torch.onnx", "onnxscript"):  # the exporter narrates every pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        model, (example,), input_names=[input_name], output_names=output_names, opset_version=opset,
        dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
    )  # fmt: skip
    program.model.metadata_props.update(metadata or {})
    program.save(str(tmp), external_data=False)
    tmp.replace(path)
    return path


def onnx_max_difference(model: nn.Module, path: str | Path, inputs: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between onnxruntime's outputs for ``inputs`` and PyTorch's."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in inputs:
            outputs = model.eval()(batch)
            expected = outputs.values() if isinstance(outputs, dict) else [outputs]
            actual = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
            for mine, theirs in zip(expected, actual, strict=True):
                worst = max(worst, float(np.abs(theirs - mine.float().numpy()).max()))
    return worst
