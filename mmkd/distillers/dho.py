"""DHO: dual-head optimisation for semi-supervised distillation from a vision-language model
(Kang et al. 2025, "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization"; official code ``erjui/DHO``).

One student backbone, two linear heads: the CE head learns from the few labels, the KD head from
the teacher's zero-shot predictions on labelled and unlabelled images. Keeping the two signals on
separate heads avoids their gradient conflict in a shared head. At inference the heads are mixed
in probability space: ``p = alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta)``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.core.distiller import LOGITS, TEACHER_VIEW, Distiller
from mmkd.losses import kd_loss
from mmkd.models.adapter import set_input_normalization
from mmkd.models.clip import create_clip, zero_shot_weights

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
BETA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def mix_log_probs(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float | torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """``log(alpha * softmax(ce) + (1 - alpha) * softmax(kd / beta))``, computed in log space so
    that ``alpha`` of 0 or 1 is exact. Its softmax is the mixed distribution, its argmax DHO's
    prediction."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=ce_logits.device)
    parts = torch.stack([
        alpha.log() + F.log_softmax(ce_logits.float(), dim=-1),
        (1 - alpha).log() + F.log_softmax(kd_logits.float() / beta, dim=-1),
    ])  # fmt: skip
    return torch.logsumexp(parts, dim=0)


def check_mix(alpha: float, beta: float) -> None:
    """A clear error for a mix :func:`mix_log_probs` cannot compute (it would give NaN scores)."""
    if not (0.0 <= alpha <= 1.0 and beta > 0.0):
        raise ValueError(f"DHO's head mix needs 0 <= alpha <= 1 and beta > 0, got alpha={alpha}, beta={beta}")


@torch.no_grad()
def mix_grid(
    ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, alphas: Sequence[float], betas: Sequence[float]
) -> list[tuple[float, float, int]]:
    """``(beta, alpha, correct)`` for every pair of the grids, ``beta`` outer and ``alpha`` inner
    (the official search order), ``correct`` the count of samples the mix classifies right."""
    ce_probs = ce_logits.float().softmax(-1)
    grid = []
    for beta in betas:
        kd_probs = (kd_logits.float() / beta).softmax(-1)
        grid += [(beta, alpha, int(((alpha * ce_probs + (1 - alpha) * kd_probs).argmax(-1) == labels).sum())) for alpha in alphas]
    return grid


def search_mix(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    alphas: Sequence[float] = ALPHA_GRID,
    betas: Sequence[float] = BETA_GRID,
    grid: list[tuple[float, float, int]] | None = None,
) -> tuple[float, float, float]:
    """The ``(alpha, beta)`` of the grids with the highest accuracy, and that accuracy, searched
    as the official ``evaluate(..., search_param=True)`` of ``train_others.py`` (erjui/DHO at
    846de75, the loop after "# Parameter search"; the same in ``train_imgnet.py``): ``beta`` in the
    outer loop, ``alpha`` in the inner one, and a pair replaces the best only when its accuracy is
    strictly higher. Ties therefore go to the first ``beta`` of its grid, then the first ``alpha``. The
    search starts from accuracy 0 with the official fallback pair ``(alpha 0, beta 1)`` (the KD
    head alone, unscaled), which is kept when no pair classifies a single sample correctly.
    ``grid``: :func:`mix_grid` of the same arguments, when already computed."""
    # correct counts, not float accuracies: the comparison is exact, as the official one on
    # 100 * correct / total (one total for every pair)
    best_correct, best_alpha, best_beta = 0, 0.0, 1.0
    for beta, alpha, correct in grid if grid is not None else mix_grid(ce_logits, kd_logits, labels, alphas, betas):
        if correct > best_correct:
            best_correct, best_alpha, best_beta = correct, alpha, beta
    return best_alpha, best_beta, best_correct / max(1, len(labels))


def write_mix_surface(path: Path, epoch: int, grid: list[tuple[float, float, int]], count: int) -> None:
    """Appends the validation accuracy of every pair of a :func:`mix_grid` to the CSV file
    ``path`` (``epoch,beta,alpha,acc``); ``mmkd plot`` draws the last epoch's surface."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        if new:
            csv.writer(f).writerow(("epoch", "beta", "alpha", "acc"))
        csv.writer(f).writerows((epoch, beta, alpha, correct / max(1, count)) for beta, alpha, correct in grid)


class DualHeadStudent(nn.Module):
    """A feature extractor with DHO's two linear heads.

    ``ce_head`` reads the raw features; ``kd_head`` reads L2-normalised features and its output
    is multiplied by ``kd_scale`` (100: a CLIP-style cosine classifier, as DHO's ImageNet script
    computes ``kd_head(normalize(f)) * 100``) or, with ``kd_normalize=False``, it reads the raw
    features (the few-shot scripts). ``forward`` returns the
    log of the mixed distribution with the ``alpha``/``beta`` held as buffers, so checkpoints,
    evaluation, prediction and exported models all carry the mix.

    Args:
        backbone: returns ``[B, D]`` features (a timm model with ``num_classes=0``, an open_clip
            image tower, ...).
        num_classes: outputs of both heads.
        feature_dim: ``D``; default ``backbone.num_features`` (timm) or ``backbone.output_dim``
            (open_clip).
        alpha, beta: the inference mix (DHO's ImageNet script: 0.5, 0.5).
    """

    fsdp_forward_methods = ("forward_heads",)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        feature_dim: int | None = None,
        kd_normalize: bool = True,
        kd_scale: float = 100.0,
        alpha: float = 0.5,
        beta: float = 0.5,
    ) -> None:
        super().__init__()
        feature_dim = feature_dim or getattr(backbone, "num_features", None) or getattr(backbone, "output_dim", None)
        if not feature_dim:
            raise ValueError(f"cannot tell the feature width of {type(backbone).__name__}; set feature_dim")
        self.backbone = backbone
        self.ce_head = nn.Linear(feature_dim, num_classes)
        self.kd_head = nn.Linear(feature_dim, num_classes)
        self.kd_normalize, self.kd_scale = kd_normalize, kd_scale
        check_mix(alpha, beta)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        if features.ndim != 2:
            raise ValueError(f"the backbone returned {list(features.shape)}, not [batch, features]; build it without a classifier (num_classes=0)")
        if self.kd_normalize:  # as the official code: the head's output is scaled, its bias too
            return self.ce_head(features), self.kd_head(F.normalize(features, dim=-1)) * self.kd_scale
        return self.ce_head(features), self.kd_head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return mix_log_probs(*self.forward_heads(images), self.alpha, self.beta)

    def set_mix(self, alpha: float, beta: float) -> None:
        check_mix(alpha, beta)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)


def dual_head_clip_student(
    model_name: str,
    class_names: list[str],
    pretrained: str | None = None,
    templates: str | list[str] = "imagenet7",
    init_heads_from_text: bool = True,
    replace_underscores: bool = True,
    **kwargs: Any,
) -> DualHeadStudent:
    """A :class:`DualHeadStudent` on an open_clip image tower (DHO's ImageNet students), both
    heads initialised from the student CLIP's own text embeddings: per class the plain mean of
    the prompt embeddings, unnormalised, as the official script does; biases zero. The class
    names' ``_`` become spaces in the prompts (``replace_underscores``), as the official
    ``StudentModel`` of ``train_imgnet_semi.py`` does."""
    import open_clip

    clip = create_clip(model_name, pretrained)
    student = DualHeadStudent(clip.visual, len(class_names), **kwargs)
    if init_heads_from_text:
        clip.eval()
        weights = zero_shot_weights(
            clip, open_clip.get_tokenizer(model_name), class_names, templates,
            normalize_prompts=False, renormalize=False, replace_underscores=replace_underscores,
        )  # fmt: skip
        with torch.no_grad():
            for head in (student.ce_head, student.kd_head):
                head.weight.copy_(weights.T)
                head.bias.zero_()
    return student


class DHO(Distiller):
    """Dual-head semi-supervised distillation, as the official ``train_imgnet_semi.py``.

    Each step takes one labelled and one unlabelled batch (``SemiSupervisedDataModule``),
    concatenated into one student forward pass (BatchNorm sees both, as in the official code),
    and the teacher's logits on the same images (the teacher's ``ImageAdapter`` resizes them to
    its own resolution). The loss::

        ce_weight * CE(ce_head(labelled), y)
          + kd_weight * (KD(kd_head(labelled), teacher) + KD(kd_head(unlabelled), teacher))

    with ``KD = T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch-mean, T = 2.
    The ImageNet script weighs 1, 1; its k-shot scripts 0.5, 0.5, which ``loss_lambda``
    (``lambda * CE + (1 - lambda) * KD``, the paper's notation) gives with 0.5.

    Inference mixes the heads (:func:`mix_log_probs`). ``mix="fixed"`` keeps ``alpha``/``beta``
    (0.5, 0.5 as the ImageNet script); ``mix="search"`` picks them on the validation split after
    every validation epoch (the k-shot scripts' grid), never on test. They live in the student's
    buffers, so the checkpoint carries them to ``validate``/``test``/``predict``. The k-shot
    script keeps the epoch of the best validation accuracy with its ``alpha``/``beta`` (the first
    one on ties: ``train_others.py:184-190``) and tests that; the shipped config's ``best.ckpt``
    (a ``ModelCheckpoint`` on ``val/acc``, ``mode: max``) is that checkpoint. Validation logs
    ``val/acc`` (the mix), ``val/acc_ce``, ``val/acc_kd``, ``val/alpha``, ``val/beta``; test logs
    ``test/acc``, ``test/acc_ce``, ``test/acc_kd`` and, after a search, ``test/acc_fixed_mix``
    (the configured ``alpha``/``beta``).

    Baselines from the same recipe: ``single_head=True`` puts the KD terms on the CE head
    (single-head KD); ``kd_weight=0`` trains the CE head on the labels alone. In both only the
    CE head learns, and inference uses it alone (alpha = 1).

    Which official script the training loop follows: the ImageNet ones. Each step is one
    unlabelled batch and one labelled batch (the labelled loader cycled), concatenated into one
    forward (``train_imgnet_semi.py:228-229``, ``train_imgnet.py:157-158``), and an epoch is a
    pass over the unlabelled set (``train_imgnet_semi.py:170, 278``). The CoOp k-shot script
    ``train_others.py`` differs in two ways: it runs two forwards, labelled then unlabelled (lines
    144-145), so a BatchNorm student normalises each with its own statistics
    (``separate_forwards=True`` does the same); and it zips the two loaders (line 117), so its
    epoch ends with the shorter one, the labelled set at k shots, and its schedule counts labelled
    batches (lines 99-102). mmkd's epoch stays a pass over the unlabelled set: for the k-shot
    length, set ``trainer.limit_train_batches`` to the number of labelled batches.

    Differences from the official code:

    - On the in-memory data sets the teacher sees the student's view resized to its own
      resolution. The official script takes one random crop at the teacher's resolution and
      resizes that crop to both sizes, so its teacher gets more detail when the source images
      are larger than the student's input (224 vs 378 px on ImageNet). On 28-px Fashion-MNIST
      both are resamplings of the same 28-px crop. On files
      (:class:`~mmkd.data.files.ImageFilesDataModule`) the teacher gets its own view of the one
      crop (``teacher_image``, from the CLIP's ``preprocess_cfg``), as the official script does.
    - The learning-rate schedule is warm-up then cosine to 0 (``warmup_epochs``). The official
      ``ChainedScheduler`` multiplies the two from step 0, so its cosine starts lower and ends
      early.
    - :class:`DualHeadStudent`'s default KD head is the semi-supervised ImageNet script's cosine
      head (×100), which that script pairs with heads initialised from the student CLIP's text
      embeddings. Its k-shot scripts give randomly initialised heads a plain linear KD head
      (``kd_normalize=False``), and with a student trained from scratch that pairing scored higher
      here (the README's DHO section).

    Args:
        student: a :class:`DualHeadStudent`.
        teacher: a ``Teacher`` around a :class:`~mmkd.models.clip.ZeroShotClassifier` (or any
            classifier over the same classes).
        temperature: KD temperature (2 in DHO).
        kd_weight: weight of each KD term.
        loss_lambda: if set, ``lambda * CE + (1 - lambda) * (KD_l + KD_u)`` instead of the weights.
        single_head: single-head KD baseline.
        mix: ``"fixed"`` or ``"search"``.
        alpha, beta: the fixed mix, and the start of a search.
        alpha_grid, beta_grid: the search grids (DHO's by default).
        separate_forwards: run the labelled and the unlabelled batch through the student one
            after the other, as the CoOp k-shot script does, instead of as one batch.
        **kwargs: ``ce_weight`` and the keys of :class:`~mmkd.core.distiller.Distiller`.
    """

    semi_supervised_batches = True

    def __init__(
        self,
        student: DualHeadStudent,
        teacher: nn.Module,
        temperature: float = 2.0,
        kd_weight: float = 1.0,
        loss_lambda: float | None = None,
        single_head: bool = False,
        mix: Literal["fixed", "search"] = "fixed",
        alpha: float = 0.5,
        beta: float = 0.5,
        alpha_grid: Sequence[float] = ALPHA_GRID,
        beta_grid: Sequence[float] = BETA_GRID,
        separate_forwards: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(student, DualHeadStudent):
            raise TypeError(f"DHO needs a DualHeadStudent, got {type(student).__name__}")
        super().__init__(student, teacher, **kwargs)
        self.temperature, self.kd_weight, self.loss_lambda = temperature, kd_weight, loss_lambda
        self.single_head, self.separate_forwards = single_head, separate_forwards
        if single_head or kd_weight == 0:  # only the CE head learns, and it alone decides
            student.kd_head.requires_grad_(False)  # unused: DDP needs no find_unused_parameters
            alpha, mix = 1.0, "fixed"
        self.mix = mix
        self.alpha_grid, self.beta_grid = [float(a) for a in alpha_grid], [float(b) for b in beta_grid]
        for grid_alpha in self.alpha_grid:
            for grid_beta in self.beta_grid:
                check_mix(grid_alpha, grid_beta)
        student.set_mix(alpha, beta)
        self.fixed_mix = (alpha, beta)
        self.fixed_mix_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_head_acc = nn.ModuleDict({head: MulticlassAccuracy(self.num_classes, average="micro") for head in ("ce", "kd")})
        self.test_head_acc = nn.ModuleDict({head: MulticlassAccuracy(self.num_classes, average="micro") for head in ("ce", "kd")})
        self._val_logits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def prepare_teacher(self, datamodule: Any) -> None:
        if datamodule is not None:
            set_input_normalization(self.teacher, datamodule, view=TEACHER_VIEW)
        super().prepare_teacher(datamodule)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        labels = labeled[self.label_key]
        if self.kd_weight == 0:
            ce_logits, _ = self.student.forward_heads(labeled[self.input_key])
            return self.total_loss({"ce": self.ce_weight * self.ce_loss(ce_logits, labels)}, "train", len(labels))
        # index and view: the rows of a teacher cache of recorded views (both heads' KD targets come from it)
        both = {key: torch.cat([labeled[key], unlabeled[key]]) for key in (self.input_key, TEACHER_VIEW, self.label_key, "index", "view") if key in labeled}
        images = both[self.input_key]
        if self.separate_forwards:  # train_others.py:144-145: BatchNorm normalises each batch by its own statistics
            labeled_heads = self.student.forward_heads(labeled[self.input_key])
            unlabeled_heads = self.student.forward_heads(unlabeled[self.input_key])
            ce_logits, kd_logits = (torch.cat(pair) for pair in zip(labeled_heads, unlabeled_heads))
        else:
            ce_logits, kd_logits = self.student.forward_heads(images)
        if self.single_head:
            kd_logits = ce_logits
        teacher_logits = self.teacher_outputs(both)[LOGITS]
        n = len(labels)
        ce = self.ce_loss(ce_logits[:n], labels)
        kd_labeled = kd_loss(kd_logits[:n], teacher_logits[:n], self.temperature)
        kd_unlabeled = kd_loss(kd_logits[n:], teacher_logits[n:], self.temperature)
        ce_weight, kd_weight = (self.loss_lambda, 1 - self.loss_lambda) if self.loss_lambda is not None else (self.ce_weight, self.kd_weight)
        losses = {"ce": ce_weight * ce, "kd_labeled": kd_weight * kd_labeled, "kd_unlabeled": kd_weight * kd_unlabeled}
        return self.total_loss(losses, "train", len(images))

    # -- evaluation: each head, and the mix ----------------------------------------------------
    def _head_logits(self, batch: dict, metrics: nn.ModuleDict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        ce_logits, kd_logits = self.student.forward_heads(batch[self.input_key])
        labels = batch[self.label_key]
        for head, logits in (("ce", ce_logits), ("kd", kd_logits)):
            metrics[head].update(logits, labels)
            self.log(f"{stage}/acc_{head}", metrics[head], batch_size=len(labels))
        return ce_logits, kd_logits

    def evaluation_logits(self, batch: dict, stage: str) -> torch.Tensor:
        ce_logits, kd_logits = self._head_logits(batch, self.test_head_acc, stage)
        if self.mix == "search":  # what the searched mix gained over the configured one
            fixed = mix_log_probs(ce_logits, kd_logits, *self.fixed_mix).argmax(-1)
            self.fixed_mix_acc.update(fixed, batch[self.label_key])
            self.log(f"{stage}/acc_fixed_mix", self.fixed_mix_acc, batch_size=len(fixed))
        return mix_log_probs(ce_logits, kd_logits, self.student.alpha, self.student.beta)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.update_teacher_accuracy(batch)
        ce_logits, kd_logits = self._head_logits(batch, self.val_head_acc, "val")
        self._val_logits.append((ce_logits.float(), kd_logits.float(), batch[self.label_key]))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val_logits:
            return
        ce_logits, kd_logits, labels = (torch.cat(parts) for parts in zip(*self._val_logits))
        self._val_logits.clear()
        if self.trainer.world_size > 1:  # every process searches on the whole split, so all agree
            ce_logits, kd_logits, labels = (self.all_gather(t).flatten(0, 1) for t in (ce_logits, kd_logits, labels))
        if not self.trainer.sanity_checking:
            grid = mix_grid(ce_logits, kd_logits, labels, self.alpha_grid, self.beta_grid)
            if self.mix == "search":
                alpha, beta, _ = search_mix(ce_logits, kd_logits, labels, grid=grid)
                self.student.set_mix(alpha, beta)
            folder = getattr(self.logger, "log_dir", None) if self.trainer.is_global_zero else None
            if folder:  # the accuracy over the whole grid, beside the logger's metrics.csv, for `mmkd plot`
                os.makedirs(folder, exist_ok=True)
                write_mix_surface(Path(folder) / "dho_mix_surface.csv", self.current_epoch, grid, len(labels))
        log_probs = mix_log_probs(ce_logits, kd_logits, self.student.alpha, self.student.beta)
        self.log("val/acc", (log_probs.argmax(-1) == labels).float().mean(), prog_bar=True)
        self.log("val/loss", F.nll_loss(log_probs, labels))
        self.log("val/alpha", self.student.alpha)
        self.log("val/beta", self.student.beta)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mmkd"]["dho"] = {"alpha": float(self.student.alpha), "beta": float(self.student.beta), "mix": self.mix}
