"""The frozen teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkd.core.checkpoint import checkpoint_sha256, load_weights, state_dict_sha256


def to_float(output: Any) -> Any:
    """Floating-point tensors of a (nested) output cast to float32: tensors, tuples (named ones
    kept), lists and dicts."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        values = [to_float(value) for value in output]
        return type(output)(*values) if hasattr(output, "_fields") else tuple(values)
    if isinstance(output, list):
        return [to_float(value) for value in output]
    if isinstance(output, dict):
        return {key: to_float(value) for key, value in output.items()}
    return output


class Teacher(nn.Module):
    """Wraps any module as a frozen teacher.

    Frozen by construction: parameters have ``requires_grad=False``, the module stays in eval
    mode when a Trainer calls ``.train()``, and ``forward`` runs under ``torch.no_grad()``
    (optionally under bf16 autocast, outputs cast back to float32).

    Its weights are not part of ``state_dict()`` (of the teacher or of a module holding it), so
    student checkpoints never contain them; a ``Distiller`` writes :meth:`reference` (the
    checkpoint path, its sha256 and a fingerprint of the weights) instead and refuses to resume
    with a different teacher.

    Args:
        model: the teacher network (its module paths are what teacher taps address).
        checkpoint: optional weights file loaded strictly: ``.safetensors``, a ``.pth``/``.bin``
            state dict, a timm training checkpoint (``state_dict_ema`` if it has one, else
            ``state_dict``), a dict with ``model``, a Lightning ``.ckpt`` of an mmkd run (its
            ``model.`` weights), an FSDP2 checkpoint folder or ``zoo:NAME``; a ``module.`` (DDP)
            prefix on every key is stripped (:func:`~mmkd.core.checkpoint.load_state_dict_file`).
            Its sha256 is recorded in :meth:`reference`.
        bf16: run the forward pass under bfloat16 autocast.
        checkpoint_prefix: load only the file's keys under this prefix, stripped of it (e.g.
            ``"student."`` or ``"backbone."`` of a file that holds a larger model).
    """

    def __init__(
        self, model: nn.Module, checkpoint: str | None = None, bf16: bool = False, checkpoint_prefix: str | None = None
    ) -> None:
        super().__init__()
        if checkpoint:
            try:
                load_weights(model, checkpoint, checkpoint_prefix)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"teacher weights not found: {checkpoint}. Train the teacher first (the header of each "
                    "shipped config names the command, e.g. `mmkd fit -c configs/teachers/fmnist_resnet10t.yaml` "
                    "for configs/kd, configs/g2sd/mae_pretrain.yaml for G2SD) or fix "
                    "model.init_args.teacher.init_args.checkpoint."
                ) from err
        self.model = model
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256(checkpoint) if checkpoint else None  # a file, an FSDP2 folder or zoo:NAME
        self.bf16 = bf16
        # Fingerprinted now, while the weights are whole: FSDP2 may shard them later.
        self._weights_sha256 = state_dict_sha256(self.model)
        self.model.requires_grad_(False)
        super().train(False)
        # The weights come from the teacher's own file: a state dict of a module holding this teacher
        # leaves them out (student checkpoints stay small, under any strategy), and loading one
        # keeps the weights already here.
        self.register_state_dict_post_hook(_without_weights)
        self.register_load_state_dict_pre_hook(_own_weights_when_missing)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.model(*args, **kwargs)
        if self.bf16:
            output = to_float(output)
        return output

    def reference(self) -> dict[str, str | None]:
        """What a student checkpoint records instead of the teacher's weights."""
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_sha256": self._weights_sha256,
        }


def _without_weights(module: Teacher, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _own_weights_when_missing(module: Teacher, state_dict: dict, prefix: str, *args: Any) -> None:
    for key, value in module.model.state_dict(prefix=prefix + "model.").items():
        state_dict.setdefault(key, value)


def record_teacher(checkpoint: dict[str, Any], teacher: Teacher) -> None:
    """Write the teacher's :meth:`Teacher.reference` into a Lightning checkpoint."""
    checkpoint.setdefault("mmkd", {})["teacher"] = teacher.reference()


def check_teacher(checkpoint: dict[str, Any], teacher: Teacher) -> None:
    """Refuse a checkpoint that was trained with another teacher than this one."""
    stored = checkpoint.get("mmkd", {}).get("teacher")
    if stored and stored["weights_sha256"] != teacher.reference()["weights_sha256"]:
        raise RuntimeError(
            f"this checkpoint was trained with another teacher (checkpoint {stored['checkpoint']}, "
            f"weights sha256 {stored['weights_sha256'][:12]}) than the one configured now "
            f"({teacher.checkpoint}, {teacher.reference()['weights_sha256'][:12]}). "
            "Point the teacher at the original weights."
        )
