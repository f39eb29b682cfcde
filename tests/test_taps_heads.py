"""Feature taps and alignment heads on real timm models."""

from __future__ import annotations

import pytest
import torch

from mmkd.core import FeatureTap, UnknownModulePathError
from mmkd.heads import ConvHead, LinearHead, ShapeMismatchError, build_head
from mmkd.models import timm_model


def small_resnet(width: int = 8):
    return timm_model("resnet10t", model_args={"channels": [width, 2 * width, 4 * width, 8 * width], "stem_width": 8})


def test_tap_records_shapes_and_gradients_flow() -> None:
    model = small_resnet()
    tap = FeatureTap(model, ["layer2", "layer3", "global_pool"])
    logits = model(torch.randn(3, 1, 28, 28))
    features = tap.pop()
    assert logits.shape == (3, 10)
    assert features["layer2"].shape == (3, 16, 4, 4)
    assert features["layer3"].shape == (3, 32, 2, 2)
    assert features["global_pool"].shape == (3, 64)
    features["layer2"].pow(2).mean().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    assert model.layer4[0].conv1.weight.grad is None  # downstream of layer2: untouched
    assert tap.calls == {}  # popped: nothing outlives the step
    tap.remove()
    model(torch.randn(2, 1, 28, 28))
    assert tap.calls == {}


def test_tap_on_transformer_blocks() -> None:
    vit = timm_model("vit_tiny_patch16_224", model_args={"img_size": 28, "patch_size": 7, "depth": 2})
    tap = FeatureTap(vit, ["blocks.1", "blocks.0.mlp"])
    vit(torch.randn(2, 1, 28, 28))
    features = tap.pop()
    assert features["blocks.1"].shape == (2, 17, 192)
    assert features["blocks.0.mlp"].shape == (2, 17, 192)


def test_unknown_path_lists_nearest_valid_paths() -> None:
    with pytest.raises(UnknownModulePathError) as info:
        FeatureTap(small_resnet(), ["layer5"])
    message = str(info.value)
    assert "'layer5'" in message and "layer4" in message and "mmkd inspect" in message
    with pytest.raises(UnknownModulePathError, match="blocks.1"):
        FeatureTap(timm_model("vit_tiny_patch16_224", model_args={"img_size": 28, "patch_size": 7, "depth": 2}), ["block.1"])


def test_heads_built_from_observed_shapes_of_real_models() -> None:
    student, teacher = small_resnet(8), small_resnet(32)
    s_tap, t_tap = FeatureTap(student, ["layer2"]), FeatureTap(teacher, ["layer2"])
    x = torch.randn(2, 1, 28, 28)
    student(x)
    teacher(x)
    s_feat, t_feat = s_tap.pop()["layer2"], t_tap.pop()["layer2"]
    head = build_head("conv1x1_bn", s_feat.shape[1:], t_feat.shape[1:])
    assert isinstance(head, ConvHead) and head(s_feat).shape == t_feat.shape
    assert build_head("conv3x3_bn", s_feat.shape[1:], t_feat.shape[1:])(s_feat).shape == t_feat.shape
    tokens = build_head("linear", [17, 192], [17, 384])
    assert isinstance(tokens, LinearHead) and tokens(torch.randn(2, 17, 192)).shape == (2, 17, 384)
    assert build_head("mlp", [64], [256])(torch.randn(4, 64)).shape == (4, 256)


@pytest.mark.parametrize(
    "kind, student, teacher, fragment",
    [
        (None, [16, 4, 4], [64, 4, 4], "no head is set"),
        ("conv1x1", [16, 7, 7], [64, 4, 4], "spatial sizes"),
        ("conv1x1", [17, 192], [17, 384], r"\[C, H, W\]"),
        ("linear", [17, 192], [50, 384], "leading dimensions"),
        ("linear", [16, 4, 4], [64], "numbers of dimensions"),
    ],
)
def test_unfixable_mismatch_names_both_shapes(kind, student, teacher, fragment) -> None:
    with pytest.raises(ShapeMismatchError, match=fragment) as info:
        build_head(kind, student, teacher)
    assert str(student) in str(info.value) and str(teacher) in str(info.value)


def test_unknown_head_kind() -> None:
    with pytest.raises(ValueError, match="conv1x1_bn"):
        build_head("conv5x5", [1, 2, 2], [1, 2, 2])
