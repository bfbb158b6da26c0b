"""The training config schema: YAML + overrides, and errors that name the key."""

import pytest

from olmoe.model.config import ConfigError
from olmoe.train.config import load_config, to_yaml
from olmoe.train.sweep import load_sweep, train_command, write_slurm_array


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge(tmp_path):
    path = _write(tmp_path, "run_name: a\nmodel:\n  d_model: 128\n  n_heads: 4\n")
    config = load_config(path, ["optimizer.lr=1e-3", "model.moe.top_k=2"])
    assert config.run_name == "a"
    assert config.model.d_model == 128
    assert config.optimizer.lr == 1e-3
    assert config.model.moe.top_k == 2
    assert config.run_dir == "runs/a"


def test_unknown_key_names_path_and_allowed(tmp_path):
    path = _write(tmp_path, "model:\n  d_modle: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.d_modle" in message
    assert "d_model" in message


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="optimizer.learning_rate.*allowed keys.*'lr'"):
        load_config(None, ["optimizer.learning_rate=1e-3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="model.n_layers"):
        load_config(None, ["model.n_layers=many"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optimizer.lr"])


def test_ep_must_divide_experts():
    with pytest.raises(ConfigError, match="parallelism.ep=3.*num_experts=64"):
        load_config(None, ["parallelism.ep=3"])


def test_ep_must_divide_world():
    config = load_config(None, ["parallelism.ep=4"])
    with pytest.raises(ConfigError, match="parallelism.ep=4.*world size 6"):
        config.check_world(6)


def test_bad_duration():
    with pytest.raises(ConfigError, match="max_duration='ten'"):
        load_config(None, ["max_duration=ten"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    demo = load_config("configs/demo.yaml")
    assert demo.model.moe.num_experts >= 2
    big = load_config("configs/olmoe-1b-7b.yaml")
    counts = big.model.num_params()
    assert 6.9e9 < counts["total"] < 7.0e9
    assert big.model.moe.top_k == 8
    assert big.optimizer.betas == [0.9, 0.95]
    assert "d_model: 2048" in to_yaml(big)


def test_sweep_expands_grid(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "base: configs/demo.yaml\nname: s\noverrides: [max_duration=5ba]\n"
        "grid:\n  optimizer.lr: [0.001, 0.0003]\n  model.moe.top_k: [1, 2]\n"
    )
    sweep = load_sweep(sweep_file)
    names = [run.name for run in sweep.runs]
    assert names == [
        "s-lr0.001-top_k1",
        "s-lr0.001-top_k2",
        "s-lr0.0003-top_k1",
        "s-lr0.0003-top_k2",
    ]
    command = train_command(sweep.base, sweep.runs[1].overrides)
    assert command[:3] == ["olmoe", "train", "configs/demo.yaml"]
    assert "model.moe.top_k=2" in command
    assert "run_name=s-lr0.001-top_k2" in command
    script = write_slurm_array(sweep, tmp_path / "array.sbatch").read_text()
    assert "--array=0-3" in script


def test_sweep_rejects_bad_grid_value(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("base: configs/demo.yaml\ngrid:\n  model.moe.top_k: [1, 99]\n")
    with pytest.raises(ConfigError, match="moe.top_k=99"):
        load_sweep(sweep_file)
