"""`olmoe train CONFIG.yaml [key=value ...]`: train from a config file and overrides.

Runs as one process, under `torchrun` (`torchrun --nproc_per_node N -m olmoe.train.cli ...`)
and under Composer's launcher (`composer -n N -m olmoe.train.cli ...`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from olmoe.model.config import ConfigError
from olmoe.train.config import load_config, to_yaml

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-3 max_duration=50ba"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0

    from olmoe.data.errors import DataError
    from olmoe.train.trainer import train

    try:
        train(config)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olmoe train", description=__doc__.splitlines()[0])
    configure_parser(parser)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
