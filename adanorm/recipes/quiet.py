"""Silencing the third-party messages every recipe run would print, by name: other warnings still show."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

QUIET_WARNINGS = (
    # torch deprecates LeafSpec, which Lightning 2.6's _pytree helper still builds for every logged value.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
QUIET_LIGHTNING_INFO = ("💡 Tip: For seamless cloud logging",)  # Lightning's advertisement for its cloud logger
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def quiet_third_party(resuming: bool = False) -> Iterator[None]:
    """Silences the named third-party messages every run would print, and nothing else.

    A resumed run (``resuming``) writes into its existing checkpoint folder by design, so Lightning's notice
    about that goes too.
    """
    drop = _DropMessages(QUIET_LIGHTNING_INFO)
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message, category in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            if resuming:
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
