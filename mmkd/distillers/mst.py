"""MST-Distill (Li et al., ACM MM 2025): a mixture of specialised teachers for cross-modal
distillation, as the official ``main-MST-Distill.py`` / ``KD_methods/MST.py`` implement it.

One LightningModule runs the three stages one after the other (``stage_epochs``), each with its
own optimiser (manual optimisation):

1. **Co-training** from scratch: the multimodal teacher (MM), the cross-modal teacher (CM, the
   other modality) and the student, each with CE plus KL (T = 4, T^2, batchmean) towards the two
   others, gradients on both sides of every KL, one Adam.
2. **MaskNets**: a channel mask (projector -> self-attention over channels -> sigmoid) hooked at
   two layers of each teacher gives four specialised teachers. With teachers and student frozen,
   each MaskNet is trained so that its masked teacher matches the detached student
   (KL(p_student || p_masked)); the MaskNets with the lowest validation loss are kept.
3. **Routed distillation**: a router on the student's logits picks the top-k specialised
   teachers per sample; loss ``w_task CE + w_kl KL(p_teacher || p_student) + w_lb KL(U || mean
   routing)``, the weights decayed after every epoch as in the official code. The student with
   the lowest validation CE is kept, the CE averaged over validation batches as the official
   ``L_s_val / (i + 1)`` (``main-MST-Distill.py``, stage-3 validation), not over samples.

Differences from the official code, none of them numerical:
- Stage 2 sums the MaskNets' losses and takes one backward pass and one Adam over all MaskNets,
  where the official code loops over MaskNets with one Adam each. Each loss depends on one
  MaskNet only and Adam is per parameter, so the updates are the same.
- Teachers run under ``no_grad`` where they are frozen (the official code builds their graphs and
  drops them).

The official stage-3 teachers keep the hooks of earlier MaskNets of the same teacher registered
(``TGroup_forward`` never removes them before the next one), so its second specialised teacher
of each base carries both masks. ``cumulative_masks=True`` (default) reproduces that; ``False``
gives the paper's one mask per specialised teacher, as in stage 2.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mmkd.core.checkpoint import read_checkpoint
from mmkd.core.classifier import TrainingModule
from mmkd.core.taps import get_module
from mmkd.losses.logit import kd_loss

BASES = ("mm", "cm")


class MaskNet(nn.Module):
    """Channel-wise soft mask of a feature: ``sigmoid(Linear(MHSA(Projector(z))))``.

    The projector turns the ``C`` channels of ``z`` into ``C`` tokens of width ``H``
    (``Linear(C -> H*C)``), self-attention runs over the channel tokens, and a linear layer and a
    sigmoid give one value in (0, 1) per channel. A feature map ``[B, C, h, w]`` with ``h*w > 1``
    is first reduced to ``[B, C]`` (depthwise 3x3 stride-2 conv, 1x1 conv, BN, ReLU, global
    average pool), as the official ``MaskNet_2d`` / ``SpatialReduction`` (``KD_methods/MST.py``),
    whose two convolutions have no bias (``bias=False``; the BN after them has the shift).

    Args:
        channels: ``C``.
        spatial: the masked feature is a map with more than one position.
        hidden_dim_factor: ``H = C // (hidden_dim_factor * heads) * heads``; the projector holds
            about ``H * C^2`` weights, so this keeps MaskNets small (official default 2).
        heads: attention heads (official 3).
        reduction_bias: biases in the two reduction convolutions (not official; what mmkd's
            MaskNets had before, kept to load their checkpoints).
    """

    def __init__(self, channels: int, spatial: bool = False, hidden_dim_factor: int = 2, heads: int = 3, reduction_bias: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = max(heads, channels // (hidden_dim_factor * heads) * heads)
        self.reduce = (
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=reduction_bias),
                nn.Conv2d(channels, channels, 1, bias=reduction_bias),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            if spatial
            else nn.Flatten()
        )
        self.projector = nn.Linear(channels, self.hidden * channels)
        self.attention = nn.MultiheadAttention(self.hidden, heads, batch_first=True)
        self.out = nn.Linear(self.hidden, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """The mask ``[B, C]`` for a feature ``[B, C]`` or ``[B, C, h, w]``."""
        reduced = self.reduce(feature)
        tokens = self.projector(reduced).view(len(reduced), self.channels, self.hidden)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.out(attended)).squeeze(-1)


class Router(nn.Module):
    """The official ``GateNet``: ``Linear(C -> 2C) -> Linear(2C -> ways)`` on the student's logits,
    with no non-linearity in between; returns routing logits."""

    def __init__(self, num_classes: int, ways: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, 2 * num_classes), nn.Linear(2 * num_classes, ways))

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        return self.net(student_logits)


def load_balancing_loss(routing_probs: torch.Tensor, mode: Literal["kl", "cv"] = "kl") -> torch.Tensor:
    """Keeps the router from collapsing onto one teacher.

    ``"kl"`` (official default): ``KLDivLoss(batchmean)(log mean_b p, uniform)``. On the 1-D mean
    ``batchmean`` divides by its length, so this is ``KL(U || mean_b p) / ways``, kept as in the
    official code. ``"cv"``: coefficient of variation (std / mean) of the summed routing probabilities.
    """
    if mode == "kl":
        mean = routing_probs.float().mean(0)
        uniform = torch.full_like(mean, 1.0 / len(mean))
        return F.kl_div(mean.log(), uniform, reduction="batchmean")
    if mode == "cv":
        usage = routing_probs.float().sum(0)
        return usage.std() / usage.mean()
    raise ValueError(f"lb_mode must be 'kl' or 'cv', got {mode!r}")


def routed_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, selected: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the ``k`` routes of ``KL(p_teacher || p_student) T^2``, each sample against the
    teacher its route selected.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[ways, B, C]``, detached.
        selected: ``[B, k]`` teacher indices (``topk`` of the routing probabilities).
    """
    rows = torch.arange(len(student_logits), device=student_logits.device)
    routes = [kd_loss(student_logits, teacher_logits[selected[:, r], rows], temperature) for r in range(selected.shape[1])]
    return torch.stack(routes).mean()


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state with whole tensors (under FSDP2 its shards are gathered: a
    collective, so every process calls it), storable in a checkpoint."""
    return {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone() for key, value in module.state_dict().items()}


def _load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors, into the shards under FSDP2."""
    if any(isinstance(p, DTensor) for p in module.parameters()):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def decayed(weight: float, factor: float, every: int, epoch: int) -> float:
    """The official schedule ``w *= factor if epoch % every == 0``, applied after each epoch, as a
    function of the (stage-local, 0-based) epoch that is about to run: already decayed once in
    epoch 1."""
    return weight * factor ** math.ceil(epoch / every)


class MSTDistill(TrainingModule):
    """MST-Distill: three stages, one config (see the module docstring).

    Batches are dicts with one entry per modality (``multimodal_input_keys``) and ``label``. The
    student sees ``input_key``, the cross-modal teacher ``crossmodal_input_key``, the multimodal
    teacher all of ``multimodal_input_keys`` (positional, in that order).

    Logged: per stage its loss terms; ``val/acc`` and ``val/loss`` (student CE), ``val/acc_mm`` and
    ``val/acc_cm`` (teachers); stage 2 ``val/loss_masknet`` (its selection criterion); stage 3
    ``train/w_kl``, ``train/w_lb`` and ``train/route_{i}`` (share of samples routed to each
    specialised teacher); test ``test/acc``, ``test/loss``, ``test/acc_mm``, ``test/acc_cm``.

    At the end of every stage the module writes ``mst_stage{n}.ckpt`` beside the other
    checkpoints. Resuming any checkpoint with ``--ckpt_path`` continues where it stopped, mid-stage
    included. A new run can start at a later stage from such a checkpoint with ``init_from`` and
    ``start_stage`` (new optimisers; earlier stages skipped), e.g. to try other stage-3 settings.

    Args:
        student: single-modality student (``input_key``).
        multimodal_teacher: takes every modality in ``multimodal_input_keys``.
        crossmodal_teacher: single-modality teacher on ``crossmodal_input_key``.
        num_classes: classes.
        input_key / crossmodal_input_key / multimodal_input_keys: batch keys.
        mm_mask_layers / cm_mask_layers: module paths masked in each teacher (official AV-MNIST:
            ``concat_identity`` and ``fc1`` for the fusion net; ``conv2``, ``conv3`` of the audio
            CNN for an image student, ``conv3``, ``fc1`` of LeNet-5 for an audio student).
        stage_epochs: epochs of stages 1, 2 and 3 (official at release: 100, 100, 100).
        lrs: Adam learning rate of each stage (official 1e-4 each).
        optimizer: the optimiser class of all three stages (official Adam).
        temperature: KL temperature (official 4, everywhere).
        top_k: specialised teachers per sample in stage 3 (official 1).
        w_task / w_kl / w_lb: stage-3 weights of CE, routed KD and load balancing (official 1 each).
        kl_decay / lb_decay: ``(factor, every)``: after stage-3 epoch ``e``, ``w *= factor`` when
            ``e % every == 0`` (official ``(0.5, 30)`` and ``(0.9, 10)``).
        lb_mode: ``"kl"`` (official default) or ``"cv"``, see :func:`load_balancing_loss`.
        hidden_dim_factor / mask_heads: MaskNet size (official 2 and 3); see :class:`MaskNet`.
        cumulative_masks: stage-3 teachers as the official code builds them (see the module docstring).
        select_best: keep the stage-2 MaskNets with the lowest validation loss and the stage-3
            student with the lowest validation CE (official); ``False`` keeps the last ones.
        selection_average: how those validation values are averaged over the split:
            ``"batches"``, the mean of the per-batch values (official: ``Loss_s2_all / (i + 1)``
            and ``L_s_val / (i + 1)`` in ``main-MST-Distill.py``; a short last batch weighs as
            much as a full one), or ``"samples"``, weighted by batch size.
        masknet_reduction_bias: biases in the 2-D MaskNets' reduction convolutions (see
            :class:`MaskNet`; official: none). Checkpoints written with them need it set.
        start_stage / init_from: start at this stage from a ``mst_stage{n}.ckpt`` of an earlier run.
        input_shapes: ``{modality: shape}``; default the data module's ``input_shape``.
    """

    def __init__(
        self,
        student: nn.Module,
        multimodal_teacher: nn.Module,
        crossmodal_teacher: nn.Module,
        num_classes: int = 10,
        input_key: str = "image",
        crossmodal_input_key: str = "audio",
        multimodal_input_keys: Sequence[str] = ("image", "audio"),
        mm_mask_layers: Sequence[str] = ("concat_identity", "fc1"),
        cm_mask_layers: Sequence[str] = ("conv2", "conv3"),
        stage_epochs: Sequence[int] = (100, 100, 100),
        lrs: Sequence[float] = (1e-4, 1e-4, 1e-4),
        optimizer: OptimizerCallable = torch.optim.Adam,
        temperature: float = 4.0,
        top_k: int = 1,
        w_task: float = 1.0,
        w_kl: float = 1.0,
        w_lb: float = 1.0,
        kl_decay: tuple[float, int] = (0.5, 30),
        lb_decay: tuple[float, int] = (0.9, 10),
        lb_mode: Literal["kl", "cv"] = "kl",
        hidden_dim_factor: int = 2,
        mask_heads: int = 3,
        cumulative_masks: bool = True,
        select_best: bool = True,
        selection_average: Literal["batches", "samples"] = "batches",
        masknet_reduction_bias: bool = False,
        start_stage: int = 1,
        init_from: str | None = None,
        input_shapes: dict[str, list[int]] | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(optimizer=optimizer, check_finite=check_finite)
        self.automatic_optimization = False
        self.model = student
        self.mm_teacher = multimodal_teacher
        self.cm_teacher = crossmodal_teacher
        self.num_classes = num_classes
        self.input_key, self.crossmodal_input_key = input_key, crossmodal_input_key
        self.multimodal_input_keys = list(multimodal_input_keys)
        self.mask_layers = {"mm": list(mm_mask_layers), "cm": list(cm_mask_layers)}
        if not mm_mask_layers or not cm_mask_layers:
            raise ValueError("mm_mask_layers and cm_mask_layers each need at least one module path (official: two each)")
        ways = len(mm_mask_layers) + len(cm_mask_layers)
        if len(stage_epochs) != 3 or len(lrs) != 3:
            raise ValueError(f"stage_epochs and lrs need one value per stage (3), got {list(stage_epochs)} and {list(lrs)}")
        if not 1 <= top_k <= ways:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of specialised teachers ({ways})")
        if start_stage not in (1, 2, 3) or (start_stage > 1) != (init_from is not None):
            raise ValueError("start_stage 2 or 3 needs init_from (a mst_stage{n}.ckpt of an earlier run), and start_stage 1 none")
        self.stage_epochs = [0 if stage < start_stage else int(n) for stage, n in enumerate(stage_epochs, 1)]
        self.lrs = list(lrs)
        self.temperature, self.top_k = temperature, top_k
        self.w_task, self.w_kl, self.w_lb = w_task, w_kl, w_lb
        self.kl_decay, self.lb_decay, self.lb_mode = tuple(kl_decay), tuple(lb_decay), lb_mode
        self.hidden_dim_factor, self.mask_heads = hidden_dim_factor, mask_heads
        self.cumulative_masks, self.select_best = cumulative_masks, select_best
        if selection_average not in ("batches", "samples"):
            raise ValueError(f"selection_average must be 'batches' or 'samples', got {selection_average!r}")
        self.selection_average, self.masknet_reduction_bias = selection_average, masknet_reduction_bias
        self.start_stage, self.init_from = start_stage, init_from
        self.input_shapes = input_shapes
        for base, net in (("mm", multimodal_teacher), ("cm", crossmodal_teacher)):
            for path in self.mask_layers[base]:
                get_module(net, path)  # an unknown path fails here, naming the nearest valid ones
        self.router = Router(num_classes, ways)
        self.masknets = nn.ModuleDict()  # "mm0", "mm1", "cm0", ...: built at setup from the layers' shapes
        self.mask_shapes: dict[str, list[int]] | None = None
        self.active_masks: frozenset[str] = frozenset()
        self.best: dict[str, Any] = {}  # the selected MaskNets / student of the running stage
        self.completed_stage = 0
        self.metrics = nn.ModuleDict(
            {f"{split}_acc_{net}": MulticlassAccuracy(num_classes, average="micro") for split in ("val", "test") for net in ("student", "mm", "cm")}
        )
        self.val_ce, self.val_masknet = MeanMetric(), MeanMetric()

    # -- the specialised teachers: MaskNets hooked at module paths -----------------------------
    def teacher_net(self, base: str) -> nn.Module:
        return self.mm_teacher if base == "mm" else self.cm_teacher

    def teacher_logits(self, base: str, batch: dict) -> torch.Tensor:
        if base == "mm":
            return self.mm_teacher(*(batch[key] for key in self.multimodal_input_keys))
        return self.cm_teacher(batch[self.crossmodal_input_key])

    def mask_names(self, base: str) -> list[str]:
        return [f"{base}{i}" for i in range(len(self.mask_layers[base]))]

    def specialised_teachers(self) -> list[tuple[str, list[str]]]:
        """Stage-3 teachers as ``(base, active masks)``: one per MaskNet, carrying the earlier
        MaskNets of its base too with ``cumulative_masks``."""
        teachers = []
        for base in BASES:
            names = self.mask_names(base)
            teachers += [(base, names[: i + 1] if self.cumulative_masks else [name]) for i, name in enumerate(names)]
        return teachers

    @contextmanager
    def masks(self, names: Sequence[str]) -> Iterator[None]:
        """Run the teachers with these MaskNets applied (all others pass their layer through)."""
        self.active_masks = frozenset(names)
        try:
            yield
        finally:
            self.active_masks = frozenset()

    def _mask_hook(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if name not in self.active_masks:
            return None
        mask = self.masknets[name](output)
        return output * mask.view(*mask.shape, *([1] * (output.ndim - 2)))

    @torch.no_grad()
    def build_masknets(self, shapes: dict[str, list[int]]) -> None:
        """One MaskNet per masked layer, sized from the layer's output shape ``[C]`` or ``[C, h, w]``,
        and the forward hooks that apply them."""
        for base in BASES:
            net = self.teacher_net(base)
            for name, path in zip(self.mask_names(base), self.mask_layers[base]):
                shape = shapes[name]
                spatial = len(shape) == 3 and shape[1] * shape[2] > 1
                self.masknets[name] = MaskNet(shape[0], spatial, self.hidden_dim_factor, self.mask_heads, self.masknet_reduction_bias)
                get_module(net, path).register_forward_hook(lambda m, a, o, name=name: self._mask_hook(name, m, a, o))
        self.mask_shapes = shapes

    @torch.no_grad()
    def observe_mask_shapes(self) -> dict[str, list[int]]:
        """Output shapes of the masked layers, from one forward pass of each teacher on zeros."""
        shapes = self.input_shapes or getattr(self.trainer.datamodule, "input_shape", None)
        if not isinstance(shapes, dict):
            raise ValueError("set model.init_args.input_shapes ({modality: shape}) or use a data module whose input_shape is such a dict")
        needed = {self.input_key, self.crossmodal_input_key, *self.multimodal_input_keys}
        if needed - shapes.keys():
            raise ValueError(f"batch keys {sorted(needed - shapes.keys())} are not among the data's inputs {sorted(shapes)}")
        device = next(self.parameters()).device
        batch = {key: torch.zeros(2, *shape, device=device) for key, shape in shapes.items()}
        observed: dict[str, list[int] | str] = {}

        def observe(name: str, output: Any) -> None:
            observed[name] = list(output.shape[1:]) if isinstance(output, torch.Tensor) else type(output).__name__

        for base in BASES:
            net = self.teacher_net(base)
            hooks = []
            for name, path in zip(self.mask_names(base), self.mask_layers[base]):
                module = get_module(net, path)
                hooks.append(module.register_forward_hook(lambda m, a, o, name=name: observe(name, o)))
            was_training = net.training
            net.eval()
            try:
                self.teacher_logits(base, batch)
            finally:
                net.train(was_training)
                for hook in hooks:
                    hook.remove()
            for name, path in zip(self.mask_names(base), self.mask_layers[base]):
                if not isinstance(observed.get(name), list):
                    what = "did not run in the forward pass" if name not in observed else f"returned a {observed[name]}"
                    raise ValueError(
                        f"mask layer {path!r} of the {base} teacher {what}: choose a layer on the forward path that returns a tensor"
                    )
        return observed

    # -- stages --------------------------------------------------------------------------------
    def stage_of(self, epoch: int) -> int:
        """The stage that epoch ``epoch`` (0-based, of the whole run) belongs to."""
        boundary = 0
        for stage, epochs in enumerate(self.stage_epochs, 1):
            boundary += epochs
            if epoch < boundary:
                return stage
        return 3

    @property
    def stage(self) -> int:
        return self.stage_of(self.current_epoch)

    @property
    def stage_epoch(self) -> int:
        """0-based epoch within the current stage."""
        return self.current_epoch - sum(self.stage_epochs[: self.stage - 1])

    def trained_modules(self, stage: int) -> list[nn.Module]:
        return {1: [self.mm_teacher, self.cm_teacher, self.model], 2: [self.masknets], 3: [self.model, self.router]}[stage]

    def _enter_stage(self, stage: int) -> None:
        """Only this stage's modules train (train mode, gradients); the others are frozen in eval
        mode, so their BatchNorm statistics stay as they are."""
        trained = self.trained_modules(stage)
        for module in (self.mm_teacher, self.cm_teacher, self.model, self.masknets, self.router):
            train = any(module is t for t in trained)
            module.train(train)
            module.requires_grad_(train)

    @property
    def current_weights(self) -> tuple[float, float]:
        """Stage-3 ``(w_kl, w_lb)`` of the running epoch."""
        epoch = self.stage_epoch
        return decayed(self.w_kl, *self.kl_decay, epoch), decayed(self.w_lb, *self.lb_decay, epoch)

    def stage1_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Co-training: every model learns from the labels and from the two others, nothing detached."""
        labels = batch["label"]
        logits = {
            "mm": self.teacher_logits("mm", batch),
            "cm": self.teacher_logits("cm", batch),
            "student": self.model(batch[self.input_key]),
        }
        losses = {}
        for name, own in logits.items():
            losses[f"ce_{name}"] = F.cross_entropy(own.float(), labels)
            losses[f"kd_{name}"] = sum(kd_loss(own, other, self.temperature) for peer, other in logits.items() if peer != name)
        return losses

    def masknet_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each MaskNet alone on its teacher, pulled towards the detached student."""
        with torch.no_grad():
            student_logits = self.model(batch[self.input_key])
        losses = {}
        for base in BASES:
            for name in self.mask_names(base):
                with self.masks([name]):
                    losses[name] = kd_loss(self.teacher_logits(base, batch), student_logits, self.temperature)
        return losses

    def stage3_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The student learns from the labels and from its routed specialised teachers; the
        router is trained by the load-balancing term only (top-k passes indices, and the
        teachers' logits are detached)."""
        student_logits = self.model(batch[self.input_key])
        with torch.no_grad():
            teachers = []
            for base, names in self.specialised_teachers():
                with self.masks(names):
                    teachers.append(self.teacher_logits(base, batch))
            teacher_logits = torch.stack(teachers)
        routing = self.router(student_logits).softmax(-1)
        selected = routing.topk(self.top_k, dim=1).indices
        w_kl, w_lb = self.current_weights
        counts = torch.bincount(selected.flatten(), minlength=routing.shape[1]).float() / selected.numel()
        for i, share in enumerate(counts):
            self.log(f"train/route_{i}", share, on_step=False, on_epoch=True, batch_size=len(student_logits))
        self.log_dict({"train/w_kl": w_kl, "train/w_lb": w_lb}, on_step=False, on_epoch=True, batch_size=len(student_logits))
        return {
            "ce": self.w_task * F.cross_entropy(student_logits.float(), batch["label"]),
            "kd": w_kl * routed_kd_loss(student_logits, teacher_logits, selected, self.temperature),
            "lb": w_lb * load_balancing_loss(routing, self.lb_mode),
        }

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
            raise ValueError(
                "MST-Distill leaves some networks without gradients in every stage (the MaskNets in stage 1, "
                "the teachers in stages 2 and 3), which plain DDP refuses: use --trainer.strategy=ddp_find_unused_parameters_true"
            )
        if self.mask_shapes is None:
            self.build_masknets(self.observe_mask_shapes())
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None and self.completed_stage < self.start_stage - 1:
            self.load_stage_checkpoint(self.init_from)
        if stage == "fit":
            total = sum(self.stage_epochs)
            max_epochs = self.trainer.fit_loop.max_epochs
            if max_epochs not in (None, -1, 1000, total):  # 1000: Lightning's default when unset
                raise ValueError(
                    f"trainer.max_epochs={max_epochs} but stage_epochs={self.stage_epochs} sum to {total}: "
                    "set the stages' epochs with model.init_args.stage_epochs and leave trainer.max_epochs unset"
                )
            self.trainer.fit_loop.max_epochs = total

    def load_stage_checkpoint(self, path: str) -> None:
        """Weights of every network (teachers, student, MaskNets, router) from a stage checkpoint
        of an earlier run that completed the stages before ``start_stage``."""
        try:
            checkpoint = read_checkpoint(path)  # a file, or an FSDP2 run's folder
        except FileNotFoundError:
            raise FileNotFoundError(f"init_from: {path} does not exist (a mst_stage{{n}}.ckpt written by an earlier MST-Distill run)") from None
        completed = checkpoint.get("mmkd", {}).get("mst_completed_stage", 0)
        if completed != self.start_stage - 1:
            raise ValueError(
                f"init_from: {path} completed stage {completed}, but start_stage={self.start_stage} starts from the end of "
                f"stage {self.start_stage - 1}: use that stage's mst_stage{self.start_stage - 1}.ckpt"
            )
        self.check_masknet_bias(checkpoint["state_dict"], f"init_from: {path}")
        self.load_state_dict(checkpoint["state_dict"])
        self.completed_stage = completed

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = []
        for stage, lr in zip((1, 2, 3), self.lrs):
            params = [p for module in self.trained_modules(stage) for p in module.parameters()]
            optimizer = self.optimizer(params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizers.append(optimizer)
        return optimizers

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stage = self.stage
        self._enter_stage(stage)
        losses = {1: self.stage1_losses, 2: self.masknet_losses, 3: self.stage3_losses}[stage](batch)
        loss = self.total_loss(losses, "train", len(batch["label"]))
        optimizer = self.optimizers()[stage - 1]
        self.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def last_epoch_of_stage(self) -> bool:
        return self.stage_epoch == self.stage_epochs[self.stage - 1] - 1

    def finish_stage(self) -> None:
        """Put the selected MaskNets (stage 2) or student and router (stage 3) in place. Done at
        the stage's last validation, so that the checkpoints written after it hold them."""
        stage = self.stage
        if self.completed_stage >= stage:
            return
        if self.best.get("stage") == stage:
            _load_full_state(self.masknets if stage == 2 else self.model, self.best["state"])
            if stage == 3:
                _load_full_state(self.router, self.best["router"])
        self.best = {}
        self.completed_stage = stage

    def on_train_epoch_end(self) -> None:
        if self.last_epoch_of_stage():
            self.finish_stage()  # when no validation ran in this epoch
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None) or self.trainer.default_root_dir
            self.trainer.save_checkpoint(str(Path(folder) / f"mst_stage{self.stage}.ckpt"))

    # -- evaluation ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _evaluate(self, batch: dict, split: str) -> None:
        labels = batch["label"]
        student_logits = self.model(batch[self.input_key])
        self.metrics[f"{split}_acc_student"].update(student_logits, labels)
        for base in BASES:
            self.metrics[f"{split}_acc_{base}"].update(self.teacher_logits(base, batch), labels)
        ce = F.cross_entropy(student_logits.float(), labels)
        self.log(f"{split}/loss", ce, batch_size=len(labels), sync_dist=True)
        self.log(f"{split}/acc", self.metrics[f"{split}_acc_student"], prog_bar=True, batch_size=len(labels))
        self.log(f"{split}/acc_mm", self.metrics[f"{split}_acc_mm"], batch_size=len(labels))
        self.log(f"{split}/acc_cm", self.metrics[f"{split}_acc_cm"], batch_size=len(labels))
        if split == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # the selection criteria: each batch counts once (official) or by its size
            weight = 1 if self.selection_average == "batches" else len(labels)
            self.val_ce.update(ce, weight)
            if self.stage == 2:
                losses = self.masknet_losses(batch)
                per_base = [torch.stack([losses[n] for n in self.mask_names(base)]).mean() for base in BASES]
                self.val_masknet.update(sum(per_base), weight)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        stage, val_ce = self.stage, float(self.val_ce.compute())
        self.val_ce.reset()
        if stage == 2:
            value = float(self.val_masknet.compute())
            self.val_masknet.reset()
            self.log("val/loss_masknet", value)
            self._keep_if_best(2, value, self.masknets)
        elif stage == 3:
            self._keep_if_best(3, val_ce, self.model)
        if self.last_epoch_of_stage() and self.trainer.is_last_batch:  # not a validation half-way through the epoch
            self.finish_stage()

    def _keep_if_best(self, stage: int, value: float, module: nn.Module) -> None:
        if not self.select_best or (self.best.get("stage") == stage and value >= self.best["value"]):
            return
        self.best = {"stage": stage, "value": value, "state": _full_state(module)}
        if stage == 3:
            self.best["router"] = _full_state(self.router)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.model(batch[self.input_key]).float().softmax(-1)
        return {"index": batch.get("index"), "probs": probs, "pred": probs.argmax(-1)}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mmkd"].update(mst_mask_shapes=self.mask_shapes, mst_completed_stage=self.completed_stage, mst_best=self.best)

    def check_masknet_bias(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """A clear error for a checkpoint whose 2-D MaskNets have (or lack) reduction-conv biases
        that this module's MaskNets lack (or have), instead of a list of unexpected keys."""
        spatial = {key.split(".")[1] for key in state_dict if re.match(r"^masknets\.[^.]+\.reduce\.2\.weight$", key)}
        if not spatial:  # no 2-D MaskNet in the checkpoint: nothing differs
            return
        with_bias = any(re.match(r"^masknets\.[^.]+\.reduce\.[01]\.bias$", key) for key in state_dict)
        if with_bias != self.masknet_reduction_bias:
            written = "with" if with_bias else "without"
            raise ValueError(
                f"{source} holds 2-D MaskNets ({', '.join(sorted(spatial))}) {written} biases in their reduction convolutions, "
                f"but masknet_reduction_bias={self.masknet_reduction_bias}: set model.init_args.masknet_reduction_bias="
                f"{str(with_bias).lower()} to load it (mmkd's MaskNets had these biases before following the official "
                "SpatialReduction, which has none)"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.check_masknet_bias(checkpoint.get("state_dict", {}), "the checkpoint")
        info = checkpoint.get("mmkd", {})
        if self.mask_shapes is None and info.get("mst_mask_shapes"):
            self.build_masknets(info["mst_mask_shapes"])
        self.completed_stage = info.get("mst_completed_stage", self.completed_stage)
        self.best = info.get("mst_best") or {}
