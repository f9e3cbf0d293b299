"""Run a checkpoint from train.py over whole NIfTI volumes.

    python predict.py outputs/<date>/<time>/checkpoints/last.ckpt scans/ --output predictions/

Segmentation checkpoints write one label NIfTI per input (same file name, same affine and header),
by sliding-window inference with Gaussian blending. Classification checkpoints print each
volume's class probabilities and write them to probabilities.csv.
"""
import argparse
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by train.py")
    parser.add_argument("inputs", type=Path, help="a .nii/.nii.gz file or a folder of them")
    parser.add_argument("--output", type=Path, default=Path("predictions"), help="output folder (default: predictions/)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, 0 to <1 (default: 0.5)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: auto)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="let the checkpoint build a network outside MONAI and adanorm (runs its constructor): "
                             "only for checkpoints you wrote yourself")
    args = parser.parse_args(argv)

    from adanorm.recipes.inference import predict  # imported here so that --help answers fast

    output = predict(args.checkpoint, args.inputs, args.output, overlap=args.overlap, accelerator=args.accelerator,
                     trust_checkpoint=args.trust_checkpoint)
    print(f"predictions: {output}")


if __name__ == "__main__":
    main()
