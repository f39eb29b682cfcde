"""G2SD: the MAE, the generic and specific stages, and the shipped recipe chained end to end on
real Fashion-MNIST (short schedules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mmkd.cli import lightning_cli
from mmkd.core import Classifier, Distiller, Teacher, load_state_dict_file
from mmkd.distillers import G2SDGeneric, G2SDSpecific
from mmkd.models import DistilledViT, MaskedAutoencoder, load_mae_encoder
from mmkd.models.mae import sincos_pos_embed_2d

from conftest import CONFIGS, SHORT  # noqa: E402

# The recipe in the order a user runs it; each stage reads the previous stage's last.ckpt.
G2SD_STAGES = ["g2sd/mae_pretrain.yaml", "g2sd/teacher_finetune.yaml", "g2sd/generic.yaml", "g2sd/specific.yaml", "g2sd/vit_alone.yaml"]


def vit(dim: int, num_classes: int = 0, **kwargs) -> VisionTransformer:
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=num_classes, embed_dim=dim, depth=2, num_heads=2, **kwargs)


def mae(dim: int, decoder_dim: int, decoder_depth: int) -> MaskedAutoencoder:
    return MaskedAutoencoder(vit(dim), decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=2)


@pytest.fixture
def generic() -> G2SDGeneric:
    torch.manual_seed(0)
    return G2SDGeneric(mae(32, 16, 2), Teacher(mae(64, 32, 4)), target_block=2)


# -- the MAE ----------------------------------------------------------------------------------
def test_sincos_position_embedding_matches_the_official_formula() -> None:
    embed = sincos_pos_embed_2d(8, (2, 3))
    assert embed.shape == (1, 7, 8) and torch.all(embed[0, 0] == 0)
    # patch (row 1, col 2): first half encodes the column, second half the row; omega = 1/10000^(k/2)
    omega = torch.tensor([1.0, 1e-2])
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    torch.testing.assert_close(embed[0, 1 + 1 * 3 + 2], expected)


def test_masking_keeps_a_quarter_and_the_decoder_restores_the_order() -> None:
    model = mae(32, 16, 2)
    images = torch.randn(3, 1, 28, 28)
    noise = torch.rand(3, 16)
    pred, mask = model(images, noise)
    assert pred.shape == (3, 16, 49) and torch.all(mask.sum(1) == 12)
    # the kept patches are those with the 4 smallest noise values
    kept = torch.zeros_like(mask).scatter_(1, noise.argsort(1)[:, :4], 1.0)
    assert torch.equal(mask, 1 - kept)
    loss = model.reconstruction_loss(images, pred, mask)
    manual = ((pred - model.patchify(images)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (manual * mask).sum() / mask.sum())


# -- generic stage ----------------------------------------------------------------------------
def test_teacher_and_student_see_the_same_mask(generic: G2SDGeneric) -> None:
    masks = []
    for model in (generic.teacher.model, generic.student):
        model.register_forward_hook(lambda module, args, output: masks.append(output.mask))
    generic.training_step({"image": torch.randn(4, 1, 28, 28)}, 0)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])


def test_target_is_the_layer_normed_teacher_decoder_block_and_the_loss_smooth_l1_beta_2(generic: G2SDGeneric) -> None:
    images, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 16)
    teacher = generic.teacher.model
    with torch.no_grad():  # the teacher decoder by hand: embed, mask tokens, unshuffle, 2 of 4 blocks, no norm
        latent, mask, ids_restore = teacher.forward_encoder(images, noise)
        x = teacher.decoder.embed(latent)
        tokens = torch.cat([x[:, 1:], teacher.decoder.mask_token.expand(4, 16 - 4, -1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 32))
        x = torch.cat([x[:, :1], tokens], 1) + teacher.decoder.pos_embed
        target = teacher.decoder.blocks[1](teacher.decoder.blocks[0](x))
    assert target.shape == (4, 17, 32)  # cls + every patch, the teacher decoder's width
    normed = F.layer_norm(target, (32,), eps=1e-6)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(4, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(4, 17), atol=1e-3, rtol=0)
    prediction = generic.predictor(generic.student(images, noise, head=False).tokens)
    expected = F.smooth_l1_loss(prediction, normed, beta=2.0)
    torch.testing.assert_close(generic.generic_loss(images, noise), expected, rtol=1e-5, atol=1e-6)


def test_smooth_l1_with_beta_2_on_a_hand_case(generic: G2SDGeneric) -> None:
    # target [1, -1] is already LayerNormed; differences -1 and 4: 0.5 * 1 / 2 = 0.25 and 4 - 1 = 3
    loss = generic.loss(torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(loss, torch.tensor(1.625), atol=1e-5, rtol=0)


def test_masked_only_supervision_uses_the_masked_patches(generic: G2SDGeneric) -> None:
    generic.supervise = "masked"
    seen = []
    original = generic.loss.forward
    generic.loss.forward = lambda pred, target: seen.append(pred.shape) or original(pred, target)
    generic.generic_loss(torch.randn(2, 1, 28, 28), torch.rand(2, 16))
    assert seen == [torch.Size([2 * 12, 32])]


def test_the_teacher_gets_no_gradient_and_the_student_does(generic: G2SDGeneric) -> None:
    generic.generic_loss(torch.randn(2, 1, 28, 28), torch.rand(2, 16)).backward()
    assert all(p.grad is None for p in generic.teacher.parameters())
    assert generic.student.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert generic.student.decoder.pred.weight.grad is None  # the pixel head is not used


def test_mismatched_masks_or_patches_are_refused() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        G2SDGeneric(MaskedAutoencoder(vit(32), mask_ratio=0.5, decoder_dim=16, decoder_heads=2), Teacher(mae(64, 32, 4)))
    other = MaskedAutoencoder(VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=1, num_heads=2), decoder_dim=16, decoder_heads=2)
    with pytest.raises(ValueError, match="same patches"):
        G2SDGeneric(other, Teacher(mae(64, 32, 4)))
    with pytest.raises(ValueError, match="target_block must be in 1..4"):
        G2SDGeneric(mae(32, 16, 2), Teacher(mae(64, 32, 4)), target_block=5)


# -- loading ----------------------------------------------------------------------------------
def official_layout(model: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """The key names of the official models_mae.py checkpoints."""
    renames = {"decoder.embed.": "decoder_embed.", "decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed",
               "decoder.blocks.": "decoder_blocks.", "decoder.norm.": "decoder_norm.", "decoder.pred.": "decoder_pred."}  # fmt: skip
    state = {}
    for key, value in model.state_dict().items():
        key = next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), key.removeprefix("encoder."))
        state[key] = value
    return state


def test_teacher_without_decoder_weights_is_an_error_naming_them(tmp_path: Path) -> None:
    source = mae(64, 32, 4)
    full = official_layout(source)
    torch.save({"model": full}, tmp_path / "mae_full.pth")
    loaded = Teacher(mae(64, 32, 4), checkpoint=str(tmp_path / "mae_full.pth"))  # the official layout maps onto ours
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    encoder_only = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain_encoder_only.pth")
    with pytest.raises(RuntimeError, match=r"encoder only; missing decoder weights: decoder\.blocks\.0\..*full checkpoint"):
        Teacher(mae(64, 32, 4), checkpoint=str(tmp_path / "mae_pretrain_encoder_only.pth"))


def test_mae_encoder_loads_into_timm_vits_and_mismatches_are_named(tmp_path: Path) -> None:
    source = mae(32, 16, 2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "mae.ckpt")
    for pool in ("token", "avg"):
        target = vit(32, num_classes=10, global_pool=pool)
        head_before = target.head.weight.clone()
        load_mae_encoder(target, str(tmp_path / "mae.ckpt"))
        for key, value in source.encoder.state_dict().items():
            if key in target.state_dict():
                assert torch.equal(target.state_dict()[key], value), key
        assert torch.equal(target.head.weight, head_before)  # the classifier stays new
        assert ("norm.weight" in target.state_dict()) == (pool == "token")  # avg pooling uses fc_norm instead
    with pytest.raises(RuntimeError, match="shape mismatches.*pos_embed"):
        load_mae_encoder(VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2), str(tmp_path / "mae.ckpt"))


# -- specific stage ---------------------------------------------------------------------------
def test_distillation_token_is_appended_last_without_position_embedding() -> None:
    torch.manual_seed(0)
    model = DistilledViT(vit(32, num_classes=10))
    encoder = model.encoder
    assert encoder.pos_embed.shape == (1, 1 + 16, 32)  # no position for the distillation token
    images = torch.randn(2, 1, 28, 28)
    x = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(images)], 1) + encoder.pos_embed
    x = torch.cat([x, model.dist_token.expand(2, -1, -1)], 1)
    expected = encoder.norm(encoder.blocks(x))
    torch.testing.assert_close(model.forward_features(images), expected)
    cls_logits, dist_logits = model.forward_heads(images)
    torch.testing.assert_close(cls_logits, encoder.head(expected[:, 0]))
    torch.testing.assert_close(dist_logits, model.head_dist(expected[:, -1]))
    torch.testing.assert_close(model(images), (cls_logits + dist_logits) / 2)  # inference averages the heads


def test_specific_loss_is_half_soft_ce_and_half_ce_to_the_teacher_argmax() -> None:
    torch.manual_seed(0)
    module = G2SDSpecific(DistilledViT(vit(32, num_classes=10)), Teacher(vit(64, num_classes=10, global_pool="avg")), input_size=[1, 28, 28])
    batch = {"image": torch.randn(6, 1, 28, 28), "label": torch.randint(0, 10, (6,))}
    losses = module.distillation_losses(batch)  # no mixup configured: the labels themselves
    cls_logits, dist_logits = module.model.forward_heads(batch["image"])
    teacher_argmax = module.teacher(batch["image"]).argmax(-1)
    torch.testing.assert_close(losses["ce"], 0.5 * F.cross_entropy(cls_logits, batch["label"]))
    torch.testing.assert_close(losses["dist"], 0.5 * F.cross_entropy(dist_logits, teacher_argmax))


def test_layer_decay_puts_the_distillation_token_and_heads_in_the_top_group() -> None:
    module = Classifier(DistilledViT(vit(32, num_classes=10)), layer_decay=0.5, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1.0, weight_decay=0.05))
    optimizer = module.optimizer(module.param_groups())
    for group in optimizer.param_groups:  # as configure_optimizers does
        group["lr"] *= group.get("lr_scale", 1.0)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    params = dict(module.model.named_parameters())
    # groups: embeddings, 2 blocks, top (final norm, heads, distillation token): 0.5^3 .. 1
    assert lr_of[id(params["encoder.patch_embed.proj.weight"])] == (0.125, 0.05)
    assert lr_of[id(params["encoder.blocks.1.mlp.fc1.weight"])] == (0.5, 0.05)
    assert lr_of[id(params["dist_token"])] == (1.0, 0.0)  # a token: no weight decay
    assert lr_of[id(params["head_dist.weight"])] == (1.0, 0.05)
    assert lr_of[id(params["encoder.blocks.0.norm1.weight"])] == (0.25, 0.0)
    assert lr_of[id(params["encoder.norm.weight"])] == (1.0, 0.0)  # MAE's lr_decay: after the blocks = top


def test_mixup_makes_soft_targets_and_distillers_without_support_refuse_it() -> None:
    module = Classifier(vit(32, num_classes=10), mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    images, targets = module.mix(torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,)))
    assert images.shape[0] == 4 and targets.shape == (4, 10)  # an odd batch loses its last sample
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="does not support mixup"):
        Distiller(vit(32, num_classes=10), vit(32, num_classes=10), mixup={"mixup_alpha": 0.8})


# -- the shipped recipe, end to end -----------------------------------------------------------
def test_the_recipe_runs_stage_after_stage_and_hands_the_encoder_over(data_root: Path) -> None:
    logged = {}
    for config in G2SD_STAGES:
        name = Path(config).stem
        lightning_cli(["fit", "-c", str(CONFIGS / config), *SHORT, f"--trainer.logger.init_args.name={name}"])
        [metrics] = Path("runs/logs", name).rglob("metrics.csv")
        logged[name] = metrics.read_text().splitlines()[0].split(",")
    assert "train/loss_rec_epoch" in logged["mae_pretrain"] and "val/loss_rec" in logged["mae_pretrain"]
    assert "train/loss_gd_epoch" in logged["generic"] and "val/loss_gd" in logged["generic"]
    for column in ("train/loss_ce_epoch", "train/loss_dist_epoch", "val/acc", "val/acc_cls", "val/acc_dist", "val/teacher_acc"):
        assert column in logged["specific"], column
    assert "val/acc" in logged["teacher_finetune"] and "val/acc" in logged["vit_alone"]

    # the generic checkpoint holds the student, not the teacher; its export is task-agnostic
    generic = torch.load("runs/g2sd/generic/last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in generic["state_dict"])
    assert generic["mmkd"]["teacher"]["checkpoint"] == "runs/g2sd/mae/last.ckpt"
    encoder_file = load_state_dict_file("runs/g2sd/generic/export/encoder.safetensors")
    decoder_file = load_state_dict_file("runs/g2sd/generic/export/decoder.safetensors")
    assert "blocks.0.attn.qkv.weight" in encoder_file and "decoder.blocks.0.attn.qkv.weight" in decoder_file
    assert "predictor.fc1.weight" in decoder_file

    # the specific stage started from the generic encoder (its first weights are the generic ones)
    student = lightning_cli(["-c", str(CONFIGS / "g2sd/specific.yaml"), *SHORT], run=False).model.model
    for key, value in encoder_file.items():
        torch.testing.assert_close(student.encoder.state_dict()[key], value, msg=key)
        torch.testing.assert_close(generic["state_dict"][f"student.encoder.{key}"], value, msg=key)
