"""``head: grid``: features of different layouts (ViT tokens, CNN maps) and strides, checked
against the definitions (timm's PatchEmbed layout, area averaging, bilinear interpolation with
``align_corners=False``) and through the two shipped recipes, ViT -> CNN and CNN -> ViT, on real
Fashion-MNIST with trained teachers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmkd.cli import lightning_cli
from mmkd.heads import GridHead, ShapeMismatchError, build_head, token_grid

from conftest import CONFIGS, SHORT

HEAD_LAYOUT_RECIPES = ["kd/vit_to_cnn_features.yaml", "kd/cnn_to_vit_features.yaml"]


def identity_projection(head: GridHead) -> GridHead:
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(head.proj.out_channels)[:, :, None, None])
        head.proj.bias.zero_()
    return head


def test_tokens_and_maps_follow_timms_patch_embedding_layout() -> None:
    """timm's PatchEmbed is a strided convolution whose map is flattened row by row
    (``proj(x).flatten(2).transpose(1, 2)``); the class token comes first."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    images = torch.randn(2, 1, 28, 28)
    patch_map = vit.patch_embed.proj(images)  # [2, 8, 4, 4]
    tokens = torch.cat([torch.randn(2, 1, 8), vit.patch_embed(images)], dim=1)  # class token + 16 patch tokens
    to_map = identity_projection(build_head("grid", [17, 8], [8, 4, 4]))
    torch.testing.assert_close(to_map(tokens), patch_map, rtol=0, atol=1e-6)
    to_tokens = identity_projection(build_head("grid", [8, 4, 4], [16, 8]))
    torch.testing.assert_close(to_tokens(patch_map), vit.patch_embed(images), rtol=0, atol=1e-6)


def test_a_coarser_grid_is_area_averaged_and_a_finer_one_bilinear() -> None:
    grid = torch.randn(1, 3, 4, 4)
    pooled = identity_projection(build_head("grid", [3, 4, 4], [3, 2, 2]))(grid)
    torch.testing.assert_close(pooled, grid.reshape(1, 3, 2, 2, 2, 2).mean(dim=(3, 5)))  # each 2 x 2 block's mean
    # bilinear, align_corners=False: output i samples (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    small = torch.randn(1, 3, 2, 2)
    upsampled = identity_projection(build_head("grid", [3, 2, 2], [3, 4, 4]))(small)
    torch.testing.assert_close(upsampled, weights @ small @ weights.T)


@pytest.mark.parametrize("student, teacher", [([64, 2, 2], [32, 8, 8]), ([16, 8, 8], [64, 2, 2]), ([8, 7, 7], [17, 96])])
def test_projection_and_resampling_commute_so_the_cheaper_order_is_exact(student, teacher) -> None:
    torch.manual_seed(0)
    head = build_head("grid", student, teacher)
    grid = torch.randn(2, *student)
    other_order = not head.project_first
    expected = head.resample(head.proj(grid)) if other_order else head.proj(head.resample(grid))
    if len(teacher) == 2:
        expected = torch.cat([head.prefix_proj(grid.mean(dim=(2, 3)))[:, None], expected.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(head(grid), expected, rtol=1e-5, atol=1e-5)


def test_the_teachers_class_token_is_predicted_from_the_students_class_token_or_its_mean() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 17, 48)
    from_tokens = build_head("grid", [17, 48], [50, 96])  # 1 + 4 x 4 -> 1 + 7 x 7
    out = from_tokens(tokens)
    assert out.shape == (2, 50, 96)
    torch.testing.assert_close(out[:, 0], from_tokens.prefix_proj(tokens[:, 0]))
    feature_map = torch.randn(2, 8, 4, 4)
    from_map = build_head("grid", [8, 4, 4], [17, 96])
    torch.testing.assert_close(from_map(feature_map)[:, 0], from_map.prefix_proj(feature_map.mean(dim=(2, 3))))


def test_token_grids_are_inferred_with_the_fewest_prefix_tokens() -> None:
    assert [token_grid(n) for n in (197, 198, 16, 50, 261)] == [(1, 14), (2, 14), (0, 4), (1, 7), (5, 16)]
    with pytest.raises(ValueError, match="35 tokens are not a square grid"):
        token_grid(35)


@pytest.mark.parametrize(
    "kind, student, teacher, fragment",
    [
        ("grid", [64], [17, 96], "head 'linear'"),
        ("grid", [35, 8], [8, 4, 4], "not a square grid"),
        ("conv1x1", [16, 7, 7], [64, 4, 4], "head 'grid'"),
        ("conv1x1", [17, 48], [64, 4, 4], "head 'grid'"),
    ],
)
def test_layouts_no_head_can_align_name_both_shapes_and_the_fix(kind, student, teacher, fragment) -> None:
    with pytest.raises(ShapeMismatchError, match=fragment) as info:
        build_head(kind, student, teacher)
    assert str(student) in str(info.value) and str(teacher) in str(info.value)


def hint_losses(log_root: Path) -> list[float]:
    [metrics] = list(log_root.rglob("metrics.csv"))
    with open(metrics) as f:
        return [float(row["train/loss_hint_step"]) for row in csv.DictReader(f) if row.get("train/loss_hint_step")]


TRAIN = [*SHORT, "--trainer.limit_train_batches=60", "--trainer.log_every_n_steps=5"]


@pytest.fixture
def vit_teacher_in_place(data_root: Path) -> Path:
    """A ViT teacher (configs/g2sd/models/vit_teacher.yaml) trained for 60 real batches, where
    the ViT -> CNN recipe looks for it (G2SD's fine-tuned teacher)."""
    lightning_cli(["fit", "-c", str(CONFIGS / "teachers/fmnist_resnet10t.yaml"), *TRAIN,
                   f"--model.init_args.model={CONFIGS / 'g2sd/models/vit_teacher.yaml'}",
                   "--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer.lr=1e-3",
                   "--trainer.callbacks.init_args.dirpath=runs/g2sd/teacher", "--trainer.logger.init_args.save_dir=runs/teacher_logs"])  # fmt: skip
    return Path("runs/g2sd/teacher/last.ckpt")


def check_the_student_learns_the_hint(config: str, min_accuracy: float) -> None:
    cli = lightning_cli(["fit", "-c", str(CONFIGS / config), *TRAIN])
    assert isinstance(cli.model.terms["hint"].head, GridHead)
    losses = hint_losses(Path("runs/logs"))
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert cli.trainer.callback_metrics["val/acc"] > min_accuracy  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_a_cnn_student_learns_from_a_vit_teachers_tokens(vit_teacher_in_place: Path) -> None:
    check_the_student_learns_the_hint("kd/vit_to_cnn_features.yaml", min_accuracy=0.5)


@pytest.mark.slow
def test_a_vit_student_learns_from_a_cnn_teachers_map(teacher_in_place: Path) -> None:
    check_the_student_learns_the_hint("kd/cnn_to_vit_features.yaml", min_accuracy=0.2)  # a ViT from scratch: 60 steps
