"""The invertible activations a norm can be fused with: applied as native ops, and inverted from their
output, which is all a fused backward keeps (``functional.norm_act``).

An activation is given by plain values so that TorchScript and the kernels take it as it is: ``kind``
(one of ``ACTIVATIONS``), the leaky ReLU's ``negative_slope``, the ELU's ``alpha`` and the PReLU's slopes
(a tensor of one or C values). Each is strictly increasing where its parameter is positive, hence
invertible; ReLU is not (every negative input gives 0), and is never fused.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "leaky_relu", "elu", "prelu")


def activate(input: Tensor, kind: str, negative_slope: float, alpha: float, prelu_weight: Optional[Tensor],
             inplace: bool) -> Tensor:
    """``kind`` applied to ``input`` with the native op, in place where ``inplace`` (never for PReLU, which
    has no in-place form). What the unfused path, the scripted form and captured graphs run."""
    if kind == "identity":
        return input
    if kind == "leaky_relu":
        return F.leaky_relu_(input, negative_slope) if inplace else F.leaky_relu(input, negative_slope)
    if kind == "elu":
        return F.elu_(input, alpha) if inplace else F.elu(input, alpha)
    if kind == "prelu" and prelu_weight is not None:
        return F.prelu(input, prelu_weight)
    raise ValueError(f"activation {kind!r} is not one of {ACTIVATIONS} (prelu needs its weight)")


def invertible(kind: str, negative_slope: float, alpha: float, prelu_weight: Optional[Tensor]) -> bool:
    """Whether the activation can be recovered from its output: its negative-side parameter is positive.
    Reads a PReLU's slopes back (one host sync on a GPU)."""
    if kind == "leaky_relu":
        return negative_slope > 0
    if kind == "elu":
        return alpha > 0
    if kind == "prelu":
        return prelu_weight is not None and bool((prelu_weight > 0).all())
    return kind == "identity"


def pre_activation(output: Tensor, grad_output: Tensor, kind: str, negative_slope: float, alpha: float,
                   prelu_weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(z, dL/dz, dL/dprelu_weight)`` recovered from the activation's ``output`` y = act(z) and dL/dy.

    The derivative at z = 0 is the negative side's, as PyTorch's own backward takes it, and y ≤ 0 exactly
    where z ≤ 0 (the slopes are positive). ELU's inverse ``log1p(y/α)`` loses precision where y nears −α:
    for z < −8 its error grows as e^{−z} ulps, where dL/dz = dL/dy·(y + α) is itself that small; y = −α
    exactly (z below about −17 in float32) is taken as the smallest z the dtype resolves there."""
    if kind == "identity":
        return output, grad_output, None
    negative = output <= 0
    if kind == "leaky_relu":
        return (torch.where(negative, output / negative_slope, output),
                torch.where(negative, grad_output * negative_slope, grad_output), None)
    if kind == "elu":
        ratio = (output / alpha).clamp_min(-1.0 + torch.finfo(output.dtype).eps / 2)
        return (torch.where(negative, torch.log1p(ratio), output),
                torch.where(negative, grad_output * (output + alpha), grad_output), None)
    if kind == "prelu" and prelu_weight is not None:
        slope = _per_channel(prelu_weight, output.dim())
        z = torch.where(negative, output / slope, output)
        negative_part = torch.where(negative, grad_output * z, torch.zeros_like(z))
        if prelu_weight.numel() == 1:
            grad_weight = negative_part.sum().reshape(prelu_weight.shape)
        else:
            grad_weight = negative_part.sum(_all_but_channels(output.dim()))
        return z, torch.where(negative, grad_output * slope, grad_output), grad_weight.to(prelu_weight.dtype)
    raise ValueError(f"activation {kind!r} is not one of {ACTIVATIONS} (prelu needs its weight)")


def _per_channel(values: Tensor, dim: int) -> Tensor:
    """A (1 or C)-vector viewed to broadcast along dim 1 of a ``dim``-D tensor."""
    shape: List[int] = [1, -1] + [1] * (dim - 2)
    return values.reshape(shape)


def _all_but_channels(dim: int) -> List[int]:
    return [0] + list(range(2, dim))
