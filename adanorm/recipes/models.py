"""Model builders the MONAI constructors cannot express on their own."""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

from monai.networks.layers.factories import split_args
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import resnet10, resnet18, resnet34
from torch import nn

import adanorm
from adanorm.convert import replace_modules

NormSpec = Union[str, Tuple[str, dict], Sequence[Any]]
RESNETS = {10: resnet10, 18: resnet18, 34: resnet34}


def resnet_classifier(norm: NormSpec, depth: int = 18, in_channels: int = 1, num_classes: int = 2, **resnet_kwargs: Any) -> nn.Module:
    """A MONAI 3D ResNet whose every block uses ``norm``.

    MONAI's ``ResNet(norm=...)`` only reaches the stem; the blocks keep ``nn.BatchNorm3d``. So the
    net is built with batch norm and every norm layer is replaced afterwards: adaptive through
    ``adanorm.convert`` (the tool users apply to their own models), the native norms by the same
    module walk (``adanorm.convert.replace_modules``) with layers from MONAI's norm factory, so
    ``norm=instance`` means here exactly what it means in the UNets.
    """
    if depth not in RESNETS:
        raise ValueError(f"depth={depth} is not offered; choose one of {sorted(RESNETS)}.")
    model = RESNETS[depth](spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, **resnet_kwargs)
    name, kwargs = split_args(norm)
    if name.lower() == "adaptive":
        return adanorm.convert(model, **kwargs)
    return replace_modules(model, lambda module: isinstance(module, nn.BatchNorm3d),
                           lambda batch_norm: get_norm_layer(name=norm, spatial_dims=3, channels=batch_norm.num_features))
