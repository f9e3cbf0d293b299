"""A 2-process Lightning DDP fit of the UNet recipe on the CPU with the AdaptiveNormSync plugin; each rank
saves its parameters and buffers. Run by tests/module/test_distributed.py (Lightning's ddp strategy starts rank 1 by
running this script again)."""
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipe_runs import compose_config, one_epoch, tiny  # noqa: E402

import adanorm  # noqa: E402
from adanorm.integrations.lightning import AdaptiveNormSync  # noqa: E402


def main(data_root: str, output: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cfg = compose_config(*tiny(Path(data_root), Path(output) / "run"), *one_epoch(), "trainer=ddp",
                         "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.enable_progress_bar=false",
                         "data.batch_size=1")
    torch.manual_seed(0)
    datamodule, module, trainer = instantiate(cfg.data), instantiate(cfg.module), instantiate(cfg.trainer)
    assert any(isinstance(plugin, AdaptiveNormSync) for plugin in [trainer._accelerator_connector._layer_sync])
    synced = []  # the plugin turns sync on for the fit; Lightning reverts it at teardown
    trainer.callbacks.append(pl.Callback())
    trainer.callbacks[-1].on_train_epoch_end = lambda trainer, module: synced.append(
        all(m.sync for m in module.modules() if isinstance(m, adanorm.AdaptiveNorm)))
    trainer.fit(module, datamodule=datamodule)
    layers = [m for m in module.modules() if isinstance(m, adanorm.AdaptiveNorm)]
    state = {"state": module.state_dict(), "synced": bool(synced) and all(synced),
             "modes": [layer.last_mode for layer in layers], "balance": [layer.running_stats_balance for layer in layers]}
    torch.save(state, Path(output) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
