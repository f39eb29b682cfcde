"""Issue 22's fidelity repairs: each test states a behaviour of an official implementation, where it
comes from, and computes the expected value from that definition (never from mmkd's own output).

Sources: erjui/DHO at 846de75, pengzhiliang/G2SD at 6146adf, Gray-OREO/MST-Distill at 093b2fe,
Peterande/D-FINE at 4a1f73a (``../shared/reference/dho_g2sd.md`` and ``dfine_mst.md`` cite them).
"""

from __future__ import annotations

import copy
import csv
import inspect
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmkd.core.classifier import TrainingModule
from mmkd.data.common import ImageTensorDataset
from mmkd.cli import lightning_cli
from mmkd.core import Teacher
from mmkd.distillers.dho import DHO, DualHeadStudent, dual_head_clip_student, search_mix
from mmkd.distillers.g2sd import G2SDGeneric, G2SDSpecific
from mmkd.distillers.mst import MaskNet, MSTDistill
from mmkd.losses.detection import (
    DFINECriterion, DetectionOutputError, box_losses, ddf_loss, distance2bbox, fgl_loss, integral, inverse_sigmoid,
    union_matching, varifocal_loss, weighting_function,
)  # fmt: skip
from mmkd.models.detr import DFineDetector, contrastive_denoising_queries
from mmkd.models.av import AudioCNN, AVFusionNet, LeNet5
from mmkd.models import create_clip, timm_model
from mmkd.models.clip import ZeroShotClassifier, zero_shot_weights
from mmkd.models.vit import DistilledViT

from conftest import SHORT

REPO = Path(__file__).resolve().parents[1]


# -- item 1: DHO's (alpha, beta) search --------------------------------------------------------
# train_others.py, evaluate(search_param=True): best_acc = 0, best_alpha = 0, best_beta = 1.0;
# ``for beta in beta_range: for alpha in alpha_range: ... if acc > best_acc: keep``.
def official_dho_search(table: dict[tuple[float, float], int], alphas: list[float], betas: list[float]) -> tuple[float, float]:
    best_correct, best_alpha, best_beta = 0, 0.0, 1.0
    for beta in betas:
        for alpha in alphas:
            if table[(alpha, beta)] > best_correct:
                best_correct, best_alpha, best_beta = table[(alpha, beta)], alpha, beta
    return best_alpha, best_beta


def test_item1_dho_search_loops_beta_outer_alpha_inner_and_keeps_strict_improvements() -> None:
    alphas, betas = [0.0, 0.5, 1.0], [0.5, 1.0, 2.0]
    labels = torch.tensor([0, 1, 0])
    ce = torch.tensor([[1.0, -1.0], [3.0, 1.0], [3.0, 2.0]])
    kd = torch.tensor([[-1.0, 2.0], [2.0, -2.0], [-1.0, -3.0]])
    # correct predictions of every pair, counted by hand from p = a softmax(ce) + (1 - a) softmax(kd / b):
    # the CE head alone (alpha 1) gets samples 0 and 2, at alpha 0.5 only beta 2 flattens the KD head enough
    table = {(0.0, b): 1 for b in betas} | {(0.5, 0.5): 1, (0.5, 1.0): 1, (0.5, 2.0): 2} | {(1.0, b): 2 for b in betas}
    for (alpha, beta), correct in table.items():  # the table is the data's, not a guess
        mixed = alpha * ce.softmax(-1) + (1 - alpha) * (kd / beta).softmax(-1)
        assert int((mixed.argmax(-1) == labels).sum()) == correct
    # four pairs tie at 2 correct: alpha-outer order would keep (0.5, 2.0), the official beta-outer (1.0, 0.5)
    assert official_dho_search(table, alphas, betas) == (1.0, 0.5)
    assert search_mix(ce, kd, labels, alphas, betas) == (1.0, 0.5, pytest.approx(2 / 3))


def test_item1_dho_search_keeps_the_official_fallback_when_nothing_is_right() -> None:
    labels = torch.tensor([1, 1])
    ce = kd = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # both heads always say class 0
    assert search_mix(ce, kd, labels, [0.0, 0.5, 1.0], [0.5, 2.0]) == (0.0, 1.0, 0.0)


# -- item 2: DHO's best epoch --------------------------------------------------------------------
# train_others.py:184-190: after each epoch's search on val, ``if val_acc > best_val_acc:`` keep
# (epoch, alpha, beta) and save the student with that alpha/beta; the test split is scored with it.
def test_item2_best_ckpt_is_the_first_epoch_of_the_best_val_acc_with_its_mix(tmp_path: Path, data_root: Path) -> None:
    torch.manual_seed(0)
    Path("runs/dho").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in create_clip("mmkd-clip-tiny").state_dict().items()}, "runs/dho/clip_fmnist.safetensors")
    lightning_cli(["fit", "-c", str(REPO / "configs/dho/fmnist.yaml"), *SHORT, "--trainer.max_epochs=4", "--trainer.limit_train_batches=4",
                   "--model.init_args.mix=search", "--model.init_args.alpha_grid=[0.0, 0.5, 1.0]", "--model.init_args.beta_grid=[0.5, 2.0]"])  # fmt: skip
    [metrics] = Path("runs/logs").rglob("metrics.csv")
    epochs = [row for row in csv.DictReader(open(metrics)) if row["val/acc"]]
    assert len(epochs) == 4
    best_val_acc, best = 0.0, None
    for row in epochs:  # the official rule, on what each epoch logged
        if float(row["val/acc"]) > best_val_acc:
            best_val_acc, best = float(row["val/acc"]), row
    checkpoint = torch.load("runs/dho/fmnist/best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == int(best["epoch"])
    assert (checkpoint["mmkd"]["dho"]["alpha"], checkpoint["mmkd"]["dho"]["beta"]) == pytest.approx((float(best["val/alpha"]), float(best["val/beta"])))


# -- item 3: DHO's forwards ------------------------------------------------------------------------
def test_item3_separate_forwards_are_the_k_shot_scripts_two_batches() -> None:
    """train_others.py:144-166: ``student(labeled)`` and ``student(unlabeled)`` in two calls, CE on the
    labelled CE head, KD (T = 2, T^2, batchmean) on each batch's KD head; the ImageNet scripts
    (train_imgnet_semi.py:228-229) concatenate the two batches into one forward, which is mmkd's
    default. With a BatchNorm student in train mode the two differ."""
    torch.manual_seed(0)
    backbone = timm_model("resnet10t", num_classes=0, in_chans=1, model_args={"channels": [4, 8, 16, 32], "stem_width": 4})
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)))
    labeled, unlabeled = torch.randn(3, 1, 28, 28), torch.randn(5, 1, 28, 28) + 1.0  # different batch statistics
    labels = torch.tensor([1, 2, 3])
    batch = {"labeled": {"image": labeled, "label": labels}, "unlabeled": {"image": unlabeled, "label": torch.full((5,), -1)}}

    def training_losses(**kwargs) -> tuple[dict, DualHeadStudent]:
        model = DHO(DualHeadStudent(copy.deepcopy(backbone), 10), teacher, loss_lambda=0.5, **kwargs)
        logged: dict = {}
        model.total_loss = lambda terms, stage, size: logged.update(terms) or sum(terms.values())
        model.train()
        model.training_step(batch, 0)
        return logged, model.student

    def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student_logits / 2, dim=1), F.softmax(teacher_logits / 2, dim=1), reduction="batchmean") * 4

    logged, student = training_losses(separate_forwards=True)
    ce_labeled, kd_labeled = student.forward_heads(labeled)  # train mode: each batch's own statistics
    _, kd_unlabeled = student.forward_heads(unlabeled)
    official = {"ce": 0.5 * F.cross_entropy(ce_labeled, labels), "kd_labeled": 0.5 * kd(kd_labeled, teacher(labeled)),
                "kd_unlabeled": 0.5 * kd(kd_unlabeled, teacher(unlabeled))}  # fmt: skip
    for term, value in official.items():
        torch.testing.assert_close(logged[term], value)
    concatenated, _ = training_losses()
    assert abs(float(concatenated["kd_unlabeled"] - official["kd_unlabeled"])) > 1e-3


# -- item 4: DHO's class names in the prompts --------------------------------------------------
class RecordingTextTower(nn.Module):
    """encode_text of a CLIP stand-in: one fixed vector per prompt seen, prompts recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.prompts: list[str] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(tokens), 4)


def test_item4_underscores_become_spaces_on_the_openai_paths_only() -> None:
    tower = RecordingTextTower()

    def tokenizer(texts: list[str]) -> torch.Tensor:
        tower.prompts += texts
        return torch.zeros(len(texts), 1, dtype=torch.long)

    templates = ["a photo of a {}."]
    zero_shot_weights(tower, tokenizer, ["ankle_boot"], templates)  # clip_classifier: classname.replace('_', ' ')
    zero_shot_weights(tower, tokenizer, ["ankle_boot"], templates, replace_underscores=False)  # the DFN5B path: as is
    assert tower.prompts == ["a photo of a ankle boot.", "a photo of a ankle_boot."]
    for builder in (zero_shot_weights, ZeroShotClassifier, dual_head_clip_student):  # the OpenAI-CLIP default
        assert inspect.signature(builder).parameters["replace_underscores"].default is True
    for recipe in ("imagenet_1pct.yaml", "imagenet_10pct.yaml"):  # the DFN5B teacher recipes keep the names
        config = yaml.safe_load((REPO / "configs" / "dho" / recipe).read_text())
        teacher = config["model"]["init_args"]["teacher"]["init_args"]["model"]["init_args"]
        assert teacher["model_name"].startswith("ViT-H-14-378") and teacher["replace_underscores"] is False


# -- item 5: G2SD's learning-rate schedule -----------------------------------------------------
def official_mae_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """G2SD/util/lr_sched.py adjust_learning_rate, called with data_iter_step / len(data_loader) + epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


class RecordsLearningRates(TrainingModule):
    """A linear model on random data, two parameter groups (one with a layer-decay lr_scale)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2), **kwargs)
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 1)
        self.seen: list[tuple[float, float]] = []

    def param_groups(self) -> list[dict]:
        return [{"params": self.first.parameters(), "lr_scale": 0.5}, {"params": self.second.parameters()}]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.second(self.first(batch)).pow(2).mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append(tuple(group["lr"] for group in optimizer.param_groups))


def test_item5_g2sd_schedule_warms_up_from_zero_and_decays_to_min_lr(tmp_path: Path) -> None:
    lr, min_lr, warmup_epochs, epochs, batches, accumulate = 1e-2, 1e-4, 1.5, 3, 8, 2
    module = RecordsLearningRates(warmup_epochs=warmup_epochs, min_lr=min_lr, warmup_from_zero=True)
    trainer = L.Trainer(
        max_epochs=epochs, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(torch.randn(batches, 3), batch_size=1))
    # the official loop sets the lr at every data_iter_step % accum_iter == 0, from the fractional epoch
    expected = [
        official_mae_lr(epoch + step / batches, lr, min_lr, warmup_epochs, epochs)
        for epoch in range(epochs) for step in range(0, batches, accumulate)
    ]  # fmt: skip
    assert len(module.seen) == len(expected) and expected[0] == 0.0
    for (scaled, plain), official in zip(module.seen, expected):
        assert plain == pytest.approx(official, rel=1e-9, abs=1e-15)
        assert scaled == pytest.approx(0.5 * official, rel=1e-9, abs=1e-15)  # lr_scale multiplies lr and min_lr alike
    # G2SD's defaults: the generic stage's --min_lr 2.5e-6 (main_distill.py), the specific one's 1e-6
    # (main_finetune_dis.py), both with MAE's warm-up from 0; the recipes set the same
    for cls, official_min_lr in ((G2SDGeneric, 2.5e-6), (G2SDSpecific, 1e-6)):
        parameters = inspect.signature(cls).parameters
        assert parameters["min_lr"].default == official_min_lr and parameters["warmup_from_zero"].default is True
    for recipe, official_min_lr in (("generic", 2.5e-6), ("imagenet_generic", 2.5e-6), ("specific", 1e-6), ("imagenet_specific", 1e-6)):
        model_args = yaml.safe_load((REPO / "configs" / "g2sd" / f"{recipe}.yaml").read_text())["model"]["init_args"]
        assert float(model_args["min_lr"]) == official_min_lr and model_args["warmup_from_zero"] is True


def test_item5_min_lr_above_the_peak_is_refused(tmp_path: Path) -> None:
    module = RecordsLearningRates(warmup_epochs=1, min_lr=1.0)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="min_lr=1.0 is above the optimizer's lr=0.01"):
        trainer.fit(module, DataLoader(torch.randn(2, 3), batch_size=1))


# -- item 6: G2SD's distillation head ----------------------------------------------------------
def test_item6_head_dist_starts_at_std_0_02_and_the_class_head_at_2e_5() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=100, embed_dim=192, depth=1, num_heads=2)
    model = DistilledViT(encoder)
    # models_vit.py: head_dist.apply(self._init_weights), timm's ViT init: trunc_normal_(std=.02), bias 0;
    # main_finetune_dis.py: trunc_normal_(model.head.weight, std=2e-5) after loading the checkpoint
    assert model.head_dist.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.encoder.head.weight.std().item() == pytest.approx(2e-5, rel=0.03)
    assert not model.head_dist.bias.any() and not model.encoder.head.bias.any()


# -- item 7: G2SD's specific-stage augmentation ------------------------------------------------
def test_item7_in_memory_images_get_timms_randaugment_and_random_erasing() -> None:
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    from mmkd.data.views import ViewSpec, _auto_augment

    # main_finetune_dis.py defaults: --aa rand-m9-mstd0.5-inc1, --reprob 0.25 (pixel mode), built by timm's
    # create_transform with translate_const = int(0.45 * img_size) and img_mean = round(255 * mean)
    transform = _auto_augment("rand-m9-mstd0.5-inc1", ViewSpec(size=(28, 28), mean=(0.286,), std=(0.353,), channels=1))
    assert transform.num_layers == 2 and [op.name for op in transform.ops] == list(_RAND_INCREASING_TRANSFORMS)
    assert {(op.magnitude, op.magnitude_std) for op in transform.ops} == {(9, 0.5)}
    assert transform.ops[0].hparams["translate_const"] == int(0.45 * 28)
    assert transform.ops[0].hparams["img_mean"] == (73, 73, 73)

    # at the magnitude cap (mstd noise takes m9 to 10 in ~2 % of draws) PosterizeIncreasing keeps 4 - 4 = 0
    # bits; the Pillow of MAE's days mapped every level i to i & ~(2 ** (8 - 0) - 1) = 0 (black), Pillow >= 10
    # raises instead, which would stop a training run
    from PIL import Image

    posterize = next(op for op in transform.ops if op.name == "PosterizeIncreasing")
    grey = Image.new("RGB", (28, 28), (200, 120, 7))
    old_pillow = [i & ~(2 ** (8 - 0) - 1) for i in (200, 120, 7)]
    assert posterize.aug_fn(grey, 0).getpixel((3, 3)) == tuple(old_pillow) == (0, 0, 0)
    assert posterize.aug_fn(grey, 2).getpixel((3, 3)) == tuple(i & ~(2 ** (8 - 2) - 1) for i in (200, 120, 7))

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.zeros(400, dtype=torch.long)
    common = dict(mean=0.286, std=0.353, augment=True, pad=0, hflip=False, seed=3)
    plain = ImageTensorDataset(images, labels, **common)
    keys = [(i, 0) for i in range(400)]
    reference = plain.__getitems__(keys)["image"]
    randaugmented = ImageTensorDataset(images, labels, auto_augment="rand-m9-mstd0.5-inc1", **common).__getitems__(keys)["image"]
    # two ops of 15 per image, each applied with timm's probability 0.5: about 3/4 of the images change
    # (less where an op leaves noise as it is, e.g. AutoContrast of an image that spans 0..255)
    assert {op.prob for op in transform.ops} == {0.5}
    assert 0.5 < (randaugmented != reference).flatten(1).any(1).float().mean() <= 0.8
    erased = ImageTensorDataset(images, labels, re_prob=0.25, **common)
    changed = (erased.__getitems__(keys)["image"] != reference).flatten(1).any(1)
    assert 60 <= int(changed.sum()) <= 140  # p = 0.25 of 400 images: 100 +- 4.6 standard deviations
    torch.testing.assert_close(erased.__getitems__(keys)["image"], erased.__getitems__(keys)["image"])  # seeded per sample
    assert not torch.equal(erased.__getitems__([(i, 1) for i in range(400)])["image"], erased.__getitems__(keys)["image"])
    # not on evaluation splits (augment off), and the Fashion-MNIST recipe of the specific stage asks for both
    evaluation = ImageTensorDataset(images, labels, mean=0.286, std=0.353, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0)
    torch.testing.assert_close(evaluation.__getitems__(keys)["image"], (images.float() / 255 - 0.286).div(0.353).unsqueeze(1))
    data_args = yaml.safe_load((REPO / "configs" / "g2sd" / "specific.yaml").read_text())["data"]["init_args"]
    assert data_args["auto_augment"] == "rand-m9-mstd0.5-inc1" and data_args["re_prob"] == 0.25


# -- item 8: MST-Distill's model selection -----------------------------------------------------
# main-MST-Distill.py, stage-3 validation: L_s_val += loss.item() per batch; L_s_val / (i + 1); the
# lowest L_s_val keeps model_s. Each batch counts once, a short last batch as much as a full one.
def ce_margin(ce: float, num_classes: int = 10) -> float:
    """The logit margin of the true class over the others (all equal) that gives this cross-entropy:
    CE = log(1 + (C - 1) exp(-margin))."""
    return -math.log((math.exp(ce) - 1.0) / (num_classes - 1))


class ScriptedStudent(nn.Module):
    """A student whose per-sample validation CE is a table of (epoch, sample): the sample's index is
    pixel [0, 0, 0] of its image; the epoch is a buffer (part of the state the selection keeps)."""

    def __init__(self, ce_table: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.margins = torch.tensor([[ce_margin(c) for c in row] for row in ce_table])
        self.w = nn.Parameter(torch.zeros(()))  # gives the stage-3 losses a graph (zero gradient)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        index = image[:, 0, 0, 0].long()
        margin = self.margins[self.epoch.clamp(max=len(self.margins) - 1), index]
        return torch.cat([margin[:, None], torch.zeros(len(margin), 9)], 1) + 0 * self.w


class AVPairs(Dataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        image = torch.zeros(1, 28, 28)
        image[0, 0, 0] = i
        return {"image": image, "audio": torch.zeros(1, 32, 32), "label": torch.tensor(0)}


class AVPairsModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(AVPairs(2), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(AVPairs(5), batch_size=4)  # batches of 4 and 1


class SetsTheEpoch(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        module.model.epoch.fill_(trainer.current_epoch)


@pytest.mark.parametrize(("average", "selected"), [("batches", 0), ("samples", 1)])
def test_item8_mst_selects_by_the_mean_of_per_batch_validation_losses(tmp_path: Path, average: str, selected: int) -> None:
    # epoch 0: CE 1.0 on the full batch, 0.1 on the single last sample; epoch 1: 0.7 everywhere
    table = [[1.0, 1.0, 1.0, 1.0, 0.1], [0.7] * 5]
    batch_means = [(1.0 + 0.1) / 2, 0.7]  # 0.55 < 0.7: the official picks epoch 0
    sample_means = [(4 * 1.0 + 0.1) / 5, 0.7]  # 0.82 > 0.7: sample weighting would pick epoch 1
    assert min(range(2), key=batch_means.__getitem__) == 0 and min(range(2), key=sample_means.__getitem__) == 1
    torch.manual_seed(0)
    module = MSTDistill(
        ScriptedStudent(table), AVFusionNet(), AudioCNN(), stage_epochs=(0, 0, 2), hidden_dim_factor=8,
        input_shapes={"image": [1, 28, 28], "audio": [1, 32, 32]}, selection_average=average,
    )  # fmt: skip
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[SetsTheEpoch()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=AVPairsModule())
    assert int(module.model.epoch) == selected  # the state kept at the end of stage 3
    assert inspect.signature(MSTDistill).parameters["selection_average"].default == "batches"


# -- item 9: MST-Distill's AV-MNIST models and MaskNets ----------------------------------------
def test_item9_lenet5_average_pools_and_the_fusion_net_has_no_relu_between_fc1_and_fc2() -> None:
    torch.manual_seed(0)
    lenet = LeNet5()
    x = torch.randn(3, 1, 28, 28)

    def average_2x2(t: torch.Tensor) -> torch.Tensor:  # nn.AvgPool2d(kernel_size=2, stride=2), models/LeNet5.py
        b, c, h, w = t.shape
        return t.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))

    x1 = average_2x2(F.relu(lenet.conv1(x)))
    x2 = average_2x2(F.relu(lenet.conv2(x1)))
    expected = F.relu(lenet.fc1(F.relu(lenet.conv3(x2)).flatten(1)))
    torch.testing.assert_close(lenet.features(x), expected)
    torch.testing.assert_close(lenet(x), lenet.fc2(expected))

    fusion = AVFusionNet()
    audio = torch.randn(3, 1, 32, 32)
    fused = torch.cat([fusion.image.features(x), fusion.audio.features(audio)], 1)
    # models/CNNs.py IntermediateFusionNet.forward: x = self.fc1(concat_feature); x = self.fc2(x)
    torch.testing.assert_close(fusion(x, audio), fusion.fc2(fusion.fc1(fused)))


def test_item9_2d_masknet_reduction_convs_have_no_bias() -> None:
    channels = 32
    masknet = MaskNet(channels, spatial=True, hidden_dim_factor=8, heads=3)
    convs = [m for m in masknet.reduce if isinstance(m, nn.Conv2d)]
    assert [c.bias for c in convs] == [None, None]
    # KD_methods/MST.py SpatialReduction: depthwise 3x3 (C * 9) + 1x1 (C * C), both bias=False, + BN (2 C)
    assert sum(p.numel() for p in masknet.reduce.parameters()) == channels * 9 + channels * channels + 2 * channels


def test_item9_checkpoints_with_the_old_masknet_biases_name_the_option_that_loads_them() -> None:
    def module(**kwargs) -> MSTDistill:
        torch.manual_seed(0)
        built = MSTDistill(LeNet5(), AVFusionNet(), AudioCNN(), stage_epochs=(1, 1, 1), hidden_dim_factor=8,
                           input_shapes={"image": [1, 28, 28], "audio": [1, 32, 32]}, **kwargs)  # fmt: skip
        built.build_masknets(built.observe_mask_shapes())
        return built

    old = module(masknet_reduction_bias=True)  # a checkpoint of mmkd's MaskNets before the fix
    assert old.masknets["cm0"].reduce[0].bias is not None
    with pytest.raises(ValueError, match=r"2-D MaskNets \(cm0, cm1\) with biases .* set model.init_args.masknet_reduction_bias=true"):
        module().on_load_checkpoint({"state_dict": old.state_dict(), "mmkd": {}})
    reloaded = module(masknet_reduction_bias=True)
    reloaded.on_load_checkpoint({"state_dict": old.state_dict(), "mmkd": {}})
    reloaded.load_state_dict(old.state_dict())  # strict: every key matches
    new = module()
    with pytest.raises(ValueError, match="without biases .*masknet_reduction_bias=false"):
        reloaded.check_masknet_bias(new.state_dict(), "the checkpoint")


# -- item 11: D-FINE's output layout -----------------------------------------------------------
NUM_CLASSES, QUERIES, REG_MAX = 3, 6, 32


def dfine_outputs(num_layers: int = 3) -> dict:
    """A detector's training outputs in mmkd's layout (every layer refines the same reference box)."""
    g = torch.Generator().manual_seed(0)
    project = weighting_function(REG_MAX, torch.tensor(0.5), torch.tensor(4.0))
    ref = torch.rand(1, QUERIES, 4, generator=g).mul(0.3).add(0.3)
    layers = []
    for _ in range(num_layers):
        corners = torch.randn(1, QUERIES, 4 * (REG_MAX + 1), generator=g)
        boxes = distance2bbox(ref, integral(corners, project), 4.0)
        layers.append({"pred_logits": torch.randn(1, QUERIES, NUM_CLASSES, generator=g), "pred_boxes": boxes, "pred_corners": corners, "ref_points": ref})
    final = layers[-1]
    aux = [dict(layer, teacher_corners=final["pred_corners"], teacher_logits=final["pred_logits"]) for layer in layers[:-1]]
    box = lambda: torch.rand(1, QUERIES, 4, generator=g).mul(0.3).add(0.3)  # noqa: E731
    return dict(
        final, aux_outputs=aux,
        pre_outputs={"pred_logits": torch.randn(1, QUERIES, NUM_CLASSES, generator=g), "pred_boxes": box()},
        enc_outputs=[{"pred_logits": torch.randn(1, QUERIES, NUM_CLASSES, generator=g), "pred_boxes": box()}],
    )  # fmt: skip


TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.6, 0.4, 0.3, 0.2]])}]


def official_layout(outputs: dict) -> dict:
    """The same outputs as the official DFINETransformer returns them in training (dfine_decoder.py):
    encoder proposals under enc_aux_outputs, enc_meta, and the FDR constants up and reg_scale."""
    official = {key: value for key, value in outputs.items() if key != "enc_outputs"}
    official["enc_aux_outputs"] = outputs["enc_outputs"]
    official["enc_meta"] = {"class_agnostic": False}
    official["up"], official["reg_scale"] = nn.Parameter(torch.tensor([0.5]), requires_grad=False), nn.Parameter(torch.tensor([4.0]), requires_grad=False)
    return official


def test_item11_the_official_output_layout_gives_every_term() -> None:
    criterion = DFINECriterion(NUM_CLASSES)
    mmkd_layout = dfine_outputs()
    # dfine_criterion.py: vfl/boxes/local on the final layer (no ddf), the same with _aux_{i}, vfl/boxes with
    # _pre, and vfl/boxes with _enc_{i} for every entry of enc_aux_outputs
    expected_keys = {"loss_vfl", "loss_bbox", "loss_giou", "loss_fgl"}
    for i in range(2):
        expected_keys |= {f"loss_{k}_aux_{i}" for k in ("vfl", "bbox", "giou", "fgl", "ddf")}
    expected_keys |= {f"loss_{k}_{part}" for k in ("vfl", "bbox", "giou") for part in ("pre", "enc_0")}
    from_mmkd = criterion(mmkd_layout, TARGETS)
    from_official = criterion(official_layout(mmkd_layout), TARGETS)
    assert set(from_mmkd) == set(from_official) == expected_keys
    for key in expected_keys:
        torch.testing.assert_close(from_official[key], from_mmkd[key])
    assert from_official["loss_bbox_enc_0"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.update(dn_outputs=[], dn_meta={}), r"dn_meta lacks \['dn_num_group', 'dn_positive_idx'\]"),
        (lambda o: o.update(enc_output=o.pop("enc_aux_outputs")), r"unknown detector outputs \['enc_output'\]"),
        (lambda o: o.update(enc_outputs=o["enc_aux_outputs"]), "both enc_outputs .* and enc_aux_outputs"),
        (lambda o: o["aux_outputs"][0].update(pred_corner=o["aux_outputs"][0].pop("pred_corners")), r"unknown keys \['pred_corner'\]"),
        (lambda o: o.update(reg_scale=torch.tensor(8.0)), "reg_scale=8.0 differs from the criterion's reg_scale=4.0"),
        (lambda o: o.update(enc_meta={"class_agnostic": True}), "class_agnostic=True"),
    ],
)
def test_item11_outputs_the_criterion_cannot_take_are_named_errors(change, message: str) -> None:
    outputs = official_layout(dfine_outputs())
    change(outputs)
    with pytest.raises(DetectionOutputError, match=message):
        DFINECriterion(NUM_CLASSES)(outputs, TARGETS)


# -- item 12: the precision of D-FINE's weighting function --------------------------------------------
def official_training_weighting(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """D-FINE src/zoo/dfine/dfine_utils.py, weighting_function(deploy=False), lines 41-45 (and the
    concatenation after them): tensor arithmetic on the decoder's frozen float32 parameters
    ``up = nn.Parameter(torch.tensor([0.5]))`` and ``reg_scale = nn.Parameter(torch.tensor([4.0]))``
    (dfine_decoder.py lines 520-521)."""
    upper_bound1 = abs(up[0]) * abs(reg_scale)
    upper_bound2 = abs(up[0]) * abs(reg_scale) * 2
    step = (upper_bound1 + 1) ** (2 / (reg_max - 2))
    left_values = [-((step) ** i) + 1 for i in range(reg_max // 2 - 1, 0, -1)]
    right_values = [(step) ** i - 1 for i in range(1, reg_max // 2)]
    return torch.cat([-upper_bound2, *left_values, torch.zeros_like(up[0][None]), *right_values, upper_bound2], 0)


@pytest.mark.parametrize("reg_max, reg_scale", [(32, 4.0), (32, 8.0), (16, 4.0)])
def test_item12_the_weighting_table_is_the_official_float32_one_bit_for_bit(reg_max: int, reg_scale: float) -> None:
    up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
    official = official_training_weighting(reg_max, up, nn.Parameter(torch.tensor([reg_scale]), requires_grad=False))
    ours = weighting_function(reg_max, up, reg_scale)
    assert ours.dtype == official.dtype == torch.float32
    assert torch.equal(ours, official)


# -- item 10: D-FINE's contrastive denoising (CDN) ---------------------------------------------------
# D-FINE src/zoo/dfine/denoising.py (get_contrastive_denoising_training_group, from RT-DETR), with the
# defaults of DFINETransformer (num_denoising 100, label_noise_ratio 0.5, box_noise_scale 1.0):
# M = most GT of an image, G = max(1, num_denoising // M) groups of M positives then M negatives;
# positives' edges move by u * size / 2, u ~ U[0, 1), negatives' by U[1, 2); the matching queries
# cannot see the denoising ones, a group cannot see another; positive j of group g is query 2Mg + j.
CDN_TARGETS = [
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.45, 0.55, 0.16, 0.12]])},
]


def test_item10_denoising_groups_indices_and_attention_mask_follow_the_official_definition() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(4, 8, padding_idx=3)
    content, boxes_unact, mask, meta = contrastive_denoising_queries(CDN_TARGETS, 3, 5, embed, num_denoising=10,
                                                                     label_noise_ratio=0.0, box_noise_scale=0.0)  # fmt: skip
    most, groups = 2, 5  # 10 // 2
    total = 2 * most * groups
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [total, 5]
    assert meta["dn_positive_idx"][0].tolist() == [2 * most * g + j for g in range(groups) for j in range(2)]
    assert meta["dn_positive_idx"][1].tolist() == [2 * most * g for g in range(groups)]
    # no noise: every query of a group is a copy of the image's GT, padded with the padding class (zero embedding)
    for g in range(groups):
        for half in (0, 1):
            start = 2 * most * g + most * half
            torch.testing.assert_close(content[0, start : start + 2], embed(torch.tensor([0, 2])))
            torch.testing.assert_close(boxes_unact[0, start : start + 2], inverse_sigmoid(CDN_TARGETS[0]["boxes"]))
            assert torch.equal(content[1, start + 1], torch.zeros(8))
    expected = torch.zeros(total + 5, total + 5, dtype=torch.bool)
    for row in range(total + 5):
        for col in range(total):
            expected[row, col] = row >= total or row // (2 * most) != col // (2 * most)
    assert torch.equal(mask, expected)


def test_item10_positive_boxes_move_under_half_a_size_and_negatives_between_one_and_two_halves() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(4, 8, padding_idx=3)
    _, boxes_unact, _, meta = contrastive_denoising_queries(CDN_TARGETS[1:], 3, 5, embed, num_denoising=400, label_noise_ratio=0.0)
    gt = CDN_TARGETS[1]["boxes"][0]
    x1, y1, x2, y2 = gt[0] - gt[2] / 2, gt[1] - gt[3] / 2, gt[0] + gt[2] / 2, gt[1] + gt[3] / 2  # far from the borders: no clipping
    boxes = boxes_unact[0].sigmoid()
    edges = torch.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1)
    half = torch.stack([gt[2], gt[3], gt[2], gt[3]]) / 2
    original = torch.stack([x1, y1, x2, y2])
    positive = torch.zeros(len(boxes), dtype=torch.bool)
    positive[meta["dn_positive_idx"][0]] = True
    moved = (edges[positive] - original).abs() / half
    assert moved.max() < 1 + 1e-4
    # a negative may cross its opposite edge; the box keeps the two edges of each axis in order (the width's sign dropped)
    for box in edges[~positive]:
        for axis in (0, 1):
            low, high = box[axis], box[axis + 2]
            bands = [((edge - original[i]).abs() / half[i]).item() for edge, i in ((low, axis), (high, axis + 2))]
            swapped = [((edge - original[i]).abs() / half[i]).item() for edge, i in ((high, axis), (low, axis + 2))]
            assert any(all(1 - 1e-4 <= b < 2 + 1e-4 for b in pair) for pair in (bands, swapped))
    # label noise 0.5: a label is redrawn uniformly with probability 0.25, so it changes with probability 0.25 * 2/3
    content, _, _, _ = contrastive_denoising_queries(CDN_TARGETS[1:], 3, 5, embed, num_denoising=4000)
    labels = (content[0, :, None] == embed.weight[None]).all(-1).float().argmax(-1)
    assert abs((labels != 1).float().mean().item() - 0.25 * 2 / 3) < 0.02


def cdn_detector() -> DFineDetector:
    """A small detector whose FDR heads are moved off their zero initialisation, so that the layers differ."""
    torch.manual_seed(0)
    model = DFineDetector(3, backbone="resnet10t", hidden_dim=32, num_queries=10, num_heads=2, ffn_dim=64).train()
    with torch.no_grad():
        for parameter in model.decoder.fdr.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_item10_the_matching_queries_never_see_the_denoising_queries() -> None:
    """With the attention mask, the matching queries' outputs are those of the same detector without denoising."""
    model = cdn_detector()
    images = torch.randn(2, 3, 64, 64)
    with_dn = model(images, CDN_TARGETS)
    model.decoder.num_denoising = 0
    without = model(images)
    assert len(with_dn["dn_outputs"]) == 3 and with_dn["dn_outputs"][0]["pred_logits"].shape[1] == 2 * 2 * 50
    for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points"):
        torch.testing.assert_close(with_dn[key], without[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_dn["pre_outputs"]["pred_boxes"], without["pre_outputs"]["pred_boxes"], rtol=1e-5, atol=1e-5)
    last = with_dn["dn_outputs"][-1]
    assert all(torch.equal(layer["teacher_corners"], last["pred_corners"]) for layer in with_dn["dn_outputs"])
    with pytest.raises(ValueError, match=r"model\(images, targets\), or set num_denoising: 0"):
        model.decoder.num_denoising = 100
        model(images)


def test_item10_denoising_losses_use_the_known_matching_and_the_last_aux_layers_ddf_counts() -> None:
    """dfine_criterion.py, "cdn auxiliary losses": indices from get_cdn_matched_indices, dn_num_boxes = num_boxes *
    dn_num_group, the FGL targets of the denoising references, DDF's num_pos/num_neg kept from the last
    non-denoising layer (the last auxiliary one); keys _dn_{i} for every layer and _dn_pre."""
    model = cdn_detector()
    outputs = model(torch.randn(2, 3, 64, 64), CDN_TARGETS)
    criterion = DFINECriterion(3)
    losses = criterion(outputs, CDN_TARGETS)
    dn_keys = {f"loss_{k}_dn_{i}" for k in ("vfl", "bbox", "giou", "fgl", "ddf") for i in range(3)} | {f"loss_{k}_dn_pre" for k in ("vfl", "bbox", "giou")}
    assert dn_keys <= set(losses) and len(dn_keys) == 18
    groups = outputs["dn_meta"]["dn_num_group"]
    matching = [(torch.arange(groups)[:, None] * 4 + torch.arange(len(t["labels"]))[None]).reshape(-1) for t in CDN_TARGETS]
    indices = [(queries, torch.arange(len(t["labels"])).repeat(groups)) for queries, t in zip(matching, CDN_TARGETS)]
    num_boxes = 3.0 * groups
    # the last auxiliary layer's DDF counts: its matched queries (the union matching) x 4 edges, and the rest
    matcher = criterion.matcher
    named = [outputs, *outputs["aux_outputs"], outputs["pre_outputs"], *outputs["enc_outputs"]]
    union = union_matching([matcher(o["pred_logits"], o["pred_boxes"], CDN_TARGETS) for o in named])
    matched = 4.0 * sum(len(q) for q, _ in union)
    counts = (matched, 4.0 * 2 * 10 - matched)
    weights = {"vfl": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}
    for i, layer in enumerate(outputs["dn_outputs"]):
        torch.testing.assert_close(losses[f"loss_vfl_dn_{i}"], weights["vfl"] * varifocal_loss(layer["pred_logits"], layer["pred_boxes"], CDN_TARGETS, indices, num_boxes))
        l1, giou = box_losses(layer["pred_boxes"], CDN_TARGETS, indices, num_boxes)
        torch.testing.assert_close(losses[f"loss_bbox_dn_{i}"], weights["bbox"] * l1)
        torch.testing.assert_close(losses[f"loss_giou_dn_{i}"], weights["giou"] * giou)
        torch.testing.assert_close(losses[f"loss_fgl_dn_{i}"], weights["fgl"] * fgl_loss(layer["pred_corners"], layer["ref_points"], layer["pred_boxes"], CDN_TARGETS, indices, num_boxes))
        expected_ddf = ddf_loss(layer["pred_corners"], layer["teacher_corners"], layer["teacher_logits"], layer["pred_boxes"], CDN_TARGETS, indices, 5.0, counts)
        torch.testing.assert_close(losses[f"loss_ddf_dn_{i}"], weights["ddf"] * expected_ddf)
    assert losses["loss_ddf_dn_2"] == 0  # the last denoising layer is its own teacher
    assert losses["loss_ddf_dn_0"] != weights["ddf"] * ddf_loss(*(outputs["dn_outputs"][0][k] for k in ("pred_corners", "teacher_corners", "teacher_logits", "pred_boxes")), CDN_TARGETS, indices)
    pre = outputs["dn_pre_outputs"]
    torch.testing.assert_close(losses["loss_vfl_dn_pre"], varifocal_loss(pre["pred_logits"], pre["pred_boxes"], CDN_TARGETS, indices, num_boxes))
    sum(losses.values()).backward()
    assert model.decoder.denoising_class_embed.weight.grad[:3].abs().sum() > 0


def test_item10_a_batch_without_objects_keeps_every_denoising_key() -> None:
    """denoising.py: no GT in the batch gives dn_num_group 0; the criterion clamps dn_num_boxes at 1 and
    keeps every key, so DDP ranks stay in step."""
    torch.manual_seed(0)
    model = DFineDetector(3, backbone="resnet10t", hidden_dim=32, num_queries=10, num_heads=2, ffn_dim=64).train()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    outputs = model(torch.randn(2, 3, 64, 64), empty)
    assert outputs["dn_meta"]["dn_num_group"] == 0 and outputs["dn_outputs"][0]["pred_logits"].shape[1] == 0
    losses = DFINECriterion(3)(outputs, empty)
    assert {f"loss_fgl_dn_{i}" for i in range(3)} <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())
