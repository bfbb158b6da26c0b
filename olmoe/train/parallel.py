"""Apply expert parallelism and FSDP2 to an `OlmoeModel`, and move ep-independent full
state dicts in and out of the parallel model.

Meshes, for W = world size and ep = expert-parallel size (ep divides W and E):
    world  (W,)         "dp": every rank; shards the non-expert parameters.
    expert (W/ep, ep)   "edp" x "ep": rank = edp_rank * ep + ep_rank, so an EP group is
                        ep consecutive ranks. "ep" splits the experts, and "edp" (expert
                        data parallel) shards the experts among the W/ep ranks that hold
                        the same experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from olmoe.model.config import ConfigError
from olmoe.moe.layer import SwiGLUExperts
from olmoe.train.expert_parallel import ExpertParallelExperts, apply_expert_parallel

logger = logging.getLogger(__name__)


@dataclass
class ParallelMeshes:
    """The device meshes of one run; see the module docstring for the layout."""

    world: DeviceMesh
    """1-D mesh "dp" over all ranks."""
    expert: DeviceMesh | None
    """2-D mesh ("edp", "ep"), or None when ep == 1."""

    @property
    def ep(self) -> int:
        return 1 if self.expert is None else self.expert["ep"].size()


def build_meshes(ep: int, device_type: str | None = None) -> ParallelMeshes:
    """Build the world and expert meshes from the initialized default process group."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"parallelism.ep={ep!r} is invalid: must be a positive integer")
    world_size = dist.get_world_size()
    if world_size % ep != 0:
        raise ConfigError(
            f"parallelism.ep={ep} is invalid: must divide the world size {world_size}"
        )
    device_type = device_type or _default_device_type()
    world = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    expert = None
    if ep > 1:
        expert = init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("edp", "ep"))
    return ParallelMeshes(world=world, expert=expert)


def _default_device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def apply_fsdp(
    model: nn.Module,
    meshes: ParallelMeshes,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard `model` with FSDP2: one unit per expert module, per block, and the root.

    Non-expert parameters are sharded over all W ranks, and their gradients averaged
    over all W ranks as in plain data parallelism. Expert parameters (already split over
    "ep" by `apply_expert_parallel`) are sharded over "edp".

    Expert gradient scale: data parallelism trains on the mean of the W per-rank losses,
    L = (1/W) * sum_s loss_s. Rank s's tokens reach the experts of every EP rank through
    the all-to-all, so after backward an expert rank has the sum over the sources s in its
    EP group of d loss_s / dW. The "edp" reduce-scatter averages over the W/ep ranks that
    hold the same experts, which gives (ep/W) * sum over all s = ep * dL/dW. A hook on
    each expert unit therefore divides the reduced gradient by ep.

    On a backend whose reduce-scatter sums where FSDP2 asks it to average (gloo in
    torch 2.7.0), the hooks also apply the missing division by the mesh size.
    """
    ep = meshes.ep
    mp_policy = mp_policy or MixedPrecisionPolicy()
    # True where the backend sums on ReduceOp.AVG, so the hooks must also divide by the mesh size.
    sums_on_avg = _reduce_scatter_sums_on_avg(model, meshes, mp_policy)
    world_size = meshes.world.size()
    for block in model.layers:
        experts = block.mlp.experts
        if isinstance(experts, ExpertParallelExperts):
            edp_mesh = meshes.expert["edp"]
            fully_shard(
                experts,
                mesh=edp_mesh,
                mp_policy=mp_policy,
                reshard_after_forward=reshard_after_forward,
                shard_placement_fn=_expert_placement_fn(experts, edp_mesh.size()),
            )
            divisor = ep * (edp_mesh.size() if sums_on_avg else 1)
            experts.set_all_reduce_hook(_DivideGradient(divisor))
        fully_shard(
            block,
            mesh=meshes.world,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
        if sums_on_avg:
            block.set_all_reduce_hook(_DivideGradient(world_size))
    # The root unit contains the embedding, final norm and LM head. Its parameters are needed
    # right at the start of backward, so keeping them unsharded after forward saves a gather.
    fully_shard(model, mesh=meshes.world, mp_policy=mp_policy, reshard_after_forward=False)
    if sums_on_avg:
        model.set_all_reduce_hook(_DivideGradient(world_size))


def _reduce_scatter_sums_on_avg(
    model: nn.Module, meshes: ParallelMeshes, mp_policy: MixedPrecisionPolicy
) -> bool:
    """Return True if FSDP2's gradient reduce-scatter will sum where it means to average.

    FSDP2 (torch 2.7) reduce-scatters fp32 and bf16 gradients with ReduceOp.AVG, and
    fp16 ones with SUM and explicit divisions. Gloo's `reduce_scatter_tensor` in torch
    2.7.0 accepts AVG but sums; a one-element probe finds out, so a backend that does
    average (NCCL) gets no extra division.
    """
    param_dtype = next(model.parameters()).dtype
    reduce_dtype = mp_policy.reduce_dtype or mp_policy.param_dtype or param_dtype
    if reduce_dtype not in (torch.float32, torch.bfloat16):
        return False
    world_size = meshes.world.size()
    if world_size == 1:
        return False
    device = _mesh_device(meshes.world)
    probe = torch.ones(world_size, device=device)
    averaged = torch.empty(1, device=device)
    dist.reduce_scatter_tensor(
        averaged, probe, op=dist.ReduceOp.AVG, group=meshes.world.get_group()
    )
    # NOTE: host sync, once at setup.
    result = averaged.item()
    if result == world_size:
        logger.info(
            "the %s reduce-scatter sums on ReduceOp.AVG; dividing FSDP gradients explicitly",
            dist.get_backend(meshes.world.get_group()),
        )
        return True
    if result != 1.0:
        raise RuntimeError(
            f"reduce-scatter with ReduceOp.AVG of ones over {world_size} ranks returned "
            f"{result}; expected 1.0 (average) or {world_size} (sum)"
        )
    return False


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(
        mesh.device_type, torch.get_device_module(mesh.device_type).current_device()
    )


class _DivideGradient:
    """FSDP2 all-reduce hook that divides the reduced gradient shard in place."""

    def __init__(self, divisor: int):
        self.divisor = divisor

    def __call__(self, reduced_grad: torch.Tensor) -> None:
        if self.divisor != 1:
            reduced_grad.div_(self.divisor)


def _expert_placement_fn(experts: ExpertParallelExperts, edp: int):
    # FSDP2 can stack its Shard(0) on the EP Shard(0) only when L = E / ep splits evenly
    # over "edp"; otherwise shard the d_model dim, which FSDP2 also needs to split evenly.
    L = experts.num_local_experts
    if L % edp == 0:
        return lambda param: Shard(0)
    d_model = experts.gate_up_weight.shape[1]
    if d_model % edp != 0:
        raise ConfigError(
            f"parallelism.ep={experts.ep_mesh.size()} is invalid: FSDP needs the "
            f"{L} local experts or d_model={d_model} to split evenly over the {edp} ranks "
            "holding the same experts; choose an ep with E / ep divisible by world / ep"
        )
    # gate_up_weight is (L, D, 2H) and down_weight is (L, H, D): shard the D dim of each.
    return lambda param: Shard(1) if param.shape[1] == d_model else Shard(2)


def parallelize(
    model: nn.Module,
    ep: int = 1,
    fsdp: bool = True,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    device_type: str | None = None,
) -> nn.Module:
    """Apply expert parallelism over `ep` ranks, then FSDP2, to `model` in place.

    Needs an initialized process group when `fsdp` is set; `ep` must divide the world size
    and `model.config.moe.num_experts`, else `ConfigError`. Every rank must build `model`
    with the same weights. With `fsdp=False` and `ep=1` the model is returned unchanged for
    the caller's DDP. Expert parallelism without FSDP raises `ConfigError` because the
    non-expert gradients would then need a data-parallel wrapper that leaves the expert
    parameters alone.
    """
    _check_ep(ep, model.config.moe.num_experts)
    if ep > 1 and not fsdp:
        raise ConfigError(
            f"parallelism.ep={ep} is invalid without FSDP: set parallelism.fsdp=true or ep=1"
        )
    if not fsdp:
        # Plain data parallelism (DDP, applied by the caller) needs nothing here.
        return model
    meshes = build_meshes(ep, device_type)
    if ep > 1:
        apply_expert_parallel(model, meshes.expert["ep"])
    apply_fsdp(model, meshes, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


def _check_ep(ep: int, num_experts: int) -> None:
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"parallelism.ep={ep!r} is invalid: must be a positive integer")
    if num_experts % ep != 0:
        raise ConfigError(
            f"parallelism.ep={ep} is invalid: must divide moe.num_experts={num_experts}"
        )


# Full state dicts -------------------------------------------------------------------------


def gather_full_state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank0_only: bool = False,
) -> dict:
    """Gather the full, ep-independent model (and optimizer) state onto the CPU.

    Returns `{"model": ..., "global_expert_ids": ..., "optimizer": ...}`. "model" has the
    keys and full shapes of the plain model, experts (E, ...) in global expert order, so
    it loads into an unparallelized `OlmoeModel`. "global_expert_ids" maps each expert
    module to the global id of each row of its full tensors (0..E-1). "optimizer" (only
    with `optimizer`) keys per-parameter state by parameter name, with full tensors.
    With `rank0_only`, ranks other than 0 get empty "model" and "optimizer" dicts, which
    saves their memory. Every rank must call this: it runs collectives over all ranks.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = {"model": _to_cpu(get_model_state_dict(model, options=options))}
    state["global_expert_ids"] = {
        name: list(range(module.num_experts)) for name, module in _expert_modules(model).items()
    }
    if optimizer is not None:
        state["optimizer"] = _to_cpu(get_optimizer_state_dict(model, optimizer, options=options))
    return state


def load_full_state_dict(
    model: nn.Module,
    state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    from_rank0: bool = False,
) -> None:
    """Load a state from `gather_full_state_dict` into `model` at its current ep.

    Each rank keeps the rows of its own expert and FSDP shards. Without `from_rank0` every
    rank passes the full state; with it only rank 0's `state` is read and broadcast, and
    the other ranks may pass `{}`. A "global_expert_ids" record that does not list
    experts 0..E-1 of the model raises `ValueError`. Every rank must call this.
    """
    is_source = not from_rank0 or dist.get_rank() == 0
    model_state = {}
    if is_source:
        _check_expert_ids(model, state.get("global_expert_ids", {}))
        # The setters below replace entries of the dicts they get, so hand them copies.
        model_state = _copy_containers(state["model"])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0, strict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is None:
        return
    optimizer_state = {}
    if is_source:
        if "optimizer" not in state:
            raise KeyError(
                "the state has no 'optimizer' entry; gather it with gather_full_state_dict(model, "
                "optimizer) or load without an optimizer"
            )
        optimizer_state = _copy_containers(state["optimizer"])
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (SwiGLUExperts, ExpertParallelExperts))
    }


def _check_expert_ids(model: nn.Module, global_expert_ids: dict[str, list[int]]) -> None:
    """Check that each recorded expert module lists experts 0..E-1 of the model's E."""
    modules = _expert_modules(model)
    for name, ids in global_expert_ids.items():
        if name not in modules:
            raise ValueError(f"the state lists experts for {name!r}, which the model lacks")
        expected = list(range(modules[name].num_experts))
        if list(ids) != expected:
            raise ValueError(
                f"the state's global_expert_ids for {name!r} are {list(ids)}, expected "
                f"{expected}: the checkpoint has a different number or order of experts"
            )


def _copy_containers(state):
    """Copy the nested dicts and lists of a state dict; the tensors are shared, not copied."""
    if isinstance(state, dict):
        return {key: _copy_containers(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_copy_containers(value) for value in state]
    return state


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_to_cpu(value) for value in state]
    return state
