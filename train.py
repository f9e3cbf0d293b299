"""Train a MONAI 3D network with adaptive (or native) normalization under Lightning.

    python train.py                                   # UNet, adaptive norm, synthetic volumes, CPU
    python train.py norm=batch                        # same run with another norm
    python train.py norm.preset=small_batch           # another momentum preset
    python train.py data=nifti_folder data.root=PATH  # your own volumes
    python train.py -m norm=adaptive,batch,instance   # one run per norm
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt   # resume

Config groups live in configs/; outputs go to Hydra's run folder (outputs/<date>/<time>).
"""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from adanorm.recipes.run import train  # imported here so that --help and --cfg answer fast

    return train(cfg)


if __name__ == "__main__":
    main()
