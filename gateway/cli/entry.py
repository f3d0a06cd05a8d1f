"""`main`: parse the arguments, run the command, and turn every failure into one line on
stderr (secrets masked) and an exit code."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import Any

from .arguments import build_parser
from .config import RedactingHandler, resolve_config
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SERVICE, EXIT_USAGE, CliError

log = logging.getLogger("rcg")


def main(argv: list[str] | None = None) -> int:
    """Run `rcg` with `argv` (default: sys.argv[1:]) and return its exit code."""
    args = build_parser().parse_args(argv)
    hidden: list[str] = []  # filled once the secrets are known; the handler masks them from then on
    log.handlers[:] = [RedactingHandler(hidden)]
    log.propagate = False
    try:
        return _run(args, hidden)
    except CliError as exc:
        log.error("%s", exc.message)
        return exc.code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `rcg ... | head`
        sys.stdout = open(os.devnull, "w")  # later writes (and the exit flush) go nowhere
        return EXIT_OK
    except OSError as exc:
        log.error("%s: %s", exc.filename or "I/O error", exc.strerror or type(exc).__name__)
        return EXIT_USAGE
    except Exception as exc:  # never a raw traceback: it could quote a secret
        log.error("unexpected error (%s); --verbose shows details", type(exc).__name__)
        log.debug("%s", traceback.format_exc())
        return EXIT_SERVICE


def _run(args: argparse.Namespace, hidden: list[str]) -> int:
    verbose = getattr(args, "verbose", False)
    config = resolve_config(args, dict(os.environ))
    hidden.extend(config.secrets)
    log.setLevel(logging.DEBUG if verbose else logging.INFO if config.progress else logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends like Ctrl-C
    try:
        return args.handler(args, config)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
