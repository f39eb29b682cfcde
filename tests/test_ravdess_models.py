"""The RAVDESS networks of MST-Distill (mmkd.models.ravdess): shapes at the official and at small
input sizes, the widths MST-Distill masks, parameter counts, layouts, gradients, the YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mmkd.models.ravdess import AudioBranch, AudioBranchNet, DualStreamCNN, VisualBranch, VisualBranchNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mst" / "models"
# Official sizes: 15 frames of 224x224 (preprocess_RAVDESS_1.py), 15 MFCCs x 156 frames
# (3.6 s at 22.05 kHz, librosa hop 512; the SeqNets.py test input is (1, 15, 156)).
VIDEO, MFCC = (3, 15, 224, 224), (1, 15, 156)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hooked_widths(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """The output and the feature width seen by forward hooks on ``fc1`` and ``fc2``."""
    widths: dict[str, int] = {}
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: widths.__setitem__(name, o.shape[-1])) for name in ("fc1", "fc2")]
    try:
        out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, widths


@torch.no_grad()
def test_official_sizes() -> None:
    torch.manual_seed(0)
    video, mfcc = torch.randn(1, *VIDEO), torch.randn(1, *MFCC)
    visual, audio, fusion = VisualBranchNet(), AudioBranchNet(), DualStreamCNN()
    assert (visual.fc1.in_features, audio.fc1.in_features, fusion.fc1.in_features) == (18816, 1280, 20096)  # SeqNets.py:181, 160, 133
    assert visual.visual_branch.out_shape == (24, 1, 28, 28) and audio.audio_branch.out_shape == (256, 5)
    for model, inputs in ((visual, (video,)), (audio, (mfcc,)), (fusion, (video, mfcc))):
        model.eval()
        out, widths = hooked_widths(model, *inputs)
        assert out.shape == (1, 8) and torch.isfinite(out).all()
        assert widths == {"fc1": 320, "fc2": 160}
        assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (320, 160, 8)
    assert visual.visual_branch(video).shape == (1, 18816) and fusion.audio_branch(mfcc).shape == (1, 1280)


def test_parameter_counts() -> None:
    """Counts from the official layer definitions (an official state dict loads into these nets,
    and gives the same outputs), and the MaskNet size the notes give for RAVDESS ``fc1``."""
    from mmkd.distillers.mst import MaskNet

    visual, audio, fusion = VisualBranchNet(), AudioBranchNet(), DualStreamCNN()
    assert n_params(visual.visual_branch) == 10_332 and n_params(audio.audio_branch) == 113_280
    assert (n_params(visual), n_params(audio), n_params(fusion)) == (6_084_420, 575_848, 6_607_300)
    # notes (dfine_mst.md B4): "RAVDESS/VGGSound fc1 (320) | 16.4M (4.0M)" at hidden_dim_factor 2 (8)
    for factor, millions in ((2, 16.4), (8, 4.0)):
        count = n_params(MaskNet(fusion.fc1.out_features, hidden_dim_factor=factor))
        assert round(count / 1e6, 1) == millions, count


def test_official_state_dict_layout() -> None:
    """Module paths and shapes of the official SeqNets.py, so its checkpoints load and its hook
    paths (``visual_branch.conv1``, ``fc1``, ...) resolve."""
    state = DualStreamCNN().state_dict()
    shapes = {
        "audio_branch.conv1.weight": (32, 15, 3), "audio_branch.conv2.weight": (128, 32, 3), "audio_branch.conv3.weight": (256, 128, 3),
        "audio_branch.bn3.running_mean": (256,), "visual_branch.conv1.weight": (6, 3, 3, 3, 3), "visual_branch.conv2.weight": (12, 6, 3, 3, 3),
        "visual_branch.conv3.weight": (24, 12, 3, 3, 3), "visual_branch.bn1.weight": (6,), "fc1.weight": (320, 20096), "fc2.weight": (160, 320),
        "fc3.weight": (8, 160),
    }  # fmt: skip
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    prefixes = {key.rsplit(".", 1)[0] for key in state}
    assert prefixes == {f"{trunk}.{layer}{i}" for trunk in ("audio_branch", "visual_branch") for layer in ("conv", "bn") for i in (1, 2, 3)} | {"fc1", "fc2", "fc3"}
    assert set(VisualBranchNet().state_dict()) == {k for k in state if not k.startswith("audio_branch")}
    assert set(AudioBranchNet(num_classes=8).state_dict()) == {k for k in state if not k.startswith("visual_branch")}


@pytest.mark.parametrize(
    ("frames", "image_size", "audio_frames", "visual_features", "audio_features"),
    [
        (4, 32, 40, 24 * 1 * 4 * 4, 256 * 1),  # time pooled 4 -> 2 -> 1 -> 1 (kernel clipped); 40 -> 13 -> 4 -> 1
        (1, 8, 5, 24 * 1 * 1 * 1, 256 * 1),  # single frame, tiny image, 5 MFCC frames
        (16, (48, 40), 27, 24 * 2 * 6 * 5, 256 * 1),  # non-square frames
        (8, 16, 81, 24 * 1 * 2 * 2, 256 * 3),
    ],
)
def test_small_sizes(frames: int, image_size: int | tuple[int, int], audio_frames: int, visual_features: int, audio_features: int) -> None:
    torch.manual_seed(0)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    video, mfcc = torch.randn(2, 3, frames, *size), torch.randn(2, 1, 15, audio_frames)
    visual = VisualBranchNet(frames=frames, image_size=image_size)
    audio = AudioBranchNet(audio_frames=audio_frames)
    fusion = DualStreamCNN(frames=frames, image_size=image_size, audio_frames=audio_frames)
    assert visual.fc1.in_features == visual.visual_branch.out_features == visual_features
    assert audio.fc1.in_features == audio.audio_branch.out_features == audio_features
    assert fusion.fc1.in_features == visual_features + audio_features
    assert visual.visual_branch(video).shape == (2, visual_features) and audio.audio_branch(mfcc).shape == (2, audio_features)
    for model, inputs in ((visual, (video,)), (audio, (mfcc,)), (fusion, (video, mfcc))):
        out, widths = hooked_widths(model, *inputs)
        assert out.shape == (2, 8) and widths == {"fc1": 320, "fc2": 160}


def test_pooling_matches_official_for_large_axes() -> None:
    """Where every axis has at least kernel**3 positions, the clipped pool is the official
    MaxPool3d(2) / MaxPool1d(3)."""
    torch.manual_seed(0)
    trunk, audio_trunk = VisualBranch(frames=9, image_size=(16, 20)).eval(), AudioBranch(audio_frames=30).eval()
    video, mfcc = torch.randn(2, 3, 9, 16, 20), torch.randn(2, 15, 30)

    def reference(x: torch.Tensor, blocks: list[tuple[nn.Module, nn.Module]], pool: nn.Module) -> torch.Tensor:
        for conv, bn in blocks:
            x = pool(torch.relu(bn(conv(x))))
        return x.flatten(1)

    with torch.no_grad():
        expected = reference(video, [(trunk.conv1, trunk.bn1), (trunk.conv2, trunk.bn2), (trunk.conv3, trunk.bn3)], nn.MaxPool3d(2))
        torch.testing.assert_close(trunk(video), expected, rtol=0, atol=0)
        a = audio_trunk
        expected = reference(mfcc, [(a.conv1, a.bn1), (a.conv2, a.bn2), (a.conv3, a.bn3)], nn.MaxPool1d(3))
        torch.testing.assert_close(a(mfcc), expected, rtol=0, atol=0)


@torch.no_grad()
def test_input_layouts() -> None:
    torch.manual_seed(0)
    video, mfcc = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 15, 40)
    audio = AudioBranchNet(audio_frames=40).eval()
    torch.testing.assert_close(audio(mfcc), audio(mfcc[:, 0]))  # official [B, n_mfcc, frames] too
    fusion = DualStreamCNN(frames=4, image_size=32, audio_frames=40).eval()
    frames_first = DualStreamCNN(frames=4, image_size=32, audio_frames=40, frames_first=True).eval()
    frames_first.load_state_dict(fusion.state_dict())
    torch.testing.assert_close(frames_first(video.transpose(1, 2), mfcc), fusion(video, mfcc))  # official storage [B, T, C, H, W]
    # concatenation is audio first: zero fc1's columns after the audio features and the visual input no longer matters
    fusion.fc1.weight[:, fusion.audio_branch.out_features :] = 0
    torch.testing.assert_close(fusion(video, mfcc), fusion(torch.randn_like(video), mfcc))


def test_mismatched_input_names_sizes() -> None:
    with pytest.raises(ValueError, match="frames=4"):
        VisualBranchNet(frames=4, image_size=32)(torch.randn(2, 3, 4, 64, 64))
    with pytest.raises(ValueError, match="audio_frames=40"):
        DualStreamCNN(frames=4, image_size=32, audio_frames=40)(torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 15, 100))
    with pytest.raises(ValueError, match="MFCCs"):
        AudioBranchNet(audio_frames=40)(torch.randn(2, 1, 13, 40))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        VisualBranchNet(frames=4, image_size=32)(torch.randn(2, 3, 32, 32))


def test_backward_with_mask_hook() -> None:
    """Gradients reach every parameter, also with an MST-style hook that rescales ``fc1``'s output."""
    torch.manual_seed(0)
    video, mfcc, labels = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 15, 40), torch.tensor([0, 7])
    mask = nn.Parameter(torch.full((320,), 0.5))
    for model, inputs in (
        (VisualBranchNet(frames=4, image_size=32), (video,)),
        (AudioBranchNet(audio_frames=40), (mfcc,)),
        (DualStreamCNN(frames=4, image_size=32, audio_frames=40), (video, mfcc)),
    ):
        handle = model.fc1.register_forward_hook(lambda m, i, o: o * mask)
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        handle.remove()
        mask.grad = None
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_backward_official_size() -> None:
    torch.manual_seed(0)
    model = DualStreamCNN()
    model(torch.randn(1, *VIDEO), torch.randn(1, *MFCC)).sum().backward()
    assert model.visual_branch.conv1.weight.grad.abs().sum() > 0 and model.audio_branch.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ravdess_visual", "ravdess_audio", "ravdess_fusion"])
def test_model_yaml(name: str) -> None:
    """The YAML files build through jsonargparse (as the CLI builds them) and run at their sizes."""
    from jsonargparse import ArgumentParser

    import mmkd.models

    node = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--net", type=nn.Module)
    model = parser.instantiate_classes(parser.parse_object({"net": node})).net.eval()
    assert type(model) is getattr(mmkd.models, node["class_path"].rsplit(".", 1)[1])
    args = node["init_args"]
    video = torch.randn(1, 3, args.get("frames", 15), args.get("image_size", 224), args.get("image_size", 224))
    mfcc = torch.randn(1, 1, args.get("n_mfcc", 15), args.get("audio_frames", 156))
    inputs = {"ravdess_visual": (video,), "ravdess_audio": (mfcc,), "ravdess_fusion": (video, mfcc)}[name]
    with torch.no_grad():
        out, widths = hooked_widths(model, *inputs)
    assert out.shape == (1, 8) and widths == {"fc1": 320, "fc2": 160}
