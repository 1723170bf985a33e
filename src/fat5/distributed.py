"""Multi-process training under ``torchrun``: process group, DDP / FSDP2 wrapping, collectives, state dicts.

``torchrun --nproc_per_node N -m fat5 pretrain ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous in the environment; ``init_distributed`` joins them (NCCL on CUDA, gloo on
CPU) and picks each process's device. Without those variables it is a no-op (one process).

Parallelism is applied from outside the model (``wrap_model``):

* ``ddp``: ``DistributedDataParallel``: full replicas, gradients all-reduced (averaged) during backward.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every encoder/decoder block, then on the
  whole model: parameters, gradients and optimizer states sharded across ranks (for models that do not fit
  on one device). Checkpoints gather full state dicts to rank 0 (``full_model_state`` /
  ``full_optimizer_state``), so a run saved under FSDP resumes under DDP or on one process and vice versa.

Each rank reads its own share of the data (rank/world_size go to the data iterator); rank 0 logs and
writes checkpoints. Limits: no tensor or pipeline parallelism; FSDP on CPU (gloo) is for testing only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
        if d.index is None:
            d = torch.device(f"cuda:{local_rank}")
    return d


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; returns this process's rank and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, timeout=timedelta(minutes=30), device_id=dev if dev.type == "cuda" else None
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    """End of a multi-process run. Every rank finishes its last collective (and rank 0 its checkpoint), the
    group is destroyed, and then no rank leaves before every rank has destroyed it: a rank whose peer exits
    while it still tears gloo down can hang there (seen in CI: one rank left waiting after the final barrier),
    and without the destroy a rank aborts when its peer's sockets close under gloo's threads. The last step
    meets through the rendezvous store torchrun started (``MASTER_ADDR`` / ``MASTER_PORT``), which outlives
    the group; under other launchers it is skipped."""
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    store = None
    # only torchrun's own store outlives the group (a store started by rank 0 itself goes with its group)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(minutes=2),
            wait_for_workers=False,
        )
    dist.destroy_process_group()
    if store is not None:
        prefix = f"fat5_shutdown/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
        prefix += f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(f"{prefix}{rank}", "1")
        store.wait([f"{prefix}{r}" for r in range(world)])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process); the tensor stays on its device (no host sync)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), as a list indexed by rank; on one process ``[obj]``."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp") -> nn.Module:
    """The module to run forward/backward through. FSDP shards ``model`` in place (and returns it)."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from .model import Block

        for m in model.modules():
            if isinstance(m, Block):
                fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}; valid choices: ddp, fsdp")


def no_sync(engine: nn.Module, skip_sync: bool):
    """Context for a micro-batch that is not the last of its step: skip the gradient all-reduce (DDP)."""
    import contextlib

    if skip_sync and hasattr(engine, "no_sync"):
        return engine.no_sync()
    if skip_sync and hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    if hasattr(engine, "set_requires_gradient_sync"):
        engine.set_requires_gradient_sync(True)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full, CPU state dict of ``model`` (gathered from shards under FSDP; every rank must call it)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
