"""`python -m replicate_emulator --port 5099 [--set fail_rate=0.1 ...]`"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .app import serve_forever
from .emulator import Emulator
from .faults import Faults


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m replicate_emulator",
                                     description="A local emulator of Replicate's HTTP API.")
    parser.add_argument("--host", default=os.environ.get("EMULATOR_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("EMULATOR_PORT", "5099")))
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault dice")
    parser.add_argument("--only-token", action="append", default=[], metavar="TOKEN",
                        help="accept only these tokens (repeatable); default: any token")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a fault setting, e.g. latency_s=2 or fail_rate=0.1 (repeatable)")
    return parser.parse_args(argv)


def faults_from(settings: list[str], environ: dict[str, str]) -> Faults:
    """Faults from `EMULATOR_<NAME>` variables, then `--set` flags; ValueError if bad."""
    faults = Faults()
    names = faults.as_dict()
    faults.update({n: environ[f"EMULATOR_{n.upper()}"] for n in names
                   if f"EMULATOR_{n.upper()}" in environ})
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        faults.update({name: value})
    return faults


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s emulator %(levelname)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        faults = faults_from(args.set, dict(os.environ))
    except ValueError as exc:
        logging.error("%s", exc)
        return 2
    emulator = Emulator(faults, seed=args.seed, accept_any_token=not args.only_token)
    for token in args.only_token:
        emulator.token_states[token] = "valid"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve_forever(emulator, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
