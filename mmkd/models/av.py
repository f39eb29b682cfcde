"""Audio-visual networks of AV-MNIST, as in the MST-Distill benchmark: a LeNet-5 for the digit
images, a three-layer CNN for the log-mel spectrograms, and an intermediate-fusion network that
concatenates the two trunks. Layers that MST-Distill masks are modules of their own
(``concat_identity``, ``fc1``, ``conv2``, ...), so hooks address them by module path.

As the official ``models/LeNet5.py`` and ``models/CNNs.py`` (Gray-OREO/MST-Distill at 093b2fe):
LeNet-5 pools with 2x2 *average* pooling (``nn.AvgPool2d``), and ``IntermediateFusionNet``
applies ``fc1`` and ``fc2`` with no activation in between. ``LeNet5(pool="max")`` and
``AVFusionNet(hidden_relu=True)`` give the max pooling and the ReLU of mmkd before it followed
the official code (what its earlier checkpoints were trained with; the weights are the same keys).

Differences from the official code (their inputs are 112x112 spectrograms, ours are
``n_mels x frames``, 32x32 by default): the audio CNN ends in global average pooling instead of a
128x14x14 flatten, and the fusion net's audio trunk is that CNN (64 features with the default
``audio_channels``) instead of a five-layer CNN (512). Widths are arguments.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 on 1x28x28 images: conv 6 -> pool -> conv 16 -> pool -> conv 120 (1x1 map) -> fc 84
    -> classes, ReLU after every conv and ``fc1``.

    ``features`` returns the 84-d ``fc1`` activation (the trunk the fusion net reuses).

    Args:
        pool: the 2x2 stride-2 pooling, ``"avg"`` (official ``LeNet5.py``: ``nn.AvgPool2d``) or
            ``"max"``.
    """

    feature_dim = 84

    def __init__(self, num_classes: int = 10, in_channels: int = 1, pool: Literal["avg", "max"] = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if self.pool == "avg" else F.max_pool2d
        x = pool(F.relu(self.conv1(x)), 2)
        x = pool(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


class AudioCNN(nn.Module):
    """Three conv layers (3x3 conv + BN, ReLU, 2x2 max-pool each) on a ``[1, n_mels, frames]`` log-mel
    spectrogram, global average pooling, and a linear classifier (``fc``).

    ``features`` returns the pooled ``channels[-1]``-d vector.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int, int] = (16, 32, 64), in_channels: int = 1) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        # conv + BN blocks (the official net has no BN): trained from scratch next to a fast image
        # network, the plain convs stay on their initial plateau and a fusion net ignores them
        self.conv1, self.conv2, self.conv3 = (
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.BatchNorm2d(widths[i + 1])) for i in range(3)
        )
        self.feature_dim = channels[2]
        self.fc = nn.Linear(channels[2], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class AVFusionNet(nn.Module):
    """Intermediate fusion (the official ``IntermediateFusionNet``): image trunk (LeNet-5, 84-d)
    and audio trunk (:class:`AudioCNN`), concatenated (``concat_identity``, an identity module so
    that it can be hooked), then ``fc1`` (half the width) -> ``fc2`` -> classes, with no
    activation between the two, as the official ``IntermediateFusionNet.forward``.

    ``forward(image, audio)`` takes the modalities in that order.

    Args:
        image_pool: the LeNet-5 trunk's pooling (see :class:`LeNet5`; official ``"avg"``).
        hidden_relu: a ReLU between ``fc1`` and ``fc2`` (not in the official net).
    """

    def __init__(
        self,
        num_classes: int = 10,
        audio_channels: tuple[int, int, int] = (16, 32, 64),
        image_pool: Literal["avg", "max"] = "avg",
        hidden_relu: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_relu = hidden_relu
        self.image = LeNet5(num_classes, pool=image_pool)
        self.audio = AudioCNN(num_classes, audio_channels)
        # The trunks' own classifiers are not part of the fusion net.
        del self.image.fc2, self.audio.fc
        fused = LeNet5.feature_dim + self.audio.feature_dim
        self.concat_identity = nn.Identity()
        self.fc1 = nn.Linear(fused, fused // 2)
        self.fc2 = nn.Linear(fused // 2, num_classes)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        fused = self.concat_identity(torch.cat([self.image.features(image), self.audio.features(audio)], dim=1))
        hidden = self.fc1(fused)
        return self.fc2(F.relu(hidden) if self.hidden_relu else hidden)
