"""The main job end to end at a small size: prepare, train, export, generate, analyze."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from olmoe.analysis.export import load_exports
from olmoe.cli import main as olmoe_main
from olmoe.train.checkpoint import load_model_from_checkpoint
from tests.data.helpers import release_streaming_shm, shm_names

REPO = Path(__file__).resolve().parents[1]


def demo_args(data: Path, run_dir: Path, steps: int = 40) -> list[str]:
    """`olmoe demo` arguments for a small model on a subset of the built-in corpus."""
    return [
        "--data", str(data),
        "--max-bytes-per-domain", "150000",
        "--vocab-size", "512",
        "--analysis-tokens", "1000",
        f"run_dir={run_dir}",
        "model.vocab_size=512",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.max_seq_len=64",
        "model.moe.num_experts=8",
        "model.moe.top_k=2",
        "model.moe.expert_hidden=64",
        "data.seq_len=64",
        "data.num_workers=0",
        "global_batch_size=8",
        "device_microbatch_size=8",
        f"max_duration={steps}ba",
        f"eval_interval={steps // 2}ba",
        f"checkpoint.save_interval={steps // 2}ba",
        "scheduler.warmup=5ba",
        "logging.routing_stats_interval=10",
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _release_shared_memory(tmp_path):
    before = shm_names()
    yield
    release_streaming_shm(tmp_path, before)


def test_demo_pipeline_small(tmp_path, capsys):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    assert olmoe_main(["demo", *demo_args(data, run_dir)]) == 0
    out = capsys.readouterr().out

    # Validation loss falls, overall and in every domain.
    history = [json.loads(x) for x in (run_dir / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 20, 40]
    val_counts = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    domains = [name for name, counts in val_counts.items() if counts["samples"] > 0]
    assert len(domains) >= 2
    for key in ["CrossEntropy"] + [f"CrossEntropy/{d}" for d in domains]:
        assert history[-1]["metrics"][key] < history[0]["metrics"][key] - 0.3, key
    assert "validation loss, step 0 -> step 40" in out

    # The HF export computes the same logits as the checkpoint and generates text.
    from transformers import OlmoeForCausalLM

    ours, _ = load_model_from_checkpoint(run_dir)
    hf_model = OlmoeForCausalLM.from_pretrained(str(run_dir / "hf")).eval()
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert (ours(ids).logits - hf_model(ids).logits).abs().max() < 1e-4
    assert "greedy continuations" in out
    assert (run_dir / "hf" / "tokenizer.json").is_file()

    # The analysis covers both saved checkpoints and wrote its figures and report.
    exports = load_exports(run_dir / "analysis" / "exports")
    assert [e.step for e in exports] == [20, 40]
    assert exports[-1].num_layers == 2
    for name in (
        "domain_specialization",
        "coactivation",
        "router_saturation",
        "vocabulary_specialization",
        "expert_load",
    ):
        assert (run_dir / "analysis" / f"{name}.png").stat().st_size > 1000
    assert "Router saturation" in (run_dir / "analysis" / "report.txt").read_text()


def _run_demo(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "olmoe.cli", "demo", *args]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_demo_resumes_after_kill(tmp_path):
    data = tmp_path / "data"
    straight_run, killed_run = tmp_path / "straight", tmp_path / "killed"
    straight = _run_demo(demo_args(data, straight_run))
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out[-3000:]

    # Kill the second run once its first checkpoint is on disk, then run it again.
    victim = _run_demo(demo_args(data, killed_run))
    checkpoint = killed_run / "checkpoints" / "ep0-ba20-rank0.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists()
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not (killed_run / "hf").exists()

    again = _run_demo(demo_args(data, killed_run))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert "Found latest checkpoint" in out or "autoresume" in out.lower()

    def final_losses(run_dir: Path) -> dict:
        lines = (run_dir / "eval_history.jsonl").read_text().splitlines()
        return {json.loads(x)["step"]: json.loads(x)["metrics"] for x in lines}

    straight_losses, resumed_losses = final_losses(straight_run), final_losses(killed_run)
    assert resumed_losses[40] == straight_losses[40]
