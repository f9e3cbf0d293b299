"""Rebuilding a recipe model from a checkpoint without running anything the checkpoint names.

A recipe checkpoint carries the network's config (``_target_`` plus arguments) so that
``predict.py`` needs nothing else. Checkpoints are shared as "weights", so that config is
untrusted input: ``hydra.utils.instantiate`` imports and calls whatever dotted path a
``_target_`` names, and ``os.makedirs`` or ``subprocess.run`` would run as readily as a UNet.
So the file is read with ``torch.load(weights_only=True)`` (no pickled code), every
``_target_`` in it, at any depth, must be on an allow-list before anything is imported, and the
LightningModule class comes from a fixed table by name, never from a path in the file.
``trust_checkpoint=True`` (``predict.py --trust-checkpoint``) lifts the target check for
checkpoints users wrote themselves with a network of their own.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple, Type, Union

import torch
from torch import nn

from adanorm.recipes.module import CLASS_PATH_KEY, RECIPE_MODULES, RecipeModule

TARGET_KEY = "_target_"
TRUST_HINT = (
    "If you wrote this checkpoint yourself, pass --trust-checkpoint to predict.py "
    "(trust_checkpoint=True to adanorm.recipes.checkpoint.load_recipe_module)."
)
ADANORM_BUILDERS = frozenset({"adanorm.recipes.models.resnet_classifier", "adanorm.recipes.models.r2plus1d_resnet"})
MONAI_NETS = "monai.networks.nets."
_LEGACY_CLASS_PREFIX = "adanorm.recipes.module."  # checkpoints before the table stored the class path
_SHOWN_KEYS = 3


class CheckpointError(ValueError):
    """A checkpoint that cannot, or must not, be turned into a model."""


def is_allowed_target(target: Any) -> bool:
    """A MONAI network class (``monai.networks.nets.<Name>``) or one of adanorm's model builders.

    Decided from the string alone: looking the name up must not import a module the file names.
    """
    if not isinstance(target, str):
        return False
    if target in ADANORM_BUILDERS:
        return True
    if not target.startswith(MONAI_NETS) or "." in target[len(MONAI_NETS):]:
        return False
    from monai.networks import nets

    network = getattr(nets, target[len(MONAI_NETS):], None)
    return isinstance(network, type) and issubclass(network, nn.Module)


def _walk(config: Any, path: str) -> Iterator[Tuple[str, Any]]:
    """Every (key path, value) in nested dicts and lists, e.g. ``net.norm[1]._target_``."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            yield from _walk(value, f"{path}[{index}]")
    yield path, config


def untrusted_entries(config: Any, path: str = "net") -> List[str]:
    """What in a network config would run code: targets off the allow-list, and OmegaConf
    interpolations (``${...}``, resolved by ``instantiate``, can read the environment)."""
    problems = []
    for key_path, value in _walk(config, path):
        if key_path.endswith(f".{TARGET_KEY}") and not is_allowed_target(value):
            problems.append(f"{key_path} = {value!r} is not an allowed target")
        elif isinstance(value, str) and "${" in value:
            problems.append(f"{key_path} = {value!r} is an interpolation")
    return problems


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint's dict, read without unpickling any Python object."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise CheckpointError(
            f"{path} holds pickled Python objects, which adanorm never loads ({detail.strip()}). Checkpoints are read "
            f"with torch.load(weights_only=True); re-save it from train.py, which writes only tensors and plain values."
        ) from None
    except (RuntimeError, EOFError, KeyError) as error:  # what torch.load raises on a truncated or non-checkpoint file
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint (torch.load raised {type(error).__name__}): it is truncated "
            f"or not a .ckpt file; pass a checkpoint written by adanorm-train (train.py)."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a .ckpt written by train.py.")
    return checkpoint


def recipe_module_class(checkpoint: Mapping[str, Any], path: Union[str, Path]) -> Type[RecipeModule]:
    """The LightningModule class, looked up by name in ``RECIPE_MODULES``: nothing is imported."""
    if CLASS_PATH_KEY not in checkpoint:
        raise CheckpointError(f"{path} was not written by an adanorm recipe (no {CLASS_PATH_KEY!r}); pass a checkpoint from train.py.")
    name = checkpoint[CLASS_PATH_KEY]
    short = name[len(_LEGACY_CLASS_PREFIX):] if isinstance(name, str) and name.startswith(_LEGACY_CLASS_PREFIX) else name
    if short not in RECIPE_MODULES:
        raise CheckpointError(
            f"{path}: {CLASS_PATH_KEY} = {name!r} is not one of adanorm's recipe modules {sorted(RECIPE_MODULES)}; "
            f"a checkpoint names its module from that table and cannot bring its own class."
        )
    return RECIPE_MODULES[short]


def _network_mismatch(network: nn.Module, weights: Mapping[str, torch.Tensor]) -> List[str]:
    expected = network.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    reshaped = [f"{key} {tuple(weights[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                if key in weights and tuple(weights[key].shape) != tuple(value.shape)]
    return [f"{len(keys)} {kind} ({', '.join(keys[:_SHOWN_KEYS])}{', ...' if len(keys) > _SHOWN_KEYS else ''})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape (file vs network)", reshaped))
            if keys]


def load_recipe_module(checkpoint_path: Union[str, Path], map_location: Any = "cpu",
                       trust_checkpoint: bool = False) -> RecipeModule:
    """Rebuilds the recipe module that wrote ``checkpoint_path``, refusing anything that would run code.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``train.py``.
        map_location: where the weights are placed.
        trust_checkpoint: build any importable network the checkpoint names, not only MONAI networks
            and adanorm's builders. Only for checkpoints you wrote yourself: the network's
            constructor runs with the file's arguments.

    Raises:
        CheckpointError: naming the offending key and value, before anything the file names is imported.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    module_class = recipe_module_class(checkpoint, checkpoint_path)
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyper_parameters, dict) or not isinstance(hyper_parameters.get("net"), dict):
        raise CheckpointError(f"{checkpoint_path} has no network config (hyper_parameters['net']); pass a checkpoint from train.py.")
    if not trust_checkpoint:
        problems = untrusted_entries(hyper_parameters["net"])
        if problems:
            raise CheckpointError(
                f"{checkpoint_path} was refused before building anything: {'; '.join(problems)}. A checkpoint may only "
                f"build MONAI networks ({MONAI_NETS}<Name>) and adanorm's model builders. {TRUST_HINT}"
            )
    try:
        module = module_class(**hyper_parameters)
    except TypeError as error:
        raise CheckpointError(f"{checkpoint_path}: its hyper_parameters do not fit {module_class.__name__} ({error}).") from None
    weights = checkpoint.get("state_dict", {})
    mismatch = _network_mismatch(module, weights)
    if mismatch:
        raise CheckpointError(
            f"{checkpoint_path}: its weights do not fit the network it describes "
            f"({hyper_parameters['net'].get(TARGET_KEY)}): keys {'; '.join(mismatch)}. The file's state_dict and "
            f"hyper_parameters['net'] come from different models; use the checkpoint train.py wrote, unedited."
        )
    module.load_state_dict(weights, strict=True)
    return module.to(map_location)
