"""The Composer training loop on one process: losses, resumption, errors, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from olmoe.cli import main as olmoe_main
from olmoe.model.config import ConfigError
from olmoe.train.callbacks import NonFiniteLossError
from olmoe.train.checkpoint import load_model_from_checkpoint
from olmoe.train.config import load_config
from olmoe.train.trainer import build_trainer
from tests.train.conftest import tiny_overrides


class Recorder(Callback):
    """Losses and the first token of every sample, step by step."""

    def __init__(self):
        self.losses: list[float] = []
        self.batches: list[list[int]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(state.total_loss_dict["loss/train/total"])
        self.batches.append(state.batch["input_ids"][:, 0].tolist())


def _fit(config, recorder: Callback, duration: str | None = None):
    trainer = build_trainer(config)
    trainer.state.callbacks.append(recorder)
    trainer.fit(duration=duration) if duration else trainer.fit()
    trainer.close()
    return trainer


def test_loss_decreases_and_files_written(token_data, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, tiny_overrides(token_data, run_dir, max_duration="12ba"))
    recorder = Recorder()
    _fit(config, recorder)
    assert len(recorder.losses) == 12
    assert all(math.isfinite(x) for x in recorder.losses)
    assert sum(recorder.losses[-3:]) < sum(recorder.losses[:3])
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").model.d_model == 32
    history = [
        json.loads(line) for line in (run_dir / "eval_history.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    assert set(history[0]["metrics"]) == {"CrossEntropy", "CrossEntropy/alpha", "CrossEntropy/beta"}
    assert history[-1]["metrics"]["CrossEntropy"] < history[0]["metrics"]["CrossEntropy"]
    assert (run_dir / "checkpoints" / "latest-rank0.pt").exists()


def test_resumption_is_bitwise(token_data, tmp_path):
    straight = Recorder()
    config = load_config(None, tiny_overrides(token_data, tmp_path / "straight"))
    _fit(config, straight)

    first = Recorder()
    resumed_dir = tmp_path / "resumed"
    config = load_config(None, tiny_overrides(token_data, resumed_dir, max_duration="3ba"))
    _fit(config, first)
    second = Recorder()
    config = load_config(None, tiny_overrides(token_data, resumed_dir))
    _fit(config, second)

    assert first.losses + second.losses == straight.losses
    assert first.batches + second.batches == straight.batches


def test_non_finite_loss_stops_and_keeps_checkpoint(token_data, tmp_path):
    class Poison(Callback):
        def batch_end(self, state: State, logger: Logger) -> None:
            if int(state.timestamp.batch) == 4:
                with torch.no_grad():
                    state.model.model.lm_head.weight.fill_(float("nan"))

    run_dir = tmp_path / "run"
    config = load_config(None, tiny_overrides(token_data, run_dir))
    trainer = build_trainer(config)
    trainer.state.callbacks.append(Poison())
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit()
    trainer.close()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert checkpoints == ["ep0-ba3-rank0.pt"]
    model, _ = load_model_from_checkpoint(run_dir / "checkpoints" / checkpoints[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_modle=64", "unknown key 'model.d_modle'"),
        ("model.n_layers=two", "model.n_layers"),
        ("parallelism.ep=3", "parallelism.ep=3"),
        ("data.seq_len=32", "seq_len=16, but the data config asks for seq_len=32"),
    ],
    ids=["unknown-key", "wrong-type", "ep-divides-experts", "seq-len-vs-shards"],
)
def test_bad_config_fails_before_training(token_data, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    args = ["train", "configs/demo.yaml", *tiny_overrides(token_data, run_dir), override]
    if override == "data.seq_len=32":
        args.append("model.max_seq_len=32")
    assert olmoe_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "checkpoints").exists()


def test_print_config(token_data, tmp_path, capsys):
    args = ["train", "configs/demo.yaml", "--print-config", "optimizer.lr=0.5"]
    assert olmoe_main(args) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out
    assert "run_dir: runs/demo" in out


def test_export_matches_hf_logits(token_data, tmp_path):
    from transformers import OlmoeForCausalLM

    run_dir = tmp_path / "run"
    config = load_config(None, tiny_overrides(token_data, run_dir, max_duration="3ba"))
    _fit(config, Recorder())
    hf_dir = tmp_path / "hf"
    assert olmoe_main(["export", str(run_dir), str(hf_dir)]) == 0
    ours, _ = load_model_from_checkpoint(run_dir)
    hf_model = OlmoeForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert (ours(ids).logits - hf_model(ids).logits).abs().max() < 1e-4


def test_config_error_type():
    with pytest.raises(ConfigError):
        load_config(None, ["global_batch_size=0"])
