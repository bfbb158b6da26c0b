"""`olmoe sweep` without --dry-run: the grid's runs train one after another."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from olmoe.train.config import load_config
from olmoe.train.sweep import run as run_sweep
from tests.train.conftest import tiny_overrides


def write_sweep(tmp_path, token_data, grid: str):
    # A partial base config; run_dir keeps its default, runs/<run_name>, under tmp_path.
    overrides = [o for o in tiny_overrides(token_data, "unused") if not o.startswith("run_")]
    base = tmp_path / "base.yaml"
    base.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(overrides + ["max_duration=2ba"])))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {base}\nname: s\ngrid:\n{grid}")
    return sweep


def test_sweep_runs_each_point_in_turn(token_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = write_sweep(tmp_path, token_data, "  optimizer.lr: [0.01, 0.001]\n")
    assert run_sweep(argparse.Namespace(sweep=sweep, dry_run=False, slurm=None)) == 0
    for name, lr in [("s-lr0.01", 0.01), ("s-lr0.001", 0.001)]:
        saved = load_config(tmp_path / "runs" / name / "config.yaml")
        assert saved.optimizer.lr == lr
        assert saved.run_name == name
        assert (tmp_path / "runs" / name / "checkpoints" / "latest-rank0.pt").exists()


def test_sweep_stops_at_the_first_failed_run(token_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-data"
    sweep = write_sweep(tmp_path, token_data, f"  data.local: [{missing}, {token_data}]\n")
    assert run_sweep(argparse.Namespace(sweep=sweep, dry_run=False, slurm=None)) == 2
    # The second point, whose data exists, would have saved a checkpoint had it run.
    assert not list(tmp_path.glob("runs/*/checkpoints/*.pt"))
