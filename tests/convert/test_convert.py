import json

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from olmoe.cli import main as olmoe_main
from olmoe.convert import ConversionError, config_from_hf, from_hf, to_hf
from olmoe.model.io import load_pretrained, save_pretrained
from tests.helpers import tiny_model


def test_round_trip_bitwise():
    model = tiny_model().eval()
    back = from_hf(to_hf(model)).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_hf_to_ours_to_hf_logits():
    torch.manual_seed(3)
    hf_config = OlmoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    hf_model = OlmoeForCausalLM(hf_config).eval()
    ours = from_hf(hf_model).eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert (ours(ids).logits - hf_model(ids).logits).abs().max() < 1e-5
        again = to_hf(ours)
        assert torch.equal(again(ids).logits, hf_model(ids).logits)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("hidden_act", "gelu"),
        ("attention_bias", True),
    ],
)
def test_unsupported_hf_fields(field, value):
    hf_config = OlmoeConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    setattr(hf_config, field, value)
    with pytest.raises(ConversionError, match=field):
        config_from_hf(hf_config)


def test_capacity_model_not_exported():
    model = tiny_model(capacity_factor=1.0)
    with pytest.raises(ConversionError, match="capacity_factor=1.0"):
        to_hf(model)


def test_cli_round_trip(tmp_path):
    model = tiny_model().eval()
    save_pretrained(model, tmp_path / "ours")
    assert olmoe_main(["convert", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "olmoe"
    assert (
        olmoe_main(["convert", "--to", "olmoe", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    )
    back = load_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_cli_refuses_existing_destination(tmp_path):
    save_pretrained(tiny_model(), tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        olmoe_main(["convert", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "keep.txt").read_text() == "user data"


def test_load_rejects_hf_directory(tmp_path):
    to_hf(tiny_model()).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="not an olmoe config"):
        load_pretrained(tmp_path / "hf")
