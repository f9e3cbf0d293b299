"""What ``torch.jit.script`` compiles in place of an adaptive layer.

TorchScript cannot compile the eager layer: its forward caches decisions in Python, counts modes
in a dict, warns, and dispatches to kernels by device and layout. ``AdaptiveNorm.__prepare_scriptable__``
hands the compiler this module instead. It shares the layer's parameters and buffers (same
tensors, same state-dict keys) and calls the layer's own rules (``adanorm.rules``: the mode, the eval
rule, the buffers a step uses, the balance and momentum updates) and its normalize call
(``functional.api.normalize``), which in TorchScript runs PyTorch's native norm ops only. So a scripted
network computes what the eager one computes, fallbacks included, and a saved one loads and runs
without adanorm. Telemetry (``last_mode``, ``mode_counts``, warnings) stays in eager mode.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from adanorm.functional.api import normalize
from adanorm.functional.renorm import RenormClip, clip_at
from adanorm.policy import default_num_groups
from adanorm.rules import BALANCE_DECAY, balance_target, eval_uses_running_stats, running_stats_factor, step_plan, update_balance


class ScriptableAdaptiveNorm(nn.Module):
    """An :class:`~adanorm.AdaptiveNorm` in TorchScript's subset, over the layer's own tensors."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        policy, preset = layer.policy, layer.momentum_preset
        self.layer_name: str = type(layer).__name__
        self.input_ranks: List[int] = list(layer._input_ranks) or [-1]
        # A layer built with num_features=None that has not seen an input yet: -1, and 0 for the default
        # group count, until the first input says C (as the eager layer does).
        self.num_features: int = -1 if layer.num_features is None else layer.num_features
        self.num_groups: int = layer.num_groups or 0
        self.eps: float = float(layer.eps)
        self.track_running_stats: bool = layer.track_running_stats
        self.mode: str = layer.mode
        self.chain: List[str] = list(policy.chain)
        self.min_batch_size: int = policy.min_batch_size
        self.min_instance_size: int = policy.min_instance_size
        self.min_group_size: int = policy.min_group_size
        self.strict: bool = policy.strict
        self.skip_nonfinite: bool = policy.skip_nonfinite
        self.native_eval_rule: bool = policy.native_eval_rule
        self.eval_batch_stats: bool = policy.eval_batch_stats
        self.instance_running_stats: bool = policy.instance_running_stats
        self.momentum: Optional[float] = preset.momentum
        self.window_samples: int = preset.window_samples or 0
        self.balance_decay: float = BALANCE_DECAY
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
        self.activation = _scriptable_activation(getattr(layer, "activation", None))
        self.train(layer.training)
        # Held in a tuple: not a submodule (TorchScript neither compiles nor saves it), and out of reach of
        # torch.jit.script's rewrite of module attributes, which would put this module in its place.
        self.eager_layer = (layer,)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            # torch.jit.script puts this module in place of the layer inside the model it was given
            # (it rewrites the module tree in place); there, in eager mode, the layer itself still runs.
            return self.run_eager_layer(input)
        self._check_input(input)
        shape = input.size()
        running_mean: Optional[Tensor] = self.running_mean
        eval_rule = not self.training and self.mode == "auto" and eval_uses_running_stats(
            self.track_running_stats, self.native_eval_rule, running_mean, self.running_var, self.num_batches_tracked,
            self.running_stats_balance)
        plan = step_plan(shape, self.training, self.mode, self.chain, self.eval_batch_stats, self.num_groups,
                         self.min_batch_size, self.min_instance_size, self.min_group_size, self.instance_running_stats,
                         self.track_running_stats, running_mean is not None, eval_rule)
        mode = plan.mode
        if mode is None:
            raise ValueError(f"{self.layer_name}(mode={self.mode}) cannot normalize input of shape {shape}: it would "
                             f"compute statistics over a single value. Use mode='auto' to fall back.")
        if self.strict and plan.fallback_from is not None:
            raise RuntimeError(f"{self.layer_name} fell back to {mode} for input of shape {shape}; Policy(strict=True).")
        use_buffers = plan.uses_running_stats
        running_var: Optional[Tensor] = self.running_var if use_buffers else None
        if not use_buffers:
            running_mean = None
        factor: Union[float, Tensor] = 0.0
        renorm: Optional[RenormClip] = None
        if self.training:
            balance = self.running_stats_balance
            if self.track_running_stats and balance is not None and self.running_mean is not None:
                update_balance(balance, balance_target(balance, use_buffers), self.balance_decay)
            steps = self.num_batches_tracked
            if self.renorm and mode == "batch" and running_var is not None and steps is not None:
                renorm = clip_at(steps, self.renorm_r_max, self.renorm_d_max, self.renorm_warmup_steps, running_var.dtype)
            if use_buffers:
                factor = running_stats_factor(shape[0], steps, mode == "batch", self.momentum, self.window_samples)
        skips = self.nonfinite_skips if use_buffers and self.training and self.skip_nonfinite else None
        return self.activation(normalize(input, mode, self.weight, self.bias, running_mean, running_var, self.training,
                                         factor, self.eps, self.num_groups, skips, renorm, False))

    @torch.jit.unused
    def run_eager_layer(self, input: Tensor) -> Tensor:
        return self.eager_layer[0](input)

    def _check_input(self, input: Tensor) -> None:
        if self.input_ranks[0] != -1 and input.dim() not in self.input_ranks:
            raise ValueError(f"{self.layer_name} got {input.dim()}-D input; expected ranks {self.input_ranks}")
        if input.dim() < 2:
            raise ValueError(f"{self.layer_name} expects (N, C, *) input, got {input.dim()}-D input")
        channels = input.size(1)
        if self.num_features == -1:  # num_features=None: this input says C, as in the eager layer
            groups = default_num_groups(channels) if self.num_groups == 0 else self.num_groups
            if channels % groups != 0:
                raise ValueError(f"{self.layer_name}: num_groups={groups} does not divide the {channels} channels of the input")
            self.num_groups = groups
            self.num_features = channels
        if channels != self.num_features:
            raise ValueError(f"{self.layer_name}: expected {self.num_features} channels at dim 1")


def _scriptable_activation(activation: Optional[nn.Module]) -> nn.Module:
    """The activation a fused layer (``AdaptiveNormAct``) applies after its norm, as the native module the
    scripted form calls: the layer's own PReLU (its slopes are the layer's parameters, under the same
    state-dict key), a leaky ReLU or ELU never in place (the norm's output may be its input: identity mode
    without an affine map), and ``nn.Identity`` for a plain adaptive layer."""
    if isinstance(activation, nn.LeakyReLU):
        return nn.LeakyReLU(activation.negative_slope)
    if isinstance(activation, nn.ELU):
        return nn.ELU(activation.alpha)
    if isinstance(activation, nn.PReLU):
        return activation
    return nn.Identity()
