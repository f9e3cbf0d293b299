"""Run a checkpoint from train.py over whole NIfTI volumes: ``adanorm-predict``'s script form.

    python predict.py outputs/<date>/<time>/checkpoints/last.ckpt scans/ --output predictions/

Segmentation checkpoints write one label NIfTI per input (same file name, same affine and header),
by sliding-window inference with Gaussian blending. Classification checkpoints print each
volume's class probabilities and write them to probabilities.csv. The code is
adanorm.recipes.cli.predict_main, the same as the adanorm-predict command.
"""
from adanorm.recipes.cli import predict_main


def main(argv=None) -> None:
    predict_main(argv)


if __name__ == "__main__":
    main()
