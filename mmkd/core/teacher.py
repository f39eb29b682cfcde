"""The frozen teacher."""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
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
        fold_batchnorm: fold each ``BatchNorm2d`` into the convolution that feeds it, on the first
            forward pass (see :func:`fold_batchnorm`): the frozen teacher's BatchNorms are affine
            maps, so a ResNet teacher skips one pass over every activation. The outputs change by
            float rounding only (checked on that first batch; a model where folding would change
            them is left as it was, with a warning). Convolutions and BatchNorms that a tap or any
            other forward hook observes are left alone.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoint: str | None = None,
        bf16: bool = False,
        checkpoint_prefix: str | None = None,
        fold_batchnorm: bool = True,
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
        self.fold_batchnorm = fold_batchnorm
        self._folded = False
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
            if self.fold_batchnorm and not self._folded:
                self._folded = True
                fold_batchnorm(self.model, args, kwargs, tolerance=3e-2 if self.bf16 else 1e-3)
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


def _foldable_norm(module: nn.Module) -> bool:
    """A ``BatchNorm2d``, or timm's ``BatchNormAct2d`` (batch norm, then its ``drop`` and ``act``)."""
    if type(module) is nn.BatchNorm2d:
        return True
    from timm.layers import BatchNormAct2d

    return type(module) is BatchNormAct2d


def _observed(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _close(a: Any, b: Any, tolerance: float) -> bool:
    """Whether two (nested) outputs agree to ``tolerance`` times each tensor's largest magnitude
    (non-finite values in the same places)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        a, b = a.float(), b.float()
        finite = a.isfinite()
        if not torch.equal(finite, b.isfinite()):
            return False
        if not finite.any():  # e.g. a teacher with NaN weights: its NaN loss says so later
            return True
        a, b = a[finite], b[finite]
        return bool(((a - b).abs().max() <= tolerance * a.abs().max().clamp_min(1e-6)).item())
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    return True


@torch.no_grad()
def fold_batchnorm(model: nn.Module, args: tuple, kwargs: dict | None = None, tolerance: float = 1e-3) -> list[str]:
    """Fold every eval-mode ``BatchNorm2d`` that reads a ``Conv2d``'s output into that convolution,
    in place, and replace it by ``nn.Identity`` (timm's ``BatchNormAct2d`` by its dropout and
    activation); returns the folded BatchNorms' module paths.

    Which BatchNorm reads which convolution is observed on one forward pass of random normal inputs
    of the shapes of ``args`` and ``kwargs`` (their floating-point tensors; the rest as given): a pair is
    folded only when the BatchNorm's input is the convolution's output tensor itself (so a
    pre-activation block's ``bn(x + conv(x))`` is not), neither module has a forward hook (a tap
    keeps seeing what it saw), and the BatchNorm uses running statistics. The folded model is then
    run on the same input; if any output differs by more than ``tolerance`` times its largest
    magnitude (a convolution whose output also feeds something other than its BatchNorm), every
    fold is undone and a warning says so. A model with sharded (FSDP2 DTensor) weights is left alone.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(t, DTensor) for t in [*model.parameters(), *model.buffers()]):
        return []
    # Random inputs of the batch's shapes: a zero batch (the set-up dry run) would let a wrong fold pass.
    generator = torch.Generator().manual_seed(0)

    def probe(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return torch.randn(value.shape, generator=generator).to(device=value.device, dtype=value.dtype)
        return value

    args, kwargs = tuple(probe(a) for a in args), {k: probe(v) for k, v in (kwargs or {}).items()}
    names = {module: name for name, module in model.named_modules()}
    produced_by: dict[int, tuple[nn.Conv2d, weakref.ref]] = {}  # weak: the probe keeps no activations alive
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def conv_hook(conv: nn.Module, inputs: tuple, output: Any) -> None:
        produced_by[id(output)] = (conv, weakref.ref(output))

    def bn_hook(bn: nn.Module, inputs: tuple) -> None:
        conv, produced = produced_by.get(id(inputs[0]), (None, None)) if inputs else (None, None)
        if conv is not None and produced() is inputs[0] and conv.out_channels == bn.num_features and (conv, bn) not in pairs:
            pairs.append((conv, bn))

    convs = [m for m in names if type(m) is nn.Conv2d and not _observed(m)]
    bns = [m for m in names if _foldable_norm(m) and not _observed(m) and m.running_mean is not None and not m.training]
    if not convs or not bns:
        return []
    handles = [c.register_forward_hook(conv_hook) for c in convs] + [b.register_forward_pre_hook(bn_hook) for b in bns]
    try:
        reference = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    counts = Counter(module for pair in pairs for module in pair)
    pairs = [(conv, bn) for conv, bn in pairs if counts[conv] == 1 and counts[bn] == 1]  # modules used once
    if not pairs:
        return []
    undo = []
    for conv, bn in pairs:
        undo.append((conv, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone(), bn))
        scale = bn.weight.float() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float32)
        scale = scale * torch.rsqrt(bn.running_var.float() + bn.eps)
        shift = (bn.bias.float() if bn.affine else 0.0) - bn.running_mean.float() * scale
        bias = shift if conv.bias is None else conv.bias.float() * scale + shift
        weight = conv.weight.float() * scale.reshape(-1, 1, 1, 1)
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))
        model.set_submodule(names[bn], nn.Sequential(bn.drop, bn.act) if type(bn) is not nn.BatchNorm2d else nn.Identity())
    if _close(reference, model(*args, **kwargs), tolerance):
        return [names[bn] for _, bn in pairs]
    for conv, weight, bias, bn in undo:
        conv.weight.copy_(weight)
        if bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(bias)
        model.set_submodule(names[bn], bn)
    warnings.warn(
        f"teacher: folding its BatchNorms into their convolutions changed its outputs ({type(model).__name__}), "
        "so it runs unfolded; set model.init_args.teacher.init_args.fold_batchnorm=false to skip the check"
    )
    return []


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
