"""The `olmoe` command: one entry point with a subcommand per job.

Each subcommand lives in its own module, imported only when it runs, so that
`olmoe convert` does not pay for Composer's import and `olmoe --help` is fast.
A subcommand module defines `configure_parser(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("olmoe.convert.cli", "convert checkpoints between olmoe and HuggingFace"),
    "prepare": ("olmoe.data.prepare_cli", "tokenize text into packed MDS shards"),
    "train": ("olmoe.train.cli", "train a model from a YAML config and overrides"),
    "sweep": ("olmoe.train.sweep", "expand a sweep file into runs and launch them"),
    "export": ("olmoe.train.export", "write a training checkpoint as a HuggingFace model"),
    "analyze": ("olmoe.analysis.cli", "export routing of checkpoints and compute metrics"),
    "demo": ("olmoe.demo", "run the main job end to end on the built-in corpus"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmoe", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    known, rest = top.parse_known_args(argv)
    logging.basicConfig(
        level=known.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module_name, help_text = SUBCOMMANDS[known.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"olmoe {known.command}", description=help_text)
    module.configure_parser(sub)
    args = sub.parse_intermixed_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
