"""Every kernel config compiles for Hopper (sm_90) on the CPU, through Triton's CUDA backend.

The interpreter tests check the numbers but never lower the kernels, so this test runs
`benchmarks/gpu_compile_check.py` in a fresh process without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kernels.autotune import (
    HOPPER_SHARED_MEMORY_BYTES,
    combine_configs,
    grouped_mm_configs,
    grouped_mm_weight_grad_configs,
    row_gather_configs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_all_configs_compile_for_sm90_bf16(monkeypatch):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    script = REPO_ROOT / "benchmarks" / "gpu_compile_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--dtypes", "bf16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]

    counts = {}
    for record in records:
        counts[record["kernel"]] = counts.get(record["kernel"], 0) + 1
    # The config functions read TRITON_INTERPRET when called, so this lists the GPU configs.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert counts == {
        "grouped_mm": len(grouped_mm_configs()),
        "grouped_mm_weight_grad": len(grouped_mm_weight_grad_configs()),
        "gather_rows": len(row_gather_configs()),
        "combine": len(combine_configs()),
        "unpermute_backward": len(row_gather_configs()),
    }

    for record in records:
        label = f"{record['kernel']} {record['config']}"
        assert record["cubin_bytes"] > 0, label
        assert record["shared_bytes"] <= HOPPER_SHARED_MEMORY_BYTES, label
        if record["kernel"].startswith("grouped_mm"):
            assert record["wgmma"], f"{label} did not lower to wgmma"
            assert record["pipelined"], f"{label} loads are not software-pipelined"
