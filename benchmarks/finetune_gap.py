"""Fine-tuning a BatchNorm checkpoint at batch 2: does eval use statistics that describe the training?

    python -m benchmarks.finetune_gap

A MONAI 3D ResNet-10 learns BatchNorm statistics at batch 8 (the "checkpoint"), then is fine-tuned
at batch 2 on shifted, rescaled inputs (a new scanner), as native BatchNorm3d, as ``adanorm.convert``
with its default (batch mode from 2 samples), and as adaptive layers with the fresh-layer policy
(batch mode from 8 samples, so instance mode at batch 2). Printed per variant: how far the running
statistics moved, which mode eval used, and the relative gap between the train-mode and eval-mode
outputs on held-out batches of the new domain (0 would mean eval computes what training computed).
"""
from __future__ import annotations

import copy
import warnings

import torch
from monai.networks.nets import resnet10

import adanorm


def relative_gap(model: torch.nn.Module, batches) -> float:
    gaps = []
    for x in batches:
        train_copy = copy.deepcopy(model).train()
        with torch.no_grad():
            y_train = train_copy(x)
            y_eval = model.eval()(x)
        gaps.append(((y_eval - y_train).norm() / y_train.norm()).item())
    return sum(gaps) / len(gaps)


def fine_tune(model: torch.nn.Module, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(2, 1, 16, 16, 16, generator=generator) * 3 + 2
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    torch.manual_seed(0)
    warnings.simplefilter("ignore", adanorm.FallbackWarning)
    checkpoint = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2)
    with torch.no_grad():
        for _ in range(20):
            checkpoint.train()(torch.randn(8, 1, 16, 16, 16))
    variants = {
        "native BatchNorm3d": copy.deepcopy(checkpoint),
        "adanorm.convert (default)": adanorm.convert(copy.deepcopy(checkpoint)),
        "adanorm.convert(policy=Policy())": adanorm.convert(copy.deepcopy(checkpoint), policy=adanorm.Policy()),
    }
    held_out = [torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(100 + i)) * 3 + 2 for i in range(4)]
    print(f"{'variant':36s} {'running-mean change':>20s} {'eval mode':>10s} {'eval/train gap':>15s}")
    for name, model in variants.items():
        before = torch.cat([b for key, b in model.state_dict().items() if key.endswith("running_mean")]).clone()
        fine_tune(model, steps=30, generator=torch.Generator().manual_seed(1))
        after = torch.cat([b for key, b in model.state_dict().items() if key.endswith("running_mean")])
        gap = relative_gap(model, held_out)
        modes = {m.last_mode for m in model.modules() if isinstance(m, adanorm.AdaptiveNorm)}
        print(f"{name:36s} {(after - before).abs().mean().item():20.2e} {'/'.join(sorted(modes)) or 'running':>10s} {gap:15.3f}")


if __name__ == "__main__":
    main()
