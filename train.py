"""Train a MONAI 3D network with adaptive (or native) normalization under Lightning.

    python train.py                                   # UNet, adaptive norm, synthetic volumes, CPU
    python train.py norm=batch                        # same run with another norm
    python train.py norm.preset=small_batch           # another momentum preset (norm=adaptive or norm=batch)
    python train.py data=nifti_folder data.root=PATH  # your own volumes
    python train.py -m norm=adaptive,batch,instance   # one run per norm
    python train.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt trainer.max_epochs=60   # resume, in that folder

Config groups live in configs/; outputs go to Hydra's run folder (outputs/<date>/<time>).
"""
import hydra
from omegaconf import DictConfig, OmegaConf

RESOLVERS = ("adanorm.run_dir", "adanorm.config_subdir", "adanorm.batch_norm_momentum", "adanorm.norm_without_presets")


def register_resolvers() -> None:
    """The configs' ${adanorm.*} resolvers (adanorm/recipes/resolvers.py), registered before Hydra composes.

    Each imports adanorm (torch, MONAI) only when first resolved, so --help and --cfg answer fast.
    """
    for name in RESOLVERS:
        def resolve(*args, _name=name):
            from adanorm.recipes.resolvers import RESOLVERS as implementations

            return implementations[_name](*args)

        OmegaConf.register_new_resolver(name, resolve, replace=True)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from adanorm.recipes.run import train  # imported here so that --help and --cfg answer fast

    return train(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
