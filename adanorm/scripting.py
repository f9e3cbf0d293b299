"""What ``torch.jit.script`` compiles in place of an adaptive layer.

TorchScript cannot compile the eager layer: its forward caches decisions in Python, counts modes
in a dict, warns, and dispatches to kernels by device and layout. ``AdaptiveNorm.__prepare_scriptable__``
hands the compiler this module instead. It shares the layer's parameters and buffers (same
tensors, same state-dict keys) and runs the same decision, ``adanorm.policy.choose`` over the same
policy values, with the same eval rule and running-statistics update (``functional.running_stats``),
on PyTorch's native norm kernels, so a scripted network computes what the eager one computes,
fallbacks included. Telemetry (``last_mode``, ``mode_counts``, warnings) stays in eager mode.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adanorm.functional.api import affine_only
from adanorm.functional.renorm import RenormClip, clip_at, renormalize_batch_mode
from adanorm.functional.running_stats import blend, scratch_statistics
from adanorm.policy import candidates, choose, designed, usable
from adanorm.presets import step_factor


def layer_balance_decay() -> float:
    from adanorm.norm import BALANCE_DECAY  # norm.py imports this module

    return BALANCE_DECAY


class ScriptableAdaptiveNorm(nn.Module):
    """An :class:`~adanorm.AdaptiveNorm` in TorchScript's subset, over the layer's own tensors."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        policy, preset = layer.policy, layer.momentum_preset
        self.layer_name: str = type(layer).__name__
        self.input_ranks: List[int] = list(layer._input_ranks) or [-1]
        self.num_features: int = layer.num_features
        self.eps: float = float(layer.eps)
        self.track_running_stats: bool = layer.track_running_stats
        self.mode: str = layer.mode
        self.num_groups: int = layer.num_groups
        self.chain: List[str] = list(policy.chain)
        self.min_batch_size: int = policy.min_batch_size
        self.min_instance_size: int = policy.min_instance_size
        self.min_group_size: int = policy.min_group_size
        self.strict: bool = policy.strict
        self.skip_nonfinite: bool = policy.skip_nonfinite
        self.native_eval_rule: bool = policy.native_eval_rule
        self.eval_batch_stats: bool = policy.eval_batch_stats
        self.instance_running_stats: bool = policy.instance_running_stats
        self.fixed_momentum: float = 0.0 if preset.momentum is None else float(preset.momentum)
        self.counts_steps: bool = preset.counts_steps
        self.window_samples: int = preset.window_samples or 0
        self.balance_decay: float = layer_balance_decay()
        limits = layer.renorm_limits
        self.renorm: bool = limits is not None
        self.renorm_r_max: float = 1.0 if limits is None else float(limits.r_max)
        self.renorm_d_max: float = 0.0 if limits is None else float(limits.d_max)
        self.renorm_warmup_steps: int = 0 if limits is None else limits.warmup_steps
        self.weight = layer.weight
        self.bias = layer.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(layer, name))
        # Plain tensor attributes, not buffers: TorchScript saves every buffer in the state dict, and
        # these must stay out of it (BatchNorm's keys, in both directions).
        self.running_stats_balance: Optional[Tensor] = layer.running_stats_balance
        self.nonfinite_skips: Optional[Tensor] = layer.nonfinite_skips
        self.train(layer.training)
        # Held in a tuple: not a submodule (TorchScript neither compiles nor saves it), and out of reach of
        # torch.jit.script's rewrite of module attributes, which would put this module in its place.
        self.eager_layer = (layer,)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            # torch.jit.script puts this module in place of the layer inside the model it was given
            # (it rewrites the module tree in place); there, in eager mode, the layer itself still runs.
            return self.run_eager_layer(input)
        if self.input_ranks[0] != -1 and input.dim() not in self.input_ranks:
            raise ValueError(f"{self.layer_name} got {input.dim()}-D input; expected ranks {self.input_ranks}")
        if input.dim() < 2 or input.size(1) != self.num_features:
            raise ValueError(f"{self.layer_name}: expected {self.num_features} channels at dim 1")
        shape = input.size()
        mode = self._select_mode(shape)
        running_mean, running_var = self._buffers_for(mode)
        factor: Union[float, Tensor] = 0.0
        renorm: Optional[RenormClip] = None
        if self.training:
            balance = self.running_stats_balance
            if self.track_running_stats and balance is not None and self.running_mean is not None:
                # the eval rule's record of how the layer trains (AdaptiveNorm._record_training_step)
                step = 1.0 - self.balance_decay
                balance.mul_(self.balance_decay).add_(step if running_mean is not None else -step)
            steps = self.num_batches_tracked
            if self.renorm and mode == "batch" and running_var is not None and steps is not None:
                renorm = clip_at(steps, self.renorm_r_max, self.renorm_d_max, self.renorm_warmup_steps, running_var.dtype)
            if running_mean is not None:
                factor = self._update_factor(shape[0], mode == "batch")
        return self._normalize(input, mode, running_mean, running_var, factor, renorm)

    @torch.jit.unused
    def run_eager_layer(self, input: Tensor) -> Tensor:
        return self.eager_layer[0](input)

    def _select_mode(self, shape: List[int]) -> str:
        has_stats = not self.training and self._eval_uses_running_stats()
        if self.mode != "auto":
            forced_eval_stats = self.mode == "batch" and not self.training and self.running_mean is not None
            if not (forced_eval_stats or usable(self.mode, shape, self.num_groups, True, 1, 2, 2)):
                raise ValueError(f"{self.layer_name}(mode={self.mode}) cannot normalize input of shape {shape}: it would "
                                 f"compute statistics over a single value. Use mode='auto' to fall back.")
            return self.mode
        walked = candidates(self.training, self.chain, self.eval_batch_stats)
        mode = choose(shape, self.training, walked, self.num_groups, self.min_batch_size,
                      self.min_instance_size, self.min_group_size, has_stats)
        if self.strict and not has_stats and mode != designed(walked, shape[0], self.num_groups, self.min_batch_size):
            raise RuntimeError(f"{self.layer_name} fell back to {mode} for input of shape {shape}; Policy(strict=True).")
        return mode

    def _eval_uses_running_stats(self) -> bool:
        running_mean, running_var = self.running_mean, self.running_var
        balance, steps = self.running_stats_balance, self.num_batches_tracked
        if not self.track_running_stats or running_mean is None or running_var is None or balance is None or steps is None:
            return False
        learned = self.native_eval_rule or bool(steps > 0) or bool(running_mean.ne(0).any()) or bool(running_var.ne(1).any())
        return learned and bool(balance >= 0)

    def _buffers_for(self, mode: str):
        """The running statistics this step reads or updates (None, None when it uses neither)."""
        if self.training:
            updates = self.track_running_stats and (mode == "batch" or (mode == "instance" and self.instance_running_stats))
            return (self.running_mean, self.running_var) if updates else (None, None)
        if self.mode == "auto":
            reads = mode == "batch" and self._eval_uses_running_stats()
        else:
            reads = mode == "batch" or (mode == "instance" and self.instance_running_stats)
        return (self.running_mean, self.running_var) if reads else (None, None)

    def _update_factor(self, batch_size: int, count_step: bool) -> Union[float, Tensor]:
        steps = self.num_batches_tracked
        if steps is None:
            return self.fixed_momentum
        if count_step:
            steps.add_(1)
        if not self.counts_steps:
            return self.fixed_momentum
        return step_factor(batch_size, steps, self.window_samples)

    def _normalize(self, input: Tensor, mode: str, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   factor: Union[float, Tensor], renorm: Optional[RenormClip]) -> Tensor:
        if mode == "identity" or input.numel() == 0:
            return affine_only(input, self.weight, self.bias)
        if running_mean is not None and running_var is not None and (mode == "batch" or mode == "instance"):
            if not self.training:
                if mode == "batch":
                    return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps)
                return F.instance_norm(input, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps)
            batch_mean, batch_var = scratch_statistics(running_mean, running_var)
            if mode == "batch":
                output = F.batch_norm(input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
                if renorm is not None:
                    output = renormalize_batch_mode(output, renorm, batch_mean, batch_var, input.numel() // input.size(1),
                                                    running_mean, running_var, self.weight, self.bias, self.eps)
            else:
                output = F.instance_norm(input, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
            blend(running_mean, running_var, batch_mean, batch_var, factor,
                  self.nonfinite_skips if self.skip_nonfinite else None)
            return output
        if mode == "batch":
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        groups = self.num_features if mode == "instance" else 1 if mode == "layer" else self.num_groups
        return F.group_norm(input.contiguous(), groups, self.weight, self.bias, self.eps)

