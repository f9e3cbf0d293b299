"""The console entry points ``adanorm-train`` and ``adanorm-predict`` (``train.py`` and ``predict.py`` call them too).

    adanorm-train                                      # UNet, adaptive norm, synthetic volumes, CPU
    adanorm-train model=dynunet norm=instance          # any Hydra override: group=option, key=value
    adanorm-train -m norm=adaptive,batch,instance      # one run per norm (multirun/<date>/<time>/<n>), then a summary
    adanorm-train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt trainer.max_epochs=60   # resume, same config
    adanorm-predict outputs/<date>/<time>/checkpoints/last.ckpt scans/ --output predictions/
    adanorm-train data=moving_digits model=r2plus1d    # video: moving digits as MP4 clips, an R(2+1)D ResNet
    adanorm-predict outputs/<date>/<time>/checkpoints/last.ckpt clip.mp4 clips/ --output predictions/

The Hydra configs live in ``configs/`` and install as the package ``adanorm.configs`` (Hydra's search path
``pkg://adanorm.configs``), so both commands work from any directory and from a wheel; a run writes into
``outputs/<date>/<time>/`` under the current one.
Lightning, MONAI and the run code are imported only once the arguments are parsed, so ``--help`` answers fast.
A user's mistake ends either command with one line (``adanorm.recipes.errors``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

CONFIG_PATH = "pkg://adanorm.configs"
CONFIG_NAME = "train"
TRAIN_PROG = "adanorm-train"


def _train(cfg) -> Optional[float]:
    """Hydra's task function. A user error is logged to train.log and leaves as one line (``adanorm.recipes.errors``)."""
    from adanorm.recipes.errors import reported_through_hydra

    with reported_through_hydra(TRAIN_PROG, logging.getLogger(__name__), verbose=bool(cfg.get("verbose"))):
        from adanorm.recipes.run import train

        return train(cfg)


def train_main() -> None:
    """``adanorm-train [group=option ...] [key=value ...]``: Hydra's command line over the packaged configs.

    With ``ckpt_path=<run>/checkpoints/*.ckpt`` the first run's overrides go ahead of the command line's
    (``adanorm.recipes.resume``), so Hydra composes (and ``--cfg job`` shows) the config the run continues with.
    """
    import hydra
    from hydra._internal.utils import get_args_parser  # the parser hydra.main reads sys.argv with

    from adanorm.recipes.errors import exit_on_user_error
    from adanorm.recipes.resolvers import register_resolvers
    from adanorm.recipes.resume import with_first_run_overrides

    register_resolvers()  # the configs' ${adanorm.*} resolvers, before Hydra composes (hydra.run.dir uses one)
    arguments = sys.argv[1:]
    overrides = get_args_parser().parse_args(arguments).overrides
    with exit_on_user_error(TRAIN_PROG, verbose="verbose=true" in overrides):
        restored = with_first_run_overrides(overrides)
    # argparse takes the overrides (a positional with nargs="*") as one run of arguments: swap that run
    start = next(i for i in range(len(arguments) - len(overrides) + 1) if arguments[i:i + len(overrides)] == overrides)
    command_line = sys.argv
    sys.argv = [command_line[0], *arguments[:start], *restored, *arguments[start + len(overrides):]]
    try:
        hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")(_train)()
    finally:
        sys.argv = command_line


PREDICT_DESCRIPTION = "Run a checkpoint from adanorm-train (train.py) over whole NIfTI volumes or video clips."
PREDICT_EPILOG = """\
Segmentation checkpoints write one label NIfTI per input (same file name, same affine and header), by
sliding-window inference with Gaussian blending. Classification checkpoints print each volume's class
probabilities and write them to probabilities.csv. A checkpoint trained on video clips (data=moving_digits,
data=video_folder) reads video files (.mp4 and what else PyAV decodes), resampled to its training clip size.

--norm-stats volume gives InstanceNorm/GroupNorm/adaptive per-sample layers the statistics of the whole
volume instead of each window's (no per-window exposure shifts or seams where the intensity drifts); it
gathers them in extra passes over non-overlapping windows, at most one per norm layer.

example: adanorm-predict outputs/<date>/<time>/checkpoints/last.ckpt scans/ --output predictions/
         adanorm-predict last.ckpt scan.nii.gz --norm-stats volume --tile-report
         adanorm-predict last.ckpt clip.mp4 more_clips/ --output predictions/"""


def predict_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=PREDICT_DESCRIPTION, epilog=PREDICT_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by adanorm-train (train.py)")
    parser.add_argument("inputs", type=Path, nargs="+",
                        help=".nii/.nii.gz files or folders of them; for a video checkpoint, video files (.mp4, ...) or folders")
    parser.add_argument("--output", type=Path, default=Path("predictions"),
                        help="output folder (default: predictions/); it may not hold the inputs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (without it, an existing output stops the run "
                             "before anything is written)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, 0 to <1 (default: 0.5)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: auto)")
    parser.add_argument("--norm-stats", choices=("tile", "running", "volume"), default="tile",
                        help="where per-sample norm layers take eval statistics from in sliding-window inference: "
                             "each window's (tile, the default and fastest), the layers' learned running statistics "
                             "(running; an error names layers without them), or the whole volume's (volume; up to one "
                             "extra pass over non-overlapping windows per norm layer)")
    parser.add_argument("--tile-report", action="store_true",
                        help="also predict each volume in one forward (unpadded where the network accepts its size, padding "
                             "kept out of every statistic otherwise) and print/write (tile_report.csv) how far the "
                             "tiled prediction is from it and how strong its window seams are")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="let the checkpoint build a network outside MONAI and adanorm (runs its constructor): "
                             "only for checkpoints you wrote yourself")
    parser.add_argument("--verbose", action="store_true",
                        help="show the traceback of an error (without it, a missing file, a bad checkpoint or a "
                             "refused input ends with one line naming it and the fix; HYDRA_FULL_ERROR=1 does the same)")
    return parser


def predict_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """``adanorm-predict CHECKPOINT INPUT [INPUT ...] [--output DIR] [--overlap F] [--accelerator A] [--norm-stats S]
    [--tile-report] [--trust-checkpoint] [--overwrite] [--verbose]``."""
    parser = predict_parser(prog)
    args = parser.parse_args(argv)

    from adanorm.recipes.errors import exit_on_user_error
    from adanorm.recipes.inference import predict  # imported here so that --help answers fast

    with exit_on_user_error(parser.prog, verbose=args.verbose):
        output = predict(args.checkpoint, args.inputs, args.output, overlap=args.overlap, accelerator=args.accelerator,
                         trust_checkpoint=args.trust_checkpoint, norm_stats=args.norm_stats,
                         report_tiles=args.tile_report, overwrite=args.overwrite)
    print(f"predictions: {output}")
