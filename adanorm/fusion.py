"""Fusing adaptive layers with the activation that follows them in a network, and undoing it.

``convert(model, fuse_activation=True)`` calls ``fuse_activations`` after converting the norms; ``revert``
calls ``unfuse_activations`` first. A fusion turns the norm into its ``AdaptiveNormAct`` class (the same
object, so every parameter, buffer, policy and counter stays), moves the activation module into it, and
puts ``nn.Identity`` where the activation was. Where a norm is followed by an activation is read from
the network's structure, by two kinds of rule:

* ``nn.Sequential`` (and subclasses: MONAI's ``ADN`` and ``Convolution``, nnU-Net's
  ``ConvDropoutNormReLU`` blocks): a norm whose next sibling is a fusable activation, or whose next
  siblings are a dropout and such an activation when dropping before or after the activation gives the
  same result (p = 0, or an activation with act(c·z) = c·act(z) for c ≥ 0: leaky ReLU, PReLU);
* block rules (``BLOCK_RULES``), for blocks whose ``forward`` calls a norm and then an activation that
  is not its next sibling (MONAI's DynUNet blocks). Integrations add them by class name, so this module
  imports no network library.

The fused step writes into its input's storage (``inplace``) only where the structure says nothing else
reads it: a norm fed by the previous sibling of a ``Sequential`` (or a ``Sequential`` fed so in turn), or
what a block rule says.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Type

from torch import nn

from adanorm.norm import AdaptiveNorm, AdaptiveNorm1d, AdaptiveNorm2d, AdaptiveNorm3d
from adanorm.norm_act import (
    FUSABLE_ACTIVATIONS,
    AdaptiveNormAct,
    AdaptiveNormAct1d,
    AdaptiveNormAct2d,
    AdaptiveNormAct3d,
    make_activation,
)

FUSED_BY_NORM: Dict[Type[AdaptiveNorm], Type[AdaptiveNormAct]] = {
    AdaptiveNorm: AdaptiveNormAct, AdaptiveNorm1d: AdaptiveNormAct1d, AdaptiveNorm2d: AdaptiveNormAct2d,
    AdaptiveNorm3d: AdaptiveNormAct3d}
NORM_BY_FUSED = {fused: norm for norm, fused in FUSED_BY_NORM.items()}



class BlockRule(NamedTuple):
    """How to fuse a block that is not a ``Sequential``: ``fuse(block, fusions)`` fuses what the block's
    ``forward`` runs as norm → activation (through ``Fusions.fuse``) and returns whether it fused anything;
    ``unfuse(block)`` undoes exactly that."""

    fuse: Callable[[nn.Module, "Fusions"], bool]
    unfuse: Callable[[nn.Module], None]


BLOCK_RULES: Dict[str, BlockRule] = {}
"""Block rules by ``"<module>.<qualname>"`` of the block's class (integrations add theirs)."""


class Fusions:
    """One ``fuse_activations`` pass: fuses, and counts what it left unfused (ReLU pairs)."""

    def __init__(self) -> None:
        self.fused = 0
        self.relu_pairs = 0

    def fusable(self, norm: nn.Module, activation: Optional[nn.Module]) -> bool:
        """Whether ``norm`` (an unfused adaptive layer) and ``activation`` can be fused; counts ReLU pairs."""
        if type(norm) not in FUSED_BY_NORM or activation is None:
            return False
        if isinstance(activation, nn.ReLU):
            self.relu_pairs += 1
            return False
        if not isinstance(activation, FUSABLE_ACTIVATIONS) or isinstance(activation, nn.Identity):
            return False
        try:
            make_activation(activation)
        except ValueError:  # a slope that is not positive: not invertible
            return False
        return True

    def fuse(self, norm: AdaptiveNorm, activation: nn.Module, inplace: bool) -> AdaptiveNormAct:
        """``norm`` turned into its fused class with ``activation`` (the same object: nothing is copied)."""
        norm.__class__ = FUSED_BY_NORM[type(norm)]
        norm.activation = activation
        norm.inplace = inplace
        self.fused += 1
        return norm


def fuse_activations(model: nn.Module) -> nn.Module:
    """Fuse every adaptive layer of ``model`` that the structure shows is followed by a fusable activation
    (module docstring), in place. ReLU pairs stay as they are, with one warning naming their count."""
    fusions = Fusions()
    _fuse(model, fusions, fed_by_sibling=False)
    if fusions.relu_pairs:
        warnings.warn(
            f"convert(fuse_activation=True): {fusions.relu_pairs} norm → ReLU pair(s) left unfused: ReLU maps every "
            f"negative input to 0, so its input cannot be recovered from its output. Use nn.LeakyReLU to fuse them.",
            UserWarning, stacklevel=3)
    return model


def _fuse(module: nn.Module, fusions: Fusions, fed_by_sibling: bool) -> None:
    key = f"{type(module).__module__}.{type(module).__qualname__}"
    if key in BLOCK_RULES and BLOCK_RULES[key].fuse(module, fusions):
        module._fused_by_rule = key  # a plain string: the model still pickles and deep-copies
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, fusions, fed_by_sibling)
    children = list(module.named_children())
    for index, (_, child) in enumerate(children):
        # A child of a Sequential after the first is fed by its previous sibling; the first by the Sequential's input.
        _fuse(child, fusions, isinstance(module, nn.Sequential) and (index > 0 or fed_by_sibling))


def _fuse_sequential(sequence: nn.Sequential, fusions: Fusions, fed_by_sibling: bool) -> None:
    names: List[str] = list(sequence._modules)
    for index, name in enumerate(names):
        norm = sequence._modules[name]
        following = [sequence._modules[n] for n in names[index + 1:index + 3]]
        if not following:
            continue
        slot = index + 1
        if isinstance(following[0], nn.modules.dropout._DropoutNd) and len(following) == 2 and \
                _commutes_with_dropout(following[0], following[1]):
            slot = index + 2
        activation = sequence._modules[names[slot]]
        if fusions.fusable(norm, activation):
            fusions.fuse(norm, activation, inplace=index > 0 or fed_by_sibling)
            sequence._modules[names[slot]] = FusedActivationSlot()
            if any(True for _ in activation.state_dict()):
                norm.__dict__["_slot_keys"] = (
                    norm.register_state_dict_post_hook(SaveUnderSlot(names[slot])),
                    sequence.register_load_state_dict_pre_hook(LoadFromSlot(name, names[slot])))


def _commutes_with_dropout(dropout: nn.Module, activation: nn.Module) -> bool:
    """Whether activation(dropout(z)) = dropout(activation(z)): dropout multiplies by 0 or 1/(1 − p), which a
    positively homogeneous activation lets through; an ELU only commutes with no dropout at all."""
    return dropout.p == 0 or isinstance(activation, (nn.LeakyReLU, nn.PReLU))


class SaveUnderSlot:
    """A state-dict hook of a norm that took a PReLU (an activation with parameters) from its sibling ``slot``:
    the activation's parameters are saved under the slot's keys (``<parent>.<slot>.weight``), where the native
    network keeps them. With ``LoadFromSlot`` on the parent, checkpoints move between the native, converted and
    fused networks with ``strict=True``. Plain objects, so that the network still pickles and deep-copies."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __call__(self, norm, state_dict, prefix, local_metadata) -> None:
        own, slot = prefix + "activation.", prefix[:prefix[:-1].rfind(".") + 1] + self.slot + "."  # "a.norm." -> "a."
        for key in [key for key in state_dict if key.startswith(own)]:
            state_dict[slot + key[len(own):]] = state_dict.pop(key)


class LoadFromSlot:
    """The load-side twin of ``SaveUnderSlot``, on the parent ``Sequential`` (each child is handed only its own
    keys): ``<slot>.*`` keys load into ``<norm>.activation.*``."""

    def __init__(self, norm: str, slot: str) -> None:
        self.norm, self.slot = norm, slot

    def __call__(self, parent, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        own, slot = f"{prefix}{self.norm}.activation.", f"{prefix}{self.slot}."
        for key in [key for key in state_dict if key.startswith(slot)]:
            state_dict[own + key[len(slot):]] = state_dict.pop(key)


class FusedActivationSlot(nn.Identity):
    """Where an activation was before ``convert(fuse_activation=True)`` moved it into the norm before it:
    an ``nn.Identity`` that ``revert`` recognizes, so it restores only what a fusion took."""


def unfuse_activations(model: nn.Module) -> nn.Module:
    """Undo ``fuse_activations``: each fused layer turns back into its norm class and its activation goes
    back where it was; fused layers built as such (not by a fusion) stay fused. In place."""
    for module in list(model.modules()):
        key = module.__dict__.pop("_fused_by_rule", None)
        if key is not None:
            BLOCK_RULES[key].unfuse(module)
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for index, name in enumerate(names):
                norm = module._modules[name]
                if not isinstance(norm, AdaptiveNormAct) or type(norm) not in NORM_BY_FUSED:
                    continue
                slots = [n for n in names[index + 1:index + 3] if isinstance(module._modules[n], FusedActivationSlot)]
                if slots:
                    module._modules[slots[0]] = unfuse(norm)
    return model


def unfuse(layer: AdaptiveNormAct) -> nn.Module:
    """``layer`` turned back into its norm class (the same object); returns its activation module."""
    activation = layer.activation
    for handle in layer.__dict__.pop("_slot_keys", ()):
        handle.remove()
    del layer.activation
    del layer.inplace
    layer.__class__ = NORM_BY_FUSED[type(layer)]
    return activation
