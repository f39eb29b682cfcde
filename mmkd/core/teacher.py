"""The frozen teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkd.core.checkpoint import load_weights, sha256_file, state_dict_sha256


def _to_float(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        values = [_to_float(value) for value in output]
        return type(output)(*values) if hasattr(output, "_fields") else tuple(values)
    return output


class Teacher(nn.Module):
    """Wraps any module as a frozen teacher.

    Frozen by construction: parameters have ``requires_grad=False``, the module stays in eval
    mode when a Trainer calls ``.train()``, and ``forward`` runs under ``torch.no_grad()``
    (optionally under bf16 autocast, outputs cast back to float32).

    A ``Distiller`` does not write the teacher's weights into its checkpoints; it writes
    :meth:`reference` (the checkpoint path, its sha256 and a fingerprint of the weights) and
    refuses to resume with a different teacher.

    Args:
        model: the teacher network (its module paths are what teacher taps address).
        checkpoint: optional weights file loaded strictly (``.safetensors``, Lightning ``.ckpt``
            of an mmkd ``Classifier``, or a ``torch.save``d state dict).
        bf16: run the forward pass under bfloat16 autocast.
    """

    def __init__(self, model: nn.Module, checkpoint: str | None = None, bf16: bool = False) -> None:
        super().__init__()
        if checkpoint:
            try:
                load_weights(model, checkpoint)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"teacher weights not found: {checkpoint}. Train the teacher first (the header of each "
                    "shipped config names the command, e.g. `mmkd fit -c configs/teachers/fmnist_resnet10t.yaml` "
                    "for configs/kd, configs/g2sd/mae_pretrain.yaml for G2SD) or fix "
                    "model.init_args.teacher.init_args.checkpoint."
                ) from err
        self.model = model
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = sha256_file(checkpoint) if checkpoint else None
        self.bf16 = bf16
        self._weights_sha256: str | None = None
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.model(*args, **kwargs)
        if self.bf16:
            output = _to_float(output)
        return output

    def reference(self) -> dict[str, str | None]:
        """What a student checkpoint records instead of the teacher's weights."""
        if self._weights_sha256 is None:  # weights never change: compute once
            self._weights_sha256 = state_dict_sha256(self.model)
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_sha256": self._weights_sha256,
        }


def drop_teacher_weights(checkpoint: dict[str, Any], teacher: Teacher, prefix: str = "teacher.") -> None:
    """Replace the teacher's weights in a Lightning checkpoint by its :meth:`Teacher.reference`."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    checkpoint.setdefault("mmkd", {})["teacher"] = teacher.reference()


def restore_teacher_weights(checkpoint: dict[str, Any], teacher: Teacher, prefix: str = "teacher.") -> None:
    """Check that a checkpoint was trained with this teacher, and put its weights back in the
    state dict so that strict loading finds them (they come from the teacher's own file)."""
    stored = checkpoint.get("mmkd", {}).get("teacher")
    if stored and stored["weights_sha256"] != teacher.reference()["weights_sha256"]:
        raise RuntimeError(
            f"this checkpoint was trained with another teacher (checkpoint {stored['checkpoint']}, "
            f"weights sha256 {stored['weights_sha256'][:12]}) than the one configured now "
            f"({teacher.checkpoint}, {teacher.reference()['weights_sha256'][:12]}). "
            "Point the teacher at the original weights."
        )
    state = checkpoint["state_dict"]
    for key, value in teacher.state_dict(prefix=prefix).items():
        state.setdefault(key, value)
