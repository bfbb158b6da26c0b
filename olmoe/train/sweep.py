"""`olmoe sweep SWEEP.yaml`: expand a grid of overrides into named runs and launch them.

A sweep file::

    base: configs/demo.yaml          # config every run starts from (relative to the sweep file
                                     # or to the working directory)
    name: lr-topk                    # prefix of the run names
    overrides: [max_duration=50ba]   # applied to every run
    grid:                            # the cartesian product of these values
      optimizer.lr: [1.0e-3, 3.0e-4]
      model.moe.top_k: [1, 2]

Each run is `olmoe train BASE <overrides> <grid values> run_name=<name>-<key><value>...`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from olmoe.model.config import ConfigError
from olmoe.train.config import load_config

log = logging.getLogger(__name__)


@dataclass
class SweepRun:
    name: str
    overrides: list[str]


@dataclass
class Sweep:
    base: Path
    name: str
    runs: list[SweepRun]


def _slug(key: str, value) -> str:
    short = key.rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]", "", f"{short}{value}")


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file and expand its grid; every run's config is validated up front."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(data) - {"base", "name", "overrides", "grid"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)}; allowed: base, name, overrides, grid"
        )
    if "base" not in data:
        raise ConfigError(f"{path}: missing 'base' (the config every run starts from)")
    base = Path(data["base"])
    if not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map each key to a non-empty list of values")
    common = [str(item) for item in data.get("overrides") or []]
    name = str(data.get("name") or path.stem)

    runs = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = [f"{k}={v}" for k, v in zip(keys, values)]
        run_name = "-".join([name] + [_slug(k, v) for k, v in zip(keys, values)])
        overrides = common + point + [f"run_name={run_name}"]
        load_config(base, overrides)
        runs.append(SweepRun(run_name, overrides))
    return Sweep(base=base, name=name, runs=runs)


def train_command(base: Path, overrides: list[str]) -> list[str]:
    return ["olmoe", "train", str(base), *overrides]


def write_slurm_array(sweep: Sweep, dst: Path, launcher: str = "launch/slurm.sbatch") -> Path:
    """Write a SLURM array script whose task i runs the i-th sweep point through `launcher`."""
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{len(sweep.runs) - 1}",
        "set -euo pipefail",
        "RUNS=(",
    ]
    for run in sweep.runs:
        lines.append("  " + shlex.quote(" ".join(shlex.quote(o) for o in run.overrides)))
    lines += [
        ")",
        'read -r -a OVERRIDES <<< "${RUNS[$SLURM_ARRAY_TASK_ID]}"',
        f'exec bash {launcher} {shlex.quote(str(sweep.base))} "${{OVERRIDES[@]}}"',
        "",
    ]
    dst.write_text("\n".join(lines))
    dst.chmod(0o755)
    return dst


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", type=Path, help="sweep YAML file")
    parser.add_argument("--dry-run", action="store_true", help="print one command per run and exit")
    parser.add_argument(
        "--slurm",
        type=Path,
        default=None,
        help="write a SLURM array script here instead of running",
    )


def run(args: argparse.Namespace) -> int:
    try:
        sweep = load_sweep(args.sweep)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for item in sweep.runs:
            print(shlex.join(train_command(sweep.base, item.overrides)))
        return 0
    if args.slurm is not None:
        write_slurm_array(sweep, args.slurm)
        log.info("wrote %s with %d array tasks", args.slurm, len(sweep.runs))
        return 0
    for i, item in enumerate(sweep.runs):
        log.info("sweep run %d/%d: %s", i + 1, len(sweep.runs), item.name)
        command = [sys.executable, "-m", "olmoe.cli", "train", str(sweep.base), *item.overrides]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            log.error("run %s failed with exit code %d", item.name, result.returncode)
            return result.returncode
    return 0
