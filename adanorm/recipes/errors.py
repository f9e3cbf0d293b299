"""How ``adanorm-train`` and ``adanorm-predict`` end on a mistake the user can fix: one line, no traceback.

A user error (a config value, a missing or unreadable file, a bad checkpoint, a refused resume) ends the
command with ``<prog>: error: <what is wrong, the key or file, and the fix>`` on stderr and exit status 1,
the status Hydra gives the config errors it reports itself. Any other exception is a bug and keeps its
traceback. ``verbose=true`` (adanorm-train), ``--verbose`` (adanorm-predict) or ``HYDRA_FULL_ERROR=1`` (both)
show the traceback of a user error too.

User errors are recognized by type: adanorm's own refusals (its ``ValueError`` subclasses ``ConfigError``,
``VolumeDataError``, ``CheckpointError`` and predict's, and any ``ValueError`` or ``TypeError`` that a ``raise``
statement in adanorm's code raises: each names the fix), missing or unreadable files, and OmegaConf's and
Hydra's config errors, anywhere in the chain of exceptions that wraps them (Hydra's ``instantiate`` and
OmegaConf's interpolation wrap what a constructor or resolver raises). A ``ValueError`` that Python raises in
adanorm's code (a failed unpacking, say) is a bug.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

from hydra.errors import CompactHydraException, ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

EXIT_STATUS = 1
FULL_TRACEBACK_VARIABLE = "HYDRA_FULL_ERROR"  # Hydra's own switch, honoured by both commands
FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
CONFIG_ERRORS = (OmegaConfBaseException, ConfigCompositionException)
PACKAGE = Path(__file__).resolve().parents[1]  # adanorm/, found without importing it


class ConfigError(ValueError):
    """A setting that must change (a resolver's refusal, a refused resume); the message names it and the fix."""


class ReportedError(CompactHydraException):
    """A user error on its way through Hydra, whose ``run_and_report`` prints a compact exception's message
    alone (and the full chain under ``HYDRA_FULL_ERROR=1``)."""


def _chain(error: BaseException) -> List[BaseException]:
    """``error`` and what it wraps, outermost first. OmegaConf raises its interpolation error while handling
    the resolver's, without ``from``: only there is the implicit context followed."""
    chain: List[BaseException] = []
    link: Optional[BaseException] = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__ or (link.__context__ if isinstance(link, OmegaConfBaseException) else None)
    return chain


def _refused_by_adanorm(error: BaseException) -> bool:
    if isinstance(error, ValueError) and type(error).__module__.startswith("adanorm."):
        return True
    # the built-in types only: a library's subclass (OmegaConf's) can carry the traceback of what it wraps
    frames = traceback.extract_tb(error.__traceback__) if type(error) in (ValueError, TypeError) else []
    return bool(frames) and PACKAGE in Path(frames[-1].filename).resolve().parents \
        and (frames[-1].line or "").startswith("raise ")


def user_error(error: BaseException) -> Optional[BaseException]:
    """The exception in ``error``'s chain that a user caused and whose message says what to fix; None for a bug.

    adanorm's own refusals come first (the outermost: it names the file where what it wraps does not), then
    file and config errors.
    """
    chain = _chain(error)
    own = [link for link in chain if _refused_by_adanorm(link)]
    other = [link for link in chain if isinstance(link, FILE_ERRORS + CONFIG_ERRORS)]
    return (own + other)[0] if own or other else None


def describe(error: BaseException) -> str:
    """One line for a user error: OmegaConf's key trailer becomes part of the sentence, a bare OS error gets the fix."""
    if isinstance(error, MissingMandatoryValue):
        return f"{error.full_key} has no value; set it on the command line: {error.full_key}=..."
    if isinstance(error, OmegaConfBaseException):
        first_line = str(error).strip().splitlines()[0]
        full_key = getattr(error, "full_key", None)
        return f"{first_line} (key: {full_key})" if full_key else first_line
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}; check the path, and that the file is readable."
    return str(error).strip()


def full_traceback_requested(verbose: bool = False) -> bool:
    return verbose or os.environ.get(FULL_TRACEBACK_VARIABLE) == "1"


@contextmanager
def exit_on_user_error(prog: str, verbose: bool = False) -> Iterator[None]:
    """Ends the command with ``<prog>: error: ...`` and exit status 1 on a user error; a bug keeps its traceback."""
    try:
        yield
    except Exception as error:
        cause = None if full_traceback_requested(verbose) else user_error(error)
        if cause is None:
            raise
        print(f"{prog}: error: {describe(cause)}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS) from None


@contextmanager
def reported_through_hydra(prog: str, log: logging.Logger, verbose: bool = False) -> Iterator[None]:
    """For a Hydra task function: every failure goes to the run's log (``train.log``) too, and a user error
    leaves as a ``ReportedError``, which Hydra prints as its message alone and ends with exit status 1."""
    try:
        yield
    except Exception as error:
        cause = user_error(error)
        if cause is None or verbose:
            log.exception(f"{prog}: error")
            raise
        message = f"{prog}: error: {describe(cause)}"
        log.error(message)
        # Chained as context, not cause: Hydra prints an OmegaConf cause after the message, which says it already.
        raise ReportedError(message)  # noqa: B904
