"""The layer's rules (adanorm.rules) are written once: the eager layer, its scripted form and tiling call
the same functions, TorchScript compiles them as they are, no module of the rules imports the layer, and
the eager fast paths (the eval-rule memo, the balance run) give what the rules give."""
import ast
import copy
import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import adanorm
from adanorm import rules

PACKAGE = Path(adanorm.__file__).parent


def package_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def reads_initial_statistics(function):
    """Whether a function compares running statistics with their initial values: the eval rule's 'learned'
    test (``mean.ne(0)`` and ``var.ne(1)``), whatever the function is called."""
    compared = {node.args[0].value for node in ast.walk(function)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "ne"
                and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)}
    return {0, 1} <= compared


def test_the_eval_rule_has_one_definition():
    definitions = [f"{path}:{function.name}" for path, function in package_functions() if reads_initial_statistics(function)]
    assert definitions == ["adanorm/rules.py:running_stats_learned"]


@pytest.mark.parametrize("module", ["adanorm/rules.py", "adanorm/scripting.py", "adanorm/policy.py"])
def test_the_rules_and_the_scripted_form_do_not_import_the_layer(module):
    """No import cycle: the layer (adanorm.norm) imports these modules, none of them imports it back."""
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE.parent / module).read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "adanorm.norm" not in imported and "adanorm" not in imported


@pytest.mark.parametrize("name", [name for name, value in vars(rules).items()
                                  if inspect.isfunction(value) and value.__module__ == rules.__name__])
def test_every_rule_compiles_in_torchscript(name):
    torch.jit.script(getattr(rules, name))


def learned(layer):
    layer.train()(torch.randn(32, 4, 2, 2, 2) * 2 + 1)  # a batch-mode step
    return layer.eval()


@pytest.mark.parametrize("state", ["fresh", "learned", "balance below zero", "loaded with a zero counter",
                                   "native eval rule", "untracked"])
def test_eager_scripted_and_rule_agree_on_the_eval_rule(state):
    layer = adanorm.AdaptiveNorm3d(4, track_running_stats=state != "untracked")
    if state in ("learned", "balance below zero"):
        learned(layer)
    if state == "balance below zero":
        layer.running_stats_balance.fill_(-0.5)
    if state == "loaded with a zero counter":  # an old checkpoint: real statistics, no steps counted
        layer.load_state_dict({**layer.state_dict(), "running_mean": torch.full((4,), 2.0)})
    if state == "native eval rule":
        layer.policy = replace(layer.policy, native_eval_rule=True)
    expected = {"fresh": False, "learned": True, "balance below zero": False, "loaded with a zero counter": True,
                "native eval rule": True, "untracked": False}[state]
    assert rules.eval_uses_running_stats(layer.track_running_stats, layer.policy.native_eval_rule, layer.running_mean,
                                         layer.running_var, layer.num_batches_tracked, layer.running_stats_balance) is expected
    layer.eval()
    assert layer.eval_uses_running_stats() is expected
    x = torch.randn(1, 4, 1, 1, 1) * 3 + 2  # eval batch 1 on 1x1x1: only running statistics normalize it
    scripted = torch.jit.script(copy.deepcopy(layer))
    torch.testing.assert_close(scripted(x), layer(x))
    assert (layer.last_mode == "batch") is expected


def test_the_eval_rule_memo_sees_a_new_policy_and_writes_through_data_after_eval():
    """The memo's key covers every input of the rule: a policy swapped on an untrained layer counts at once;
    a write that bypasses the version counters (``.data``) counts from the next eval()."""
    layer = adanorm.AdaptiveNorm3d(4).eval()
    x = torch.randn(1, 4, 1, 1, 1)
    layer(x)
    assert layer.last_mode != "batch"
    layer.policy = replace(layer.policy, native_eval_rule=True)
    layer(x)
    assert layer.last_mode == "batch"
    layer.policy = replace(layer.policy, native_eval_rule=False)
    layer(x)
    assert layer.last_mode != "batch"
    layer.running_mean.data.fill_(1.0)  # learned-looking statistics, written around the version counter
    layer.eval()
    layer(x)
    assert layer.last_mode == "batch"


def test_the_eval_rule_memo_sees_a_replaced_buffer():
    layer = learned(adanorm.AdaptiveNorm3d(4))
    x = torch.randn(1, 4, 1, 1, 1)
    layer(x)
    assert layer.last_mode == "batch"
    layer.running_stats_balance = torch.full((), -1.0)  # a new tensor: another id, version 0
    layer(x)
    assert layer.last_mode != "batch"


def test_the_balance_run_restarts_on_a_new_tensor_and_matches_the_rule():
    """_BalanceRun skips only updates that change nothing; a replaced balance (another tensor) starts a new
    run, which then follows rules.update_balance step for step."""
    layer = adanorm.AdaptiveNorm3d(4).train()
    small = torch.randn(2, 4, 2, 2, 2)
    for _ in range(600):  # past the fixed point in float32
        layer(small)
    assert layer._balance_run.settled
    layer.running_stats_balance = torch.zeros(())
    reference = torch.zeros(())
    for _ in range(5):
        layer(small)
        rules.update_balance(reference, rules.balance_target(reference, False), rules.BALANCE_DECAY)
    assert not layer._balance_run.settled
    assert torch.equal(layer.running_stats_balance, reference)


@pytest.mark.parametrize("momentum, window", [(0.1, 0), (None, 0), (None, 256)])
def test_running_stats_factor_is_the_presets_factor(momentum, window):
    """One rule for the factor: it equals MomentumPreset.factor and counts only batch steps."""
    preset = adanorm.MomentumPreset("custom", momentum, window or None)
    steps = torch.tensor(3)
    factor = rules.running_stats_factor(8, steps, True, momentum, window)
    assert int(steps) == 4
    torch.testing.assert_close(torch.as_tensor(factor, dtype=torch.float32),
                               torch.as_tensor(preset.factor(8, torch.tensor(4)), dtype=torch.float32))
    rules.running_stats_factor(8, steps, False, momentum, window)
    assert int(steps) == 4  # instance steps are not counted, as in nn.InstanceNorm
