"""The adaptive layers fused with the activation that follows them, so that a training step keeps only the
activation's output for backward (``functional.norm_act``): about a third less activation memory in a
conv → norm → activation network.

``AdaptiveNormAct`` is an ``AdaptiveNorm`` (every mode, policy, preset, eval rule, running statistics,
sync, renorm and telemetry are the parent's) whose last step also applies an activation, held as the
native module in ``.activation``. The state dict is the norm's plus the activation's parameters (a
PReLU's ``activation.weight``), so a checkpoint of ``nn.BatchNorm3d`` + ``nn.LeakyReLU`` loads strictly
into ``AdaptiveNormAct3d`` + ``nn.Identity``, the pair ``convert(fuse_activation=True)`` makes of it.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from adanorm.functional.activation import ACTIVATIONS, activate
from adanorm.functional.norm_act import normalize_activate
from adanorm.functional.renorm import RenormClip
from adanorm.norm import AdaptiveNorm

ActivationSettings = Tuple[str, float, float, Optional[Tensor]]
"""``(kind, negative_slope, alpha, prelu_weight)``: an activation as ``functional.norm_act`` takes it."""
FUSABLE_ACTIVATIONS = (nn.Identity, nn.LeakyReLU, nn.ELU, nn.PReLU)


def make_activation(activation: Union[str, nn.Module], negative_slope: float = 0.01, alpha: float = 1.0,
                    num_parameters: int = 1, init: float = 0.25, inplace: bool = False,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The native module for ``activation`` (a name in ``ACTIVATIONS``, or such a module, taken as it is),
    refusing what cannot be inverted from its output: ReLU, and non-positive slopes."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            hint = " ReLU maps every negative input to 0, so it cannot be recovered from its output; use " \
                   "'leaky_relu', or keep nn.ReLU after an AdaptiveNorm layer." if activation.lower() == "relu" else ""
            raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}.{hint}")
        activation = {"identity": lambda: nn.Identity(), "leaky_relu": lambda: nn.LeakyReLU(negative_slope, inplace),
                      "elu": lambda: nn.ELU(alpha, inplace),
                      "prelu": lambda: nn.PReLU(num_parameters, init, device=device, dtype=dtype)}[activation]()
    if not isinstance(activation, FUSABLE_ACTIVATIONS):
        raise ValueError(f"activation={activation!r} cannot be fused: only {', '.join(cls.__name__ for cls in FUSABLE_ACTIVATIONS)} "
                         f"are inverted from their output (ReLU is not invertible).")
    if isinstance(activation, nn.LeakyReLU) and not activation.negative_slope > 0:
        raise ValueError(f"{activation!r}: a fused leaky ReLU needs negative_slope > 0 to be inverted from its output.")
    if isinstance(activation, nn.ELU) and not activation.alpha > 0:
        raise ValueError(f"{activation!r}: a fused ELU needs alpha > 0 to be inverted from its output.")
    if isinstance(activation, nn.PReLU) and not bool((activation.weight > 0).all()):
        raise ValueError(f"{activation!r}: a fused PReLU needs positive slopes (init > 0) to be inverted from its output.")
    return activation


def activation_settings(activation: nn.Module) -> ActivationSettings:
    """``activation`` (a module ``make_activation`` accepts) as ``functional.norm_act`` takes it."""
    if isinstance(activation, nn.LeakyReLU):
        return "leaky_relu", float(activation.negative_slope), 1.0, None
    if isinstance(activation, nn.ELU):
        return "elu", 0.01, float(activation.alpha), None
    if isinstance(activation, nn.PReLU):
        return "prelu", 0.01, 1.0, activation.weight
    return "identity", 0.01, 1.0, None


class AdaptiveNormAct(AdaptiveNorm):
    """An :class:`~adanorm.AdaptiveNorm` followed by an invertible activation, fused in training.

    Args:
        num_features (int, optional): C, as in :class:`~adanorm.AdaptiveNorm`.
        eps (float): as in :class:`~adanorm.AdaptiveNorm`. Default: ``1e-5``
        momentum (float, optional): as in :class:`~adanorm.AdaptiveNorm`. Default: ``0.1``
        affine (bool, optional): as in :class:`~adanorm.AdaptiveNorm`. Default: ``True``
        track_running_stats (bool, optional): as in :class:`~adanorm.AdaptiveNorm`. Default: ``True``
        device (torch.device, optional): where the parameters and buffers are created. Default: ``None``
        dtype (torch.dtype, optional): of the parameters and buffers. Default: ``None``
        activation (str or nn.Module): ``"leaky_relu"``, ``"elu"``, ``"prelu"`` or ``"identity"``, or an
            ``nn.LeakyReLU``/``nn.ELU``/``nn.PReLU``/``nn.Identity`` to use as it is. Its negative side must
            have a positive slope: the backward recovers the activation's input from its output. Default:
            ``"leaky_relu"``
        negative_slope (float): the leaky ReLU's slope (> 0). Default: ``0.01``
        alpha (float): the ELU's α (> 0). Default: ``1.0``
        num_parameters (int): the PReLU's slope count, 1 or C. Default: ``1``
        init (float): the PReLU's initial slope (> 0). Default: ``0.25``
        inplace (bool): a training step may write its output into the input's storage, as
            ``nn.LeakyReLU(inplace=True)`` overwrites its input: only where nothing else reads the input
            afterwards (``convert`` sets it where the block's structure guarantees that). Autograd's own
            checks still apply: a leaf, a view, or an input its producer saved is never overwritten.
            Default: ``False``
        **norm_kwargs: the keyword-only arguments of :class:`~adanorm.AdaptiveNorm` (``mode``, ``num_groups``,
            ``policy``, ``preset``, ``sync``, ``renorm``, ...).

    Only a training step with the input's own statistics that autograd differentiates is fused (batch,
    instance, group and layer statistics). Eval, identity mode, renorm, float16/bfloat16 input, captured
    code (``torch.compile``, ``torch.export``, ONNX, tracing) and TorchScript run the norm and then the
    native activation, so compiled graphs and exports are those of the unfused pair. A step whose |γ| is
    small against |β| in some channel is not fused either (docs/fused.md).
    """

    def __init__(
        self,
        num_features: Optional[int],
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: Optional[bool] = None,
        track_running_stats: Optional[bool] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        activation: Union[str, nn.Module] = "leaky_relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        num_parameters: int = 1,
        init: float = 0.25,
        inplace: bool = False,
        **norm_kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **norm_kwargs)
        try:
            self.activation = make_activation(activation, negative_slope, alpha, num_parameters, init, False, device, dtype)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self.inplace = inplace

    def _normalize(self, input: Tensor, mode: str, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: Union[float, Tensor],
                   nonfinite_skips: Optional[Tensor], renorm: Optional[RenormClip], captured: bool) -> Tensor:
        kind, negative_slope, alpha, prelu_weight = activation_settings(self.activation)
        return normalize_activate(input, mode, weight, bias, running_mean, running_var, self.training, factor, self.eps,
                                  self.num_groups, nonfinite_skips, renorm, captured, kind, negative_slope, alpha,
                                  prelu_weight, self.inplace)

    def _activate(self, output: Tensor) -> Tensor:
        kind, negative_slope, alpha, prelu_weight = activation_settings(self.activation)
        return activate(output, kind, negative_slope, alpha, prelu_weight, inplace=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", inplace=True" if self.inplace else "")


class AdaptiveNormAct1d(AdaptiveNormAct):
    """:class:`AdaptiveNormAct` on (N, C) or (N, C, L) input: ``nn.BatchNorm1d`` + activation fused."""

    _input_ranks = (2, 3)
    _input_layout = "(N, C) or (N, C, L)"


class AdaptiveNormAct2d(AdaptiveNormAct):
    """:class:`AdaptiveNormAct` on (N, C, H, W) input: ``nn.BatchNorm2d`` + activation fused."""

    _input_ranks = (4,)
    _input_layout = "(N, C, H, W)"


class AdaptiveNormAct3d(AdaptiveNormAct):
    """:class:`AdaptiveNormAct` on (N, C, D, H, W) volumes: ``nn.BatchNorm3d``/``nn.InstanceNorm3d``/``nn.GroupNorm``
    + activation fused.

    >>> import torch, adanorm
    >>> layer = adanorm.AdaptiveNormAct3d(16, activation="leaky_relu", negative_slope=0.01)
    >>> x = torch.randn(2, 16, 8, 8, 8, requires_grad=True)
    >>> y = layer(x * 1.0)  # training: group statistics at batch 2, fused with the leaky ReLU
    >>> y.sum().backward()
    >>> layer.last_mode, x.grad.shape
    ('group', torch.Size([2, 16, 8, 8, 8]))
    >>> sorted(layer.state_dict()) == sorted(torch.nn.BatchNorm3d(16).state_dict())
    True
    """

    _input_ranks = (5,)
    _input_layout = "(N, C, D, H, W)"
