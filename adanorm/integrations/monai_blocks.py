"""MONAI blocks whose ``forward`` changes when their norm takes over their activation (``adanorm.fusion``).
Imported only once a MONAI block is being fused: importing it imports MONAI."""
from __future__ import annotations

from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import Tensor


class FusedUnetResBlock(UnetResBlock):
    """``UnetResBlock`` whose ``norm1`` is an ``AdaptiveNormAct`` holding the block's leaky ReLU: MONAI's
    forward without the activation after ``norm1``. The same parameters, buffers and state-dict keys;
    ``revert`` gives the plain block back. tests/convert/test_fusion.py compares it with MONAI's block."""

    def forward(self, inp: Tensor) -> Tensor:
        residual = inp
        out = self.norm1(self.conv1(inp))
        out = self.norm2(self.conv2(out))
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        out += residual
        return self.lrelu(out)
