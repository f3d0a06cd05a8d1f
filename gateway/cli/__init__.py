"""`rcg`, the gateway's command line: prompt files through durable jobs, images into a folder.

    rcg batch prompts.csv --model flux-dev --out images/
    rcg generate "a red car" --model flux-dev --out images/
    rcg jobs list | jobs show ID | jobs cancel ID | jobs retry ID;  rcg models [NAME];  rcg status

It talks to the gateway over HTTP only (`RCG_URL`, `RCG_ADMIN_KEY` or `RCG_REPLICATE_TOKEN`).
A batch is submitted with an Idempotency-Key derived from the file's content and the options,
so the same command run again reattaches to the same job(s) and downloads only what is
missing. Exit codes: 0 every item succeeded, 1 some failed or were canceled, 2 usage or
configuration error, 3 service or network error, 130 interrupted.

The modules, from the entry point down:
    entry      main(): logging with secrets masked, errors into exit codes
    arguments  the commands and options (argparse)
    batch      `rcg batch`: submit, watch, download, results.jsonl
    commands   generate, jobs, models, status
    runner     polling jobs and scheduling downloads, with progress
    progress   a bar on a terminal, else silent
    downloads  atomic downloads, skip-if-present, the output folder
    plans      rows grouped into jobs, Idempotency-Keys
    inputs     .jsonl / .csv / .txt files and --param values
    client     the gateway's HTTP API, retries
    config     flags and environment, redaction of secrets in output
    errors     exit codes and CliError
"""
from .config import VERSION as __version__
from .entry import main
from .errors import CliError
from .inputs import Row, parse_value, read_rows
from .plans import plan_jobs

__all__ = ["CliError", "Row", "__version__", "main", "parse_value", "plan_jobs", "read_rows"]
