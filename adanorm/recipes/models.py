"""Model builders the MONAI constructors cannot express on their own: MONAI's 3D ResNet with one norm in every
block, and an R(2+1)D video ResNet from plain torch modules."""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import resnet10, resnet18, resnet34
from torch import Tensor, nn

from adanorm.convert import replace_modules

NormSpec = Union[str, Tuple[str, dict], Sequence[Any]]
RESNETS = {10: resnet10, 18: resnet18, 34: resnet34}


def resnet_classifier(norm: NormSpec, depth: int = 18, in_channels: int = 1, num_classes: int = 2, **resnet_kwargs: Any) -> nn.Module:
    """A MONAI 3D ResNet whose every block uses ``norm``.

    MONAI's ``ResNet(norm=...)`` only reaches the stem; the blocks keep ``nn.BatchNorm3d``. So the
    net is built with batch norm and every norm layer is replaced afterwards (``adanorm.convert.replace_modules``)
    with a layer from MONAI's norm factory, so that ``norm=...`` means here exactly what it means in the UNets and
    the R(2+1)D net: ``norm=adaptive`` is ``AdaptiveNorm3d`` under the default policy, not ``adanorm.convert``'s
    BatchNorm-mirroring layer (which takes batch statistics at every batch size).
    """
    if depth not in RESNETS:
        raise ValueError(f"depth={depth} is not offered; choose one of {sorted(RESNETS)}.")
    model = RESNETS[depth](spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, **resnet_kwargs)
    return replace_modules(model, lambda module: isinstance(module, nn.BatchNorm3d),
                           lambda batch_norm: get_norm_layer(name=norm, spatial_dims=3, channels=batch_norm.num_features))


# --- (2+1)D ResNet for video clips -------------------------------------------------------------------------------


def factorized_channels(in_channels: int, out_channels: int, kernel: int = 3, multiple: int = 1) -> int:
    """The channels between a (2+1)D pair's spatial and temporal convolution that give it about the
    parameters of the k×k×k convolution it replaces (Tran et al. 2018, torchvision's ``midplanes``),
    rounded up to a multiple of ``multiple`` (so that group norm can split them)."""
    middle = (in_channels * out_channels * kernel ** 3) // (in_channels * kernel ** 2 + kernel * out_channels)
    return -(-middle // multiple) * multiple


def norm_layer(norm: NormSpec, channels: int) -> nn.Module:
    """A 3D norm layer from MONAI's norm factory: ``"batch"`` is ``nn.BatchNorm3d``, ``"adaptive"`` adanorm's
    ``AdaptiveNorm3d`` with its default policy, ``("group", {"num_groups": 4})`` ``nn.GroupNorm``, as in the UNets."""
    return get_norm_layer(name=norm, spatial_dims=3, channels=channels)


class Conv2Plus1d(nn.Sequential):
    """A 3×3×3 convolution factorized into a 1×3×3 spatial and a 3×1×1 temporal one, with a norm and ReLU
    between them; ``stride`` strides all three dimensions, as the 3D convolution would."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: NormSpec = "batch",
                 multiple: int = 1) -> None:
        middle = factorized_channels(in_channels, out_channels, multiple=multiple)
        super().__init__(
            nn.Conv3d(in_channels, middle, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            norm_layer(norm, middle),
            nn.ReLU(inplace=True),
            nn.Conv3d(middle, out_channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


class BasicBlock2Plus1d(nn.Module):
    """Two (2+1)D convolutions with norms, and a strided 1×1×1 shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormSpec = "batch", multiple: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            Conv2Plus1d(in_channels, out_channels, stride, norm, multiple), norm_layer(norm, out_channels), nn.ReLU(inplace=True),
            Conv2Plus1d(out_channels, out_channels, 1, norm, multiple), norm_layer(norm, out_channels),
        )
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(norm, out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def r2plus1d_resnet(in_channels: int = 3, num_classes: int = 4, widths: Sequence[int] = (16, 32, 64, 128),
                    norm: NormSpec = "batch", middle_multiple: int = 1) -> nn.Module:
    """An R(2+1)D ResNet (Tran et al. 2018; torchvision's ``r2plus1d_18`` at a smaller width) from plain torch
    modules, with one basic block per stage and ``norm`` in every norm layer.

    The stem (a 1×7×7 convolution strided 2 in H and W, then a 3×1×1 one) halves H and W; every stage after
    the first halves T, H and W; global average pooling and a linear layer give the logits. On 16×32×32 clips
    the last stage is 2×2×2; on 8×16×16 clips it is 1×1×1, where native BatchNorm3d raises at batch 1.

    Args:
        in_channels: the clip's channels (1 for grayscale, 3 for RGB).
        num_classes: the logits.
        widths: the output channels of each stage.
        norm: a MONAI norm name or ``(name, kwargs)``: ``"batch"`` (the default, as torchvision's), ``"adaptive"``,
            ``"instance"``, ``("group", {"num_groups": G})``.
        middle_multiple: round each (2+1)D pair's middle channels up to a multiple of this (group norm needs
            its groups to divide them; the recipe uses 8).
    """
    stem = nn.Sequential(
        nn.Conv3d(in_channels, widths[0], (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        norm_layer(norm, widths[0]), nn.ReLU(inplace=True),
        nn.Conv3d(widths[0], widths[0], (3, 1, 1), padding=(1, 0, 0), bias=False),
        norm_layer(norm, widths[0]), nn.ReLU(inplace=True),
    )
    stages = [BasicBlock2Plus1d(widths[max(index - 1, 0)], width, 1 if index == 0 else 2, norm, middle_multiple)
              for index, width in enumerate(widths)]
    return nn.Sequential(stem, *stages, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))
