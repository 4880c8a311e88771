"""The processes a training run spans: the launcher's ranks, each rank's device, the process group's setup and
teardown, and FSDP2 sharding. Pretraining and fine-tuning both run inside `process_group`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from baichuan.config import ConfigError


@dataclass(frozen=True)
class Ranks:
    world: int
    rank: int
    local_rank: int


def launcher_ranks() -> Ranks:
    """This process's place in the job, from the variables torchrun (or deepspeed) sets; one process without."""
    env = os.environ
    return Ranks(int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")))


def training_device(name: str, local_rank: int) -> torch.device:
    """`--device` resolved for this rank: "auto" is the GPU where there is one; a bare "cuda" is this rank's."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def process_group(device: torch.device, world: int, deepspeed: bool) -> Iterator[None]:
    """The job's process group for the duration of the block: gloo on CPU, nccl on GPU. Under a launcher
    (world > 1) it joins the launcher's rendezvous; DeepSpeed on one process gets a group of one.

    Teardown: after a clean finish every rank meets at a barrier before the group is destroyed, so no rank
    tears down its side while another is still in a collective (a gloo teardown without it has been seen to
    hang at exit under torch 2.4). After an error the group is left alone: the other ranks may be blocked in
    a collective that will never complete, destroying now could wait on them forever, and the launcher ends
    them all anyway."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend)
            created = True
        elif deepspeed:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even without a launcher
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            created = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        yield
    except BaseException:
        if created and world == 1:
            dist.destroy_process_group()
        raise
    if created:
        if world > 1:
            dist.barrier()
        dist.destroy_process_group()


def public_fsdp2() -> bool:
    """Whether this torch has the public `torch.distributed.fsdp.fully_shard` (2.6+), the cut that runs on CPU."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard_fsdp2(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each decoder layer a unit, then the rest of the model."""
    if device.type == "cpu" and not public_fsdp2():
        # torch 2.4's FSDP2 creates CUDA streams even for CPU modules (tested: it fails on CPU); 2.14 runs it on
        # CPU (tested).
        raise ConfigError(
            f"--strategy fsdp: this torch ({torch.__version__}) cannot run FSDP2 on CPU (it needs CUDA there); "
            "use --strategy ddp, or a newer torch"
        )
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6: the same FSDP2 under its private name (GPU only, see above)
        from torch.distributed._composable.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
