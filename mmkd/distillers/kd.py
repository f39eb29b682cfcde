"""Classic distillers: KD, DKD, FitNets, AT, RKD.

Each is a :class:`~mmkd.core.Distiller` that turns a few arguments into loss terms; defaults are
mdistiller's CIFAR-100 settings unless noted.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmkd.core import Distiller, LossTerm
from mmkd.losses import ATLoss, DKDLoss, FitNetsLoss, KDLoss, RKDLoss
from mmkd.losses.fused import LossImpl


class KD(Distiller):
    """Hinton et al. 2015: ``ce_weight * CE + kd_weight * T^2 KL(p_t^T || p_s^T)``.

    Args:
        temperature: softmax temperature (4).
        kd_weight: weight of the KD term (0.9).
        ce_weight: weight of the label cross-entropy (0.1).
        reverse: reverse KL, ``KL(p_s || p_t)``.
        loss_impl: ``"auto"``, ``"triton"``, ``"compiled"``, ``"chunked"`` or ``"eager"`` (see
            :mod:`mmkd.losses.fused`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
        reverse: bool = False,
        loss_impl: LossImpl = "auto",
        **kwargs: Any,
    ) -> None:
        kd = LossTerm("kd", KDLoss(temperature, reverse=reverse, loss_weight=kd_weight, impl=loss_impl))
        super().__init__(student, teacher, terms=[kd], ce_weight=ce_weight, **kwargs)


class DKD(Distiller):
    """Decoupled KD (Zhao et al., CVPR 2022): ``CE + warmup * (alpha TCKD + beta NCKD)``.

    The DKD term is scaled by ``min(epoch / dkd_warmup_epochs, 1)`` with 1-based epochs, as the
    official code (20 epochs there for 240-epoch schedules; scale it with your schedule).

    Args:
        alpha: TCKD weight (1.0).
        beta: NCKD weight (8.0).
        temperature: (4.0).
        dkd_warmup_epochs: epochs to ramp the DKD term in (20 officially).
        ce_weight: (1.0).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        dkd_warmup_epochs: int = 20,
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        dkd = LossTerm("dkd", DKDLoss(alpha, beta, temperature))
        super().__init__(student, teacher, terms=[dkd], ce_weight=ce_weight, **kwargs)
        self.dkd_warmup_epochs = dkd_warmup_epochs

    def term_scale(self, name: str) -> float:
        return min((self.current_epoch + 1) / max(1, self.dkd_warmup_epochs), 1.0)


class FitNets(Distiller):
    """FitNets (Romero et al., ICLR 2015): ``CE + feat_weight * MSE(head(f_s), f_t)`` at one hint
    layer. mdistiller trains the hint jointly with CE in one stage (not the paper's two stages).

    Args:
        student_layer: module path of the student's guided layer (e.g. ``"layer2"``).
        teacher_layer: module path of the teacher's hint layer.
        head: regressor from student to teacher channels (``"conv1x1_bn"``; mdistiller's
            ``ConvReg`` is ``"conv3x3_bn"`` with a ReLU).
        feat_weight: weight of the hint loss (100).
        ce_weight: (1.0).
        loss_impl: as :class:`KD`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str,
        teacher_layer: str,
        head: str = "conv1x1_bn",
        feat_weight: float = 100.0,
        ce_weight: float = 1.0,
        loss_impl: LossImpl = "auto",
        **kwargs: Any,
    ) -> None:
        hint = LossTerm("hint", FitNetsLoss(loss_weight=feat_weight, impl=loss_impl), student_layer, teacher_layer, head)
        super().__init__(student, teacher, terms=[hint], ce_weight=ce_weight, **kwargs)


class AT(Distiller):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``CE + feat_weight * sum_l AT_l``
    over pairs of layers; channel counts may differ, spatial sizes are pooled to the smaller.

    Args:
        student_layers: student module paths, e.g. ``["layer1", "layer2", "layer3"]``.
        teacher_layers: teacher module paths, same length.
        p: activation power (2).
        feat_weight: (1000).
        ce_weight: (1.0).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: list[str],
        teacher_layers: list[str],
        p: float = 2.0,
        feat_weight: float = 1000.0,
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"AT pairs layers: got {len(student_layers)} student and {len(teacher_layers)} teacher layers")
        terms = [
            LossTerm(f"at_{s.replace('.', '_')}", ATLoss(p, loss_weight=feat_weight), s, t)
            for s, t in zip(student_layers, teacher_layers)
        ]
        super().__init__(student, teacher, terms=terms, ce_weight=ce_weight, **kwargs)


class RKD(Distiller):
    """Relational KD (Park et al., CVPR 2019) on pooled embeddings: ``CE + feat_weight *
    (distance_weight * L_dist + angle_weight * L_angle)``.

    Args:
        student_layer: path of the student's embedding (``"global_pool"`` for timm CNNs).
        teacher_layer: path of the teacher's embedding.
        distance_weight: (25). angle_weight: (50). feat_weight: (1.0). ce_weight: (1.0).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str = "global_pool",
        teacher_layer: str = "global_pool",
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        feat_weight: float = 1.0,
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        rkd = LossTerm("rkd", RKDLoss(distance_weight, angle_weight, loss_weight=feat_weight), student_layer, teacher_layer)
        super().__init__(student, teacher, terms=[rkd], ce_weight=ce_weight, **kwargs)
