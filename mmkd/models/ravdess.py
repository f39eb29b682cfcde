"""RAVDESS networks of the MST-Distill benchmark: a 3D CNN on face-cropped video frames
(:class:`VisualBranchNet`), a 1D CNN on MFCCs (:class:`AudioBranchNet`), and the dual-stream
fusion teacher "DSCNN-I" (:class:`DualStreamCNN`) that concatenates the two trunks.

Written from the architecture of the official ``models/SeqNets.py`` (Gray-OREO/MST-Distill at
commit 093b2fe; line numbers below refer to that commit). Module names and parameter shapes are
the official ones (``visual_branch.conv1``, ``audio_branch.bn3``, ``fc1``, ``fc2``, ``fc3``), so
an official state dict loads with ``load_state_dict`` and the layers MST-Distill masks, ``fc1``
(320) and ``fc2`` (160) of every net (``KD_methods/MST.py:49-61``), are addressed by those paths.
The masks see the pre-activation output: the ReLU after ``fc1`` and ``fc2`` is functional, as in
the official ``forward``.

Architecture (official sizes):

* :class:`VisualBranch` (``SeqNets.py:102-123``): three blocks of 3x3x3 ``Conv3d`` (padding 1) ->
  ``BatchNorm3d`` -> ReLU -> 2x2x2 max-pool (stride 2), widths 3 -> 6 -> 12 -> 24, then flatten.
  15x224x224 -> 7x112x112 -> 3x56x56 -> 1x28x28, so 24*1*28*28 = 18816 features
  (``SeqNets.py:181``).
* :class:`AudioBranch` (``SeqNets.py:82-99``): three blocks of ``Conv1d`` k=3 (padding 1) ->
  ``BatchNorm1d`` -> ReLU -> max-pool 3 (stride 3), widths 15 -> 32 -> 128 -> 256, then flatten.
  156 MFCC frames -> 52 -> 17 -> 5, so 256*5 = 1280 features (``SeqNets.py:160``).
* Heads (``SeqNets.py:133-135, 160-162, 181-183``): ``fc1`` (-> 320), ReLU, ``fc2`` (-> 160),
  ReLU, ``fc3`` (-> classes). :class:`DualStreamCNN` concatenates *audio then visual* features,
  1280 + 18816 = 20096 (``SeqNets.py:133, 141-145``), and reuses the two trunk classes, as the
  official ``DualStreamCNN.__init__`` builds ``AudioBranch()`` and ``VisualBranch()``
  (``SeqNets.py:129-130``), the same classes the single-modality nets use (``SeqNets.py:157, 178``).

Official input sizes and layouts:

* Video: 15 frames (``data_preprocess/preprocess_RAVDESS_1.py:13``) spread over 3.6 s
  (``:16, 45-46``), MTCNN face crops resized to 224x224 (``:86``). They are stored per clip as
  ``[T, C, H, W]`` (``preprocess_RAVDESS_2.py:8-9``), i.e. ``[N, T, C, H, W]`` for the data set
  (``utils.py:99-108``, ``min_max_normalize`` comment ``utils.py:619-620``), and permuted to
  ``[B, C, T, H, W]`` by ``DSCNN_preprocessing`` / ``VisualBranchNet_preprocessing``
  (``utils.py:386, 414``: ``permute(0, 2, 1, 3, 4)``) before the model. The test input of
  ``SeqNets.py:199`` is ``(1, 3, 15, 224, 224)``. (The frames are OpenCV BGR, never converted:
  ``preprocess_RAVDESS_1.py:73-86`` only hands an RGB copy to MTCNN.)
* Audio: 3.6 s at 22.05 kHz, cropped or zero-padded (``preprocess_RAVDESS_0.py:13, 20-29``),
  15 MFCCs by ``librosa.feature.mfcc`` with its default hop 512 (``preprocess_RAVDESS_2.py:13-16``),
  so 1 + 79380 // 512 = 156 frames: ``[B, 15, 156]``, fed to the model unchanged (no audio
  preprocessing in ``utils.py:292-295``; test input ``SeqNets.py:198``).
* ``DualStreamCNN.forward(x_visual, x_audio)`` (``SeqNets.py:140``).

Differences from the official code:

1. Audio input is mmkd's ``[B, 1, n_mfcc, frames]`` (``mmkd.data.av_files``, ``features="mfcc"``);
   the channel dim of 1 is squeezed inside :class:`AudioBranch`. The official ``[B, n_mfcc, frames]``
   is accepted too.
2. Video input is ``[B, C, T, H, W]``, which is what the official model itself receives (the
   permute lives in ``utils.py``) and what ``mmkd.data.av_files`` yields. ``frames_first=True``
   takes the official storage layout ``[B, T, C, H, W]`` and does that permute inside.
3. The flatten sizes (``fc1.in_features``) follow from the constructor's ``frames``, ``image_size``
   and ``audio_frames`` (computed in closed form; no dry run, so no BatchNorm statistics are
   touched) instead of the hard-coded 18816 / 1280 / 20096. At the official sizes they are those
   numbers. A mismatching input raises a ``ValueError`` naming the sizes, not a matmul error.
4. Every max-pool kernel is clipped to the size of its axis (``min(kernel, size)``, stride =
   kernel), so inputs smaller than the official ones (e.g. 4 frames, or an axis already pooled to
   1) keep at least one position instead of pooling to zero. For any axis of at least
   ``kernel**3`` (8 for video, 27 for audio) positions, including the official sizes, this is the
   official ``MaxPool3d(2)`` / ``MaxPool1d(3)`` exactly. The pool is a function, not a ``pool``
   submodule (it holds no parameters, so state dicts are unaffected).
5. Widths (``channels``, ``hidden``), ``in_channels`` and ``n_mfcc`` are arguments (defaults
   official). The class count is ``num_classes`` (official ``cls_num``, required there), default 8.
6. The official ``hook_names`` lists (used by the CRD/FitNets-style baselines, not by MST-Distill)
   and the unused ``LSTM``/``BiLSTM``/``GRU``/``Video3DCNN`` classes of ``SeqNets.py`` are not ported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_FRAMES = 15  # preprocess_RAVDESS_1.py:13
OFFICIAL_IMAGE_SIZE = 224  # preprocess_RAVDESS_1.py:86
OFFICIAL_N_MFCC = 15  # preprocess_RAVDESS_2.py:15
OFFICIAL_AUDIO_FRAMES = 156  # 3.6 s * 22050 Hz, librosa hop 512: 1 + 79380 // 512


def _pooled(size: int, kernel: int, times: int = 3) -> int:
    """Length of an axis after ``times`` max-pools with kernel = stride = ``min(kernel, size)``."""
    for _ in range(times):
        size //= min(kernel, size)
    return size


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class VisualBranch(nn.Module):
    """3D-CNN trunk on ``[B, C, T, H, W]`` clips: three (3x3x3 conv, BN, ReLU, 2x2x2 max-pool)
    blocks, flattened to ``out_features`` (official 18816 for 3x15x224x224)."""

    def __init__(
        self,
        frames: int = OFFICIAL_FRAMES,
        image_size: int | Sequence[int] = OFFICIAL_IMAGE_SIZE,
        in_channels: int = 3,
        channels: Sequence[int] = (6, 12, 24),
        frames_first: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must hold 3 widths, got {channels}")
        self.frames, self.image_size, self.frames_first = frames, _pair(image_size), frames_first
        widths = (in_channels, *channels)
        self.conv1, self.conv2, self.conv3 = (nn.Conv3d(widths[i], widths[i + 1], 3, padding=1) for i in range(3))
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm3d(w) for w in channels)
        self.out_shape = (channels[-1], _pooled(frames, 2), *(_pooled(s, 2) for s in self.image_size))
        self.out_features = int(torch.Size(self.out_shape).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"VisualBranch expects [B, C, T, H, W] clips (or [B, T, C, H, W] with frames_first), got {tuple(x.shape)}")
        if self.frames_first:
            x = x.transpose(1, 2)  # the official permute(0, 2, 1, 3, 4) of utils.py
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
            x = F.max_pool3d(x, tuple(min(2, s) for s in x.shape[2:]))
        return x.flatten(1)


class AudioBranch(nn.Module):
    """1D-CNN trunk over the MFCC frames (MFCCs as channels): three (k=3 conv, BN, ReLU, max-pool 3)
    blocks, flattened to ``out_features`` (official 1280 for 15x156)."""

    def __init__(self, n_mfcc: int = OFFICIAL_N_MFCC, audio_frames: int = OFFICIAL_AUDIO_FRAMES, channels: Sequence[int] = (32, 128, 256)) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must hold 3 widths, got {channels}")
        self.n_mfcc, self.audio_frames = n_mfcc, audio_frames
        widths = (n_mfcc, *channels)
        self.conv1, self.conv2, self.conv3 = (nn.Conv1d(widths[i], widths[i + 1], 3, padding=1) for i in range(3))
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm1d(w) for w in channels)
        self.out_shape = (channels[-1], _pooled(audio_frames, 3))
        self.out_features = channels[-1] * self.out_shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.squeeze(1)  # mmkd's [B, 1, n_mfcc, frames]
        if x.dim() != 3 or x.shape[1] != self.n_mfcc:
            raise ValueError(f"AudioBranch expects [B, 1, {self.n_mfcc}, frames] or [B, {self.n_mfcc}, frames] MFCCs, got {tuple(x.shape)}")
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
            x = F.max_pool1d(x, min(3, x.shape[-1]))
        return x.flatten(1)


def _check_features(features: torch.Tensor, trunk: VisualBranch | AudioBranch, what: str) -> torch.Tensor:
    if features.shape[1] != trunk.out_features:
        if isinstance(trunk, VisualBranch):
            built = f"frames={trunk.frames}, image_size={trunk.image_size}"
        else:
            built = f"n_mfcc={trunk.n_mfcc}, audio_frames={trunk.audio_frames}"
        raise ValueError(
            f"the {what} input gives {features.shape[1]} trunk features, but the net was built for {trunk.out_features} ({built}): "
            "build it with the input's sizes"
        )
    return features


class _Head(nn.Module):
    """``fc1`` -> ReLU -> ``fc2`` -> ReLU -> ``fc3``, the MLP of every official RAVDESS net."""

    def _build_head(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        if len(hidden) != 2:
            raise ValueError(f"hidden must hold 2 widths (fc1, fc2), got {hidden}")
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(features)))))


class VisualBranchNet(_Head):
    """Visual RAVDESS network (official ``VisualBranchNet``, ``SeqNets.py:175-193``): the
    :class:`VisualBranch` trunk (``visual_branch``), then ``fc1`` 320 -> ``fc2`` 160 -> ``fc3``.

    Input ``[B, C, T, H, W]`` (``frames_first``: ``[B, T, C, H, W]``) with the ``frames`` and
    ``image_size`` given here. Official defaults: 3 x 15 x 224 x 224 (``SeqNets.py:199``;
    ``preprocess_RAVDESS_1.py:13, 86``), giving ``fc1.in_features`` 18816 (``SeqNets.py:181``).
    """

    def __init__(
        self,
        num_classes: int = 8,
        frames: int = OFFICIAL_FRAMES,
        image_size: int | Sequence[int] = OFFICIAL_IMAGE_SIZE,
        in_channels: int = 3,
        channels: Sequence[int] = (6, 12, 24),
        hidden: Sequence[int] = (320, 160),
        frames_first: bool = False,
    ) -> None:
        super().__init__()
        self.visual_branch = VisualBranch(frames, image_size, in_channels, channels, frames_first)
        self._build_head(self.visual_branch.out_features, num_classes, hidden)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        return self._head(_check_features(self.visual_branch(visual), self.visual_branch, "visual"))


class AudioBranchNet(_Head):
    """Audio RAVDESS network (official ``AudioBranchNet``, ``SeqNets.py:154-172``): the
    :class:`AudioBranch` trunk (``audio_branch``), then ``fc1`` 320 -> ``fc2`` 160 -> ``fc3``.

    Input ``[B, 1, n_mfcc, frames]`` (or ``[B, n_mfcc, frames]``) with the ``n_mfcc`` and
    ``audio_frames`` given here. Official defaults: 15 MFCCs x 156 frames (``SeqNets.py:198``;
    ``preprocess_RAVDESS_2.py:15``, 3.6 s at 22.05 kHz with librosa's hop 512), giving
    ``fc1.in_features`` 1280 (``SeqNets.py:160``).
    """

    def __init__(
        self,
        num_classes: int = 8,
        n_mfcc: int = OFFICIAL_N_MFCC,
        audio_frames: int = OFFICIAL_AUDIO_FRAMES,
        channels: Sequence[int] = (32, 128, 256),
        hidden: Sequence[int] = (320, 160),
    ) -> None:
        super().__init__()
        self.audio_branch = AudioBranch(n_mfcc, audio_frames, channels)
        self._build_head(self.audio_branch.out_features, num_classes, hidden)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self._head(_check_features(self.audio_branch(audio), self.audio_branch, "audio"))


class DualStreamCNN(_Head):
    """Multimodal RAVDESS teacher "DSCNN-I" (official ``DualStreamCNN``, ``SeqNets.py:126-151``):
    :class:`AudioBranch` (``audio_branch``) and :class:`VisualBranch` (``visual_branch``) trunks,
    their features concatenated audio first, then ``fc1`` 320 -> ``fc2`` 160 -> ``fc3``.

    ``forward(visual, audio)``, in that order (``SeqNets.py:140``), with the layouts of
    :class:`VisualBranchNet` and :class:`AudioBranchNet`. At the official sizes (15 x 224 x 224
    frames, 15 x 156 MFCCs) ``fc1.in_features`` is 1280 + 18816 = 20096 (``SeqNets.py:133``).
    """

    def __init__(
        self,
        num_classes: int = 8,
        frames: int = OFFICIAL_FRAMES,
        image_size: int | Sequence[int] = OFFICIAL_IMAGE_SIZE,
        n_mfcc: int = OFFICIAL_N_MFCC,
        audio_frames: int = OFFICIAL_AUDIO_FRAMES,
        in_channels: int = 3,
        visual_channels: Sequence[int] = (6, 12, 24),
        audio_channels: Sequence[int] = (32, 128, 256),
        hidden: Sequence[int] = (320, 160),
        frames_first: bool = False,
    ) -> None:
        super().__init__()
        self.audio_branch = AudioBranch(n_mfcc, audio_frames, audio_channels)
        self.visual_branch = VisualBranch(frames, image_size, in_channels, visual_channels, frames_first)
        self._build_head(self.audio_branch.out_features + self.visual_branch.out_features, num_classes, hidden)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        audio_features = _check_features(self.audio_branch(audio), self.audio_branch, "audio")
        visual_features = _check_features(self.visual_branch(visual), self.visual_branch, "visual")
        # audio first, as the official torch.cat((audio_features, visual_features)), so fc1's
        # weight columns line up with an official checkpoint
        return self._head(torch.cat([audio_features, visual_features], dim=1))
