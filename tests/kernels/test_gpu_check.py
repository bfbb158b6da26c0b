"""The GPU check script's CPU path: argument parsing and a --dry-run at tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_gpu_check_usage_without_arguments():
    result = run_script()
    assert result.returncode == 2
    assert "Usage: benchmarks/gpu_check.sh OUT_DIR" in result.stdout


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    result = run_script(str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = ["environment", "correctness", "grouped_gemm", "moe_layer", "decoder_block"]
    for section in sections:
        assert isinstance(report[section], dict), f"{section}: {report[section]}"
    assert report["correctness"]["passed"] is True
    assert report["environment"]["dry_run"] is True
    assert report["correctness"]["fp32/skewed/grouped_mm_gate_up"]["empty_groups"] > 0
    assert isinstance(report["moe_layer"]["ms"]["triton"], float)
    assert report["decoder_block"]["tokens_per_s"] > 0
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0
