"""Full and sharded checkpoints of an expert-parallel model are independent of ep.

Expert e of layer l contains the constant e + 10 * l in both weights and in both AdamW
moments, so any expert that lands in the wrong row or layer shows up as a wrong value.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from olmoe.model import OlmoeModel
from olmoe.moe.layer import SwiGLUExperts
from olmoe.train.expert_parallel import ExpertParallelExperts
from olmoe.train.parallel import gather_full_state_dict, load_full_state_dict, parallelize
from tests.helpers import tiny_config, tiny_model
from tests.train._dist import run_distributed

E = 4
WORLD_SIZE = 2
TIMEOUT_S = 180.0
EXPERT_KEYS = ("gate_up_weight", "down_weight")
MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_value(layer: int, expert: int) -> float:
    return expert + 10.0 * layer


def build_model(seed: int) -> OlmoeModel:
    return tiny_model(seed, num_experts=E, top_k=2, backend="torch")


def fill_experts(model: OlmoeModel) -> None:
    """Set every weight of global expert e in layer l to `expert_value(l, e)`."""
    with torch.no_grad():
        for layer, block in enumerate(model.layers):
            for key in EXPERT_KEYS:
                weight = getattr(block.mlp.experts, key)
                for expert in range(E):
                    weight[expert] = expert_value(layer, expert)


def adamw_with_state(model: OlmoeModel) -> torch.optim.AdamW:
    """An AdamW whose moments equal the parameters (lr 0 keeps the parameters as they are)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    ids = torch.arange(16).view(2, 8)
    model(ids).logits.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        for param in model.parameters():
            for moment in MOMENTS:
                local = optimizer.state[param][moment]
                local = local.to_local() if isinstance(local, DTensor) else local
                source = param.to_local() if isinstance(param, DTensor) else param
                local.copy_(source)
    return optimizer


def local_expert_rows(model: OlmoeModel, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per layer: this rank's global expert ids and its local rows of each expert tensor."""
    rows = []
    for block in model.layers:
        experts = block.mlp.experts
        entry = {}
        if isinstance(experts, ExpertParallelExperts):
            entry["global_expert_ids"] = list(experts.global_expert_ids)
        for key in EXPERT_KEYS:
            param = getattr(experts, key)
            entry[key] = param.to_local().clone()
            for moment in MOMENTS:
                entry[f"{key}.{moment}"] = optimizer.state[param][moment].to_local().clone()
        rows.append(entry)
    return rows


# --- worker, run on every rank ------------------------------------------------------------


def save_and_reload_on_rank(checkpoint_dir: str) -> dict:
    rank = dist.get_rank()
    results = {}

    # Save at ep=2: fill the full model, then shard it.
    model = build_model(seed=0)
    fill_experts(model)
    parallelize(model, ep=2)
    optimizer = adamw_with_state(model)
    saved = gather_full_state_dict(model, optimizer)
    results["saved"] = saved
    dcp.save(
        {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        },
        checkpoint_id=checkpoint_dir,
    )

    # Reload the full state at ep=2 and at ep=1 into fresh, differently seeded models;
    # the ep=2 load reads rank 0's state only.
    for ep, from_rank0 in ((2, True), (1, False)):
        model = build_model(seed=1)
        parallelize(model, ep=ep)
        optimizer = adamw_with_state(model)
        state = saved if rank == 0 or not from_rank0 else {}
        load_full_state_dict(model, state, optimizer, from_rank0=from_rank0)
        results[f"full ep={ep}"] = {
            "local": local_expert_rows(model, optimizer),
            "gathered": gather_full_state_dict(model, optimizer),
        }

    # Reload the sharded (torch.distributed.checkpoint) save at ep=1.
    model = build_model(seed=1)
    parallelize(model, ep=1)
    optimizer = adamw_with_state(model)
    sharded = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(sharded, checkpoint_id=checkpoint_dir)
    set_model_state_dict(model, sharded["model"])
    set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
    results["sharded ep=1"] = {"gathered": gather_full_state_dict(model, optimizer)}
    return results


# --- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    checkpoint_dir = tmp_path_factory.mktemp("ep_checkpoint")
    return run_distributed(
        save_and_reload_on_rank, WORLD_SIZE, args=(str(checkpoint_dir),), timeout_s=TIMEOUT_S
    )


def assert_expert_rows(tensor: torch.Tensor, layer: int, expert_ids: list[int], what: str):
    assert tensor.shape[0] == len(expert_ids), f"{what}: shape {tuple(tensor.shape)}"
    for row, expert in enumerate(expert_ids):
        expected = torch.full_like(tensor[row], expert_value(layer, expert))
        assert torch.equal(tensor[row], expected), f"{what}: row {row} is not expert {expert}"


def assert_states_equal(actual, expected, what: str) -> None:
    """Compare nested state dicts exactly. Tuples equal lists: the optimizer state-dict
    round trip in torch 2.7 turns AdamW's `betas` tuple into a list."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{what}: {type(actual).__name__} is not a dict"
        assert actual.keys() == expected.keys(), f"{what}: keys differ"
        for key, value in expected.items():
            assert_states_equal(actual[key], value, f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{what}: {actual!r} is not a sequence"
        assert len(actual) == len(expected), f"{what}: length {len(actual)} != {len(expected)}"
        for index, (item, expected_item) in enumerate(zip(actual, expected)):
            assert_states_equal(item, expected_item, f"{what}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{what} differs"
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


@pytest.mark.slow
def test_gathered_state_has_every_expert(rank_results):
    for rank, results in enumerate(rank_results):
        saved = results["saved"]
        num_layers = tiny_config().n_layers
        for layer in range(num_layers):
            module = f"layers.{layer}.mlp.experts"
            assert saved["global_expert_ids"][module] == list(range(E))
            for key in EXPERT_KEYS:
                weight = saved["model"][f"{module}.{key}"]
                assert_expert_rows(weight, layer, list(range(E)), f"rank {rank} {module}.{key}")
                assert torch.unique(weight).numel() == E, f"{module}.{key}: experts not distinct"
                for moment in MOMENTS:
                    value = saved["optimizer"]["state"][f"{module}.{key}"][moment]
                    what = f"rank {rank} {module}.{key} {moment}"
                    assert_expert_rows(value, layer, list(range(E)), what)
    assert_states_equal(rank_results[1]["saved"], rank_results[0]["saved"], "rank 1 vs rank 0")


@pytest.mark.slow
def test_gathered_state_loads_into_plain_model(rank_results):
    saved = rank_results[0]["saved"]
    model = OlmoeModel(tiny_config(num_experts=E, top_k=2))
    model.load_state_dict(saved["model"], strict=True)
    for layer, block in enumerate(model.layers):
        assert isinstance(block.mlp.experts, SwiGLUExperts)
        for key in EXPERT_KEYS:
            weight = getattr(block.mlp.experts, key).detach()
            assert_expert_rows(weight, layer, list(range(E)), f"plain layer {layer} {key}")


@pytest.mark.slow
def test_reload_at_ep2_places_experts(rank_results):
    for rank, results in enumerate(rank_results):
        local = results["full ep=2"]["local"]
        for layer, entry in enumerate(local):
            assert entry["global_expert_ids"] == [2 * rank, 2 * rank + 1]
            for key, tensor in entry.items():
                if key == "global_expert_ids":
                    continue
                what = f"ep=2 rank {rank} layer {layer} {key}"
                assert_expert_rows(tensor, layer, entry["global_expert_ids"], what)
        gathered = results["full ep=2"]["gathered"]
        assert_states_equal(gathered, results["saved"], f"ep=2 rank {rank} round trip")


@pytest.mark.slow
def test_reload_at_ep1_places_experts(rank_results):
    for rank, results in enumerate(rank_results):
        # Without expert parallelism, FSDP shards the (E, ...) tensors on dim 0 over the
        # 2 ranks: rank r stores experts 2r and 2r + 1.
        local = results["full ep=1"]["local"]
        for layer, entry in enumerate(local):
            assert "global_expert_ids" not in entry
            for key, tensor in entry.items():
                what = f"ep=1 rank {rank} layer {layer} {key}"
                assert_expert_rows(tensor, layer, [2 * rank, 2 * rank + 1], what)
        gathered = results["full ep=1"]["gathered"]
        assert_states_equal(gathered, results["saved"], f"ep=1 rank {rank} round trip")


@pytest.mark.slow
def test_sharded_checkpoint_reloads_at_other_ep(rank_results):
    for rank, results in enumerate(rank_results):
        gathered = results["sharded ep=1"]["gathered"]
        assert_states_equal(gathered, results["saved"], f"sharded ep=2 -> ep=1 rank {rank}")


def test_load_rejects_wrong_expert_ids():
    model = build_model(seed=0)
    state = {
        "model": model.state_dict(),
        "global_expert_ids": {"layers.0.mlp.experts": [0, 1, 2, 3, 4, 5]},
    }
    with pytest.raises(ValueError, match=r"global_expert_ids for 'layers\.0\.mlp\.experts'"):
        load_full_state_dict(model, state)
