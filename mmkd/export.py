"""Exporting a trained student to ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mmkd.core.checkpoint import load_state, load_state_dict_file


def student_from_checkpoint(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """``model`` (the student built from a config) with the student weights of a Lightning
    checkpoint, a consolidated or sharded FSDP2 checkpoint, or a weights file."""
    load_state(model, load_state_dict_file(checkpoint), str(checkpoint))
    return model.eval()


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 18, input_name: str = "image") -> Path:
    """Write ``model`` (in eval mode) to ONNX with a dynamic batch dimension: input ``input_name``,
    output ``output``, whatever the model's ``forward`` returns (a dict of tensors, as a
    detector's ``pred_logits`` and ``pred_boxes``: one output per key, named by it). What a model
    computes in ``forward`` is in the graph: DHO's head mix with its alpha and beta, G2SD's mean
    of the class and distillation heads. Written atomically."""
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
