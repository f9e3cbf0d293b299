"""Train a MONAI 3D network with adaptive (or native) normalization under Lightning: ``adanorm-train``'s script form.

    python train.py                                   # UNet, adaptive norm, synthetic volumes, CPU
    python train.py norm=batch                        # same run with another norm
    python train.py norm.preset=small_batch           # another momentum preset (norm=adaptive or norm=batch)
    python train.py data=nifti_folder data.root=PATH  # your own volumes
    python train.py -m norm=adaptive,batch,instance   # one run per norm
    python train.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt trainer.max_epochs=60   # resume, in that folder

Config groups live in configs/ (installed as adanorm.configs); outputs go to Hydra's run folder (outputs/<date>/<time>)
under the current directory. The code is adanorm.recipes.cli.train_main, the same as the adanorm-train command.
"""
from adanorm.recipes.cli import train_main

if __name__ == "__main__":
    train_main()
