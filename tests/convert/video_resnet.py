"""A small BatchNorm (2+1)D ResNet from plain torch modules, for tests that need a video network.

torchvision's ``r2plus1d_18`` cannot be installed on the CPU-only test machines, so this rebuilds its
structure at a smaller width: the (2+1)D stem, one basic block per stage with (2+1)D convolutions
(a 1×k×k spatial convolution, BatchNorm, ReLU, then a k×1×1 temporal one, each strided like the 3D
convolution it factorizes), 1×1×1 strided shortcuts, global average pooling and a linear head.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def factorized_channels(in_channels: int, out_channels: int, kernel: int = 3) -> int:
    """The channels between a (2+1)D pair's spatial and temporal convolution that give it about the
    parameters of the k×k×k convolution it replaces (Tran et al. 2018, torchvision's ``midplanes``)."""
    return (in_channels * out_channels * kernel ** 3) // (in_channels * kernel ** 2 + kernel * out_channels)


class Conv2Plus1d(nn.Sequential):
    """A 3×3×3 convolution factorized into a 1×3×3 spatial and a 3×1×1 temporal one, with BatchNorm and
    ReLU between them; ``stride`` strides all three dimensions, as the 3D convolution would."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        middle = factorized_channels(in_channels, out_channels)
        super().__init__(
            nn.Conv3d(in_channels, middle, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(middle),
            nn.ReLU(inplace=True),
            nn.Conv3d(middle, out_channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    """Two (2+1)D convolutions with BatchNorm, and a strided 1×1×1 shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            Conv2Plus1d(in_channels, out_channels, stride), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
            Conv2Plus1d(out_channels, out_channels), nn.BatchNorm3d(out_channels),
        )
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def r2plus1d_resnet(in_channels: int = 3, num_classes: int = 4, widths: Sequence[int] = (16, 32, 64, 128)) -> nn.Module:
    """An R(2+1)D ResNet with one basic block per stage: the stem halves H and W, every stage after the first
    halves D, H and W. On 8×32×32 clips the last stage is 1×2×2; on 8×16×16 clips it is 1×1×1, where native
    BatchNorm3d raises at batch 1.

    Args:
        in_channels: the clip's channels (3 for RGB).
        num_classes: the logits.
        widths: the output channels of each stage.
    """
    stem = nn.Sequential(
        nn.Conv3d(in_channels, widths[0], (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True),
        nn.Conv3d(widths[0], widths[0], (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True),
    )
    stages = [BasicBlock(widths[max(index - 1, 0)], width, 1 if index == 0 else 2) for index, width in enumerate(widths)]
    return nn.Sequential(stem, *stages, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
