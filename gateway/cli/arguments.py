"""The command line's grammar: every command, its options, and the handler it runs."""
from __future__ import annotations

import argparse

from .batch import cmd_batch
from .commands import (
    cmd_generate,
    cmd_jobs_cancel,
    cmd_jobs_list,
    cmd_jobs_retry,
    cmd_jobs_show,
    cmd_models,
    cmd_status,
)
from .config import DEFAULT_URL, VERSION

DESCRIPTION = "`rcg`, the gateway's command line: prompt files through durable jobs, images into a folder."
JOB_ACTIONS = (("show", cmd_jobs_show, "a job and its items"),
               ("cancel", cmd_jobs_cancel, "cancel a job's unfinished items"),
               ("retry", cmd_jobs_retry, "run a finished job's failed items again"))


def build_parser() -> argparse.ArgumentParser:
    """The parser of `rcg`; each command sets `handler(args, config) -> exit code`."""
    common = _common()
    parser = argparse.ArgumentParser(prog="rcg", parents=[common], description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rcg {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_runs(commands, common)
    _add_jobs(commands, common)
    models = commands.add_parser("models", parents=[common], help="the models and their parameters")
    models.add_argument("name", nargs="?")
    models.set_defaults(handler=cmd_models)
    commands.add_parser("status", parents=[common], help="the gateway's limits and load").set_defaults(
        handler=cmd_status)
    return parser


def _common() -> argparse.ArgumentParser:
    """Options valid before or after the command (SUPPRESS: a later position never resets them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"the gateway (RCG_URL; default {DEFAULT_URL})")
    common.add_argument("--admin-key", default=argparse.SUPPRESS,
                        help="sent as X-Admin-API-Key (prefer RCG_ADMIN_KEY: flags show in `ps`)")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="your Replicate token, sent as X-Replicate-API-Key (prefer RCG_REPLICATE_TOKEN)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log every retry")
    return common


def _add_runs(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`batch` and `generate`, the commands that run prompts."""
    batch = commands.add_parser("batch", parents=[common], help="run a .jsonl, .csv or .txt file of prompts")
    batch.add_argument("file", help="prompts: .jsonl, .csv or .txt")
    _run_options(batch)
    batch.set_defaults(handler=cmd_batch)
    generate = commands.add_parser("generate", parents=[common], help="run one prompt")
    generate.add_argument("prompt")
    generate.add_argument("--name", help="the file name (default: from the prompt)")
    _run_options(generate)
    generate.set_defaults(handler=cmd_generate)


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model id, e.g. flux-dev (see `rcg models`)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="a model parameter; the value is read as JSON where it parses (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="folder for the images")
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job id(s) and exit")
    parser.add_argument("--retry-failed", action="store_true",
                        help="when reattaching to a finished job, run its failed items again")
    parser.add_argument("--new", action="store_true",
                        help="always start new job(s) instead of reattaching (a rerun then cannot reattach)")


def _add_jobs(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`jobs list | show ID | cancel ID | retry ID`."""
    jobs = commands.add_parser("jobs", parents=[common], help="list, show, cancel or retry jobs")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="your jobs, newest first")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--per-page", type=int, default=20)
    listing.set_defaults(handler=cmd_jobs_list)
    for name, handler, text in JOB_ACTIONS:
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("id")
        action.set_defaults(handler=handler)
