"""Expert parallelism + FSDP2 on gloo CPU ranks against one process on the whole batch.

The reference runs the concatenated batch of all ranks (W * B sequences) in one process.
The loss is token-mean cross-entropy on random targets. Every rank has the same number
of tokens, so the reference loss equals the mean of the per-rank losses, which is what
data-parallel training optimizes. Its gradients must match the gathered FSDP gradients.
The load-balancing loss is left out because it is not linear in the batch: the mean of
per-rank values differs from its value on the whole batch.

Tolerance: fp32 throughout. The parallel run sums in a different order (per-rank
matmuls, reduce-scatter), which moves results by about 1e-9 here; 1e-5 leaves room
while still catching a wrong scale (ep or W times) or a misrouted row.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from olmoe.model.config import ConfigError
from olmoe.moe.backend import get_backend
from olmoe.moe.layer import SwiGLUExperts
from olmoe.moe.router import RouterOutput, TopKRouter, select_top_k
from olmoe.train.expert_parallel import ExpertParallelExperts, local_expert_positions
from olmoe.train.parallel import gather_full_state_dict, parallelize
from tests.helpers import tiny_model
from tests.train._dist import run_distributed

ATOL = 1e-5
BATCH, SEQ = 2, 8
LR = 0.5
TIMEOUT_S = 180.0
EXPERT_WEIGHTS = ("gate_up_weight", "down_weight")


class BiasedRouter(torch.nn.Module):
    """A top-k router that adds a fixed per-expert bias to the logits, to force traffic.

    It keeps the wrapped router's `weight` parameter, so state-dict keys do not change.
    """

    def __init__(self, router: TopKRouter, logit_bias: list[float]):
        super().__init__()
        self.top_k = router.top_k
        self.weight = router.weight
        self.register_buffer("logit_bias", torch.tensor(logit_bias), persistent=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight) + self.logit_bias
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        expert_probs, expert_indices = select_top_k(probs, self.top_k)
        return RouterOutput(logits, probs, expert_indices, expert_probs, expert_probs)


def build_model(num_experts: int, logit_bias: list[float] | None, seed: int = 0):
    model = tiny_model(seed, num_experts=num_experts, top_k=2, backend="torch")
    if logit_bias is not None:
        for block in model.layers:
            block.mlp.router = BiasedRouter(block.mlp.router, logit_bias)
    return model


def make_batches(world_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (W, B, S) input ids and targets; rank r trains on index r."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 128, (world_size, BATCH, SEQ), generator=generator)
    targets = torch.randint(0, 128, (world_size, BATCH, SEQ), generator=generator)
    return inputs, targets


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual - expected).abs().max().item() if actual.numel() else 0.0


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    return grads


# --- worker, run on every rank ------------------------------------------------------------


def record_group_sizes(records: list, module, args, output) -> None:
    records.append(args[1].clone())


def train_step_on_rank(scenarios: list[dict]) -> list[dict]:
    """One forward, backward and SGD step per scenario; returns what the parent compares."""
    rank = dist.get_rank()
    results = []
    for scenario in scenarios:
        inputs, targets = scenario["batches"]
        model = build_model(scenario["num_experts"], scenario["logit_bias"])
        parallelize(model, ep=scenario["ep"])

        # Record the per-expert row counts each expert module is given on this rank.
        group_sizes: list[torch.Tensor] = []
        for module in model.modules():
            if isinstance(module, ExpertParallelExperts):
                module.register_forward_hook(partial(record_group_sizes, group_sizes))

        loss = cross_entropy(model(inputs[rank]).logits, targets[rank])
        loss.backward()
        grads = full_grads(model)
        torch.optim.SGD(model.parameters(), lr=LR).step()
        results.append(
            {
                "loss": loss.item(),
                "grads": grads,
                "params": gather_full_state_dict(model)["model"],
                "group_sizes": group_sizes,
                "global_expert_ids": [
                    m.global_expert_ids
                    for m in model.modules()
                    if isinstance(m, ExpertParallelExperts)
                ],
            }
        )
    return results


def reject_ep_then_train_on_rank(scenarios: list[dict]) -> tuple[str, list[dict]]:
    """Try ep=2 on this world (which it does not divide), then run `train_step_on_rank`."""
    try:
        parallelize(build_model(6, None), ep=2)
        message = "no error"
    except ConfigError as error:
        message = str(error)
    return message, train_step_on_rank(scenarios)


def experts_module_on_rank(cases: list[dict]) -> list[dict]:
    """Run `ExpertParallelExperts` alone (no FSDP) on this rank's rows of each case."""
    rank = dist.get_rank()
    ep_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    backend = get_backend("torch", torch.device("cpu"))
    results = []
    for case in cases:
        module = ExpertParallelExperts(build_experts(), ep_mesh)
        routed_input = case["inputs"][rank].clone().requires_grad_(True)
        routed_output = module(routed_input, case["group_sizes"][rank], backend)
        (routed_output * case["output_weights"][rank]).sum().backward()
        results.append(
            {
                "output": routed_output.detach(),
                "input_grad": routed_input.grad,
                "weight_grads": {
                    key: getattr(module, key).grad.full_tensor() for key in EXPERT_WEIGHTS
                },
            }
        )
    return results


def two_rank_tasks(scenarios: list[dict], module_cases: list[dict]) -> tuple[list, list]:
    return train_step_on_rank(scenarios), experts_module_on_rank(module_cases)


def build_experts() -> SwiGLUExperts:
    torch.manual_seed(0)
    experts = SwiGLUExperts(num_experts=4, d_model=8, hidden=4)
    torch.nn.init.normal_(experts.gate_up_weight)
    torch.nn.init.normal_(experts.down_weight)
    return experts


def make_module_case(group_sizes: list[list[int]], seed: int) -> dict:
    """Random rows for each rank's per-expert counts `group_sizes` (ranks x E)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [torch.tensor(row, dtype=torch.int64) for row in group_sizes]
    inputs = [torch.randn(int(row.sum()), 8, generator=generator) for row in sizes]
    weights = [torch.randn(int(row.sum()), 8, generator=generator) for row in sizes]
    return {"group_sizes": sizes, "inputs": inputs, "output_weights": weights}


def reference_step(scenario: dict, world_size: int) -> dict:
    inputs, targets = scenario["batches"]
    model = build_model(scenario["num_experts"], scenario["logit_bias"])
    # shape: (W * B, S, V)
    logits = model(inputs.flatten(0, 1)).logits
    per_rank_logits = logits.view(world_size, BATCH, SEQ, -1)
    losses = [cross_entropy(per_rank_logits[r], targets[r]).item() for r in range(world_size)]
    cross_entropy(logits, targets.flatten(0, 1)).backward()
    grads = full_grads(model)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {"losses": losses, "grads": grads, "params": model.state_dict()}


def check_against_reference(results: list[list[dict]], scenarios: list[dict]) -> None:
    world_size = len(results)
    for index, scenario in enumerate(scenarios):
        name = scenario["name"]
        reference = reference_step(scenario, world_size)
        for rank in range(world_size):
            result = results[rank][index]
            assert result["loss"] == pytest.approx(reference["losses"][rank], abs=ATOL), (
                f"{name}: loss of rank {rank}"
            )
            for key, expected in reference["grads"].items():
                error = max_abs_error(result["grads"][key], expected)
                assert error <= ATOL, f"{name}: rank {rank} gradient of {key} off by {error:.3g}"
            for key, expected in reference["params"].items():
                error = max_abs_error(result["params"][key], expected)
                assert error <= ATOL, f"{name}: rank {rank} {key} after SGD off by {error:.3g}"


def check_experts_module(results: list[list[dict]], cases: list[dict]) -> None:
    """Compare with the full `SwiGLUExperts` run on each rank's rows in one process."""
    backend = get_backend("torch", torch.device("cpu"))
    for index, case in enumerate(cases):
        experts = build_experts()
        total_loss = 0.0
        expected_outputs, inputs = [], []
        for rank, group_sizes in enumerate(case["group_sizes"]):
            routed_input = case["inputs"][rank].clone().requires_grad_(True)
            routed_output = experts(routed_input, group_sizes, backend)
            total_loss = total_loss + (routed_output * case["output_weights"][rank]).sum()
            expected_outputs.append(routed_output.detach())
            inputs.append(routed_input)
        total_loss.backward()
        for rank, rank_results in enumerate(results):
            result = rank_results[index]
            what = f"case {index} rank {rank}"
            assert result["output"].shape == expected_outputs[rank].shape, what
            output_error = max_abs_error(result["output"], expected_outputs[rank])
            assert output_error <= ATOL, f"{what}: output off by {output_error:.3g}"
            grad_error = max_abs_error(result["input_grad"], inputs[rank].grad)
            assert grad_error <= ATOL, f"{what}: input gradient off by {grad_error:.3g}"
            for key in EXPERT_WEIGHTS:
                expected = getattr(experts, key).grad
                error = max_abs_error(result["weight_grads"][key], expected)
                assert error <= ATOL, f"{what}: {key} gradient off by {error:.3g}"
        # Expert 1 gets no rows in case 0, so its gradient is exactly zero.
        for key in EXPERT_WEIGHTS:
            grad = results[0][0]["weight_grads"][key][1]
            assert torch.equal(grad, torch.zeros_like(grad)), f"{key} of the empty expert 1"


def rows_sent(results: list[list[dict]], index: int, num_experts: int, ep: int) -> torch.Tensor:
    """(layers, source rank, destination EP rank) rows sent, from the recorded group sizes."""
    per_rank = []
    for rank_results in results:
        sizes = torch.stack(rank_results[index]["group_sizes"])
        per_rank.append(sizes.view(-1, ep, num_experts // ep).sum(-1))
    return torch.stack(per_rank, dim=1)


# --- tests --------------------------------------------------------------------------------


def test_local_expert_positions_match_loop():
    generator = torch.Generator().manual_seed(0)
    cases = [
        torch.tensor([[3, 1]]),
        torch.tensor([[2, 0], [1, 3]]),
        torch.tensor([[0, 0], [0, 0]]),
        torch.tensor([[0, 4, 1], [2, 0, 0], [1, 1, 5]]),
        torch.randint(0, 4, (4, 2), generator=generator),
    ]
    for recv_counts in cases:
        ep, L = recv_counts.shape
        # Slow reference: label each received row with (expert, source, index), then sort.
        labels = []
        for source in range(ep):
            for expert in range(L):
                for i in range(int(recv_counts[source, expert])):
                    labels.append((expert, source, i))
        by_expert = sorted(range(len(labels)), key=lambda row: labels[row])
        expected = torch.empty(len(labels), dtype=torch.int64)
        for position, row in enumerate(by_expert):
            expected[row] = position
        positions = local_expert_positions(recv_counts)
        assert torch.equal(positions, expected), f"recv_counts={recv_counts.tolist()}"


def test_parallelize_rejects_bad_ep():
    model = tiny_model(0, num_experts=4, top_k=2, backend="torch")
    with pytest.raises(ConfigError, match=r"parallelism\.ep=3 .*moe\.num_experts=4"):
        parallelize(model, ep=3)
    with pytest.raises(ConfigError, match=r"parallelism\.ep=0 .*positive integer"):
        parallelize(model, ep=0)
    with pytest.raises(ConfigError, match=r"parallelism\.ep=2 .*without FSDP"):
        parallelize(model, ep=2, fsdp=False)


@pytest.mark.slow
def test_two_ranks_match_one_process():
    world_size = 2
    scenarios = [
        {"name": "ep=2 random routing", "ep": 2, "num_experts": 4, "logit_bias": None},
        # All tokens of both ranks go to experts 2 and 3 on rank 1: rank 0 receives nothing.
        {"name": "ep=2 all to rank 1", "ep": 2, "num_experts": 4, "logit_bias": [-30, -30, 0, 0]},
        {"name": "ep=1 FSDP only", "ep": 1, "num_experts": 4, "logit_bias": None},
    ]
    for seed, scenario in enumerate(scenarios):
        scenario["batches"] = make_batches(world_size, seed)
    module_cases = [
        # Rank 1 sends no rows at all; rank 0 sends to both ranks and skips expert 1.
        make_module_case([[3, 0, 2, 1], [0, 0, 0, 0]], seed=0),
        # Each rank sends only to the other one.
        make_module_case([[0, 0, 2, 3], [1, 4, 0, 0]], seed=1),
    ]
    outputs = run_distributed(
        two_rank_tasks, world_size, args=(scenarios, module_cases), timeout_s=TIMEOUT_S
    )
    results = [train_results for train_results, _ in outputs]
    check_against_reference(results, scenarios)
    check_experts_module([module_results for _, module_results in outputs], module_cases)

    assert results[0][0]["global_expert_ids"] == [(0, 1), (0, 1)]
    assert results[1][0]["global_expert_ids"] == [(2, 3), (2, 3)]

    sent = rows_sent(results, 1, num_experts=4, ep=2)
    rows_per_rank = BATCH * SEQ * 2
    assert torch.all(sent[:, :, 0] == 0), "some rows went to rank 0 despite the bias"
    assert torch.all(sent[:, :, 1] == rows_per_rank), "rank 1 did not get every row"
    # Experts 0 and 1 saw no rows, so their gradients are exactly zero.
    for rank in range(world_size):
        for key, grad in results[rank][1]["grads"].items():
            if "experts" in key:
                assert torch.equal(grad[:2], torch.zeros_like(grad[:2])), f"{key} of rank {rank}"


@pytest.mark.slow
def test_three_ranks_ep_equals_world():
    # ep=2 must divide the world size 3, so parallelize rejects it before any collective.
    world_size = 3
    scenarios = [
        {"name": "ep=3 random routing", "ep": 3, "num_experts": 6, "logit_bias": None},
        # Rank 1 (experts 2, 3) receives nothing, rank 0 (expert 0 only) a few rows, and
        # rank 2 (experts 4 and 5, favored) the most.
        {
            "name": "ep=3 asymmetric",
            "ep": 3,
            "num_experts": 6,
            "logit_bias": [0, -30, -30, -30, 0.2, 0.2],
        },
    ]
    for seed, scenario in enumerate(scenarios):
        scenario["batches"] = make_batches(world_size, seed)
    outputs = run_distributed(
        reject_ep_then_train_on_rank, world_size, args=(scenarios,), timeout_s=TIMEOUT_S
    )
    for message, _ in outputs:
        assert "parallelism.ep=2" in message
        assert "world size 3" in message
    results = [rank_results for _, rank_results in outputs]
    check_against_reference(results, scenarios)

    sent = rows_sent(results, 1, num_experts=6, ep=3)
    received = sent.sum(1)
    assert torch.all(received[:, 1] == 0), "rank 1 received rows despite the bias"
    assert torch.all(received[:, 0] > 0)
    assert torch.all(received[:, 2] > received[:, 0]), f"received per rank: {received.tolist()}"


@pytest.mark.slow
def test_four_ranks_expert_data_parallel():
    # ep=2 of W=4: each expert is held by 2 ranks, so FSDP also shards and averages the
    # experts over that "edp" pair. E=4 shards local experts (dim 0); E=2 has one local
    # expert per rank, so FSDP shards the d_model dim instead.
    world_size = 4
    scenarios = [
        {"name": "W=4 ep=2 E=4", "ep": 2, "num_experts": 4, "logit_bias": None},
        {"name": "W=4 ep=2 E=2", "ep": 2, "num_experts": 2, "logit_bias": None},
    ]
    for seed, scenario in enumerate(scenarios):
        scenario["batches"] = make_batches(world_size, seed)
    results = run_distributed(
        train_step_on_rank, world_size, args=(scenarios,), timeout_s=TIMEOUT_S
    )
    check_against_reference(results, scenarios)
    assert [r[0]["global_expert_ids"][0] for r in results] == [(0, 1), (2, 3), (0, 1), (2, 3)]
