"""Process-group set-up for one training rank, launched by torchrun, Ray Train, or nothing at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from align.engine.host_memory import fix_mmap_threshold
from align.engine.op_locks import use_owned_batons
from align.ports import free_port


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def configure_environment(threads: int | None = None) -> None:
    """Environment DeepSpeed reads at import and initialisation; call before importing deepspeed.

    A process started without a launcher gets a world of one (without RANK and friends DeepSpeed
    falls back to MPI discovery). Compiled ops are cached under the align cache so they build once
    per machine, and the rank's thread count follows its CPU share: several ranks each using every
    core run many times slower.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if threads is not None:
        threads = max(1, int(threads))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def init_distributed(threads: int | None = None) -> Rank:
    """Join (or create) the process group: NCCL on GPUs, gloo on CPU. Safe to call twice.

    A rank on the CPU also fixes glibc's mmap threshold (:func:`align.engine.host_memory.fix_mmap_threshold`)
    before it loads a model, so that what each step frees leaves its resident set."""
    configure_environment(threads)
    if not torch.cuda.is_available():
        fix_mmap_threshold()
    use_owned_batons()  # DeepSpeed compiles its CPU communication op here
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized() and os.environ.get("WORLD_SIZE") == "1":
        # A world of one needs no rendezvous: an in-memory store, so that no port is bound and two stages
        # started at once on one machine cannot collide on MASTER_PORT.
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    # Also wraps a process group that a launcher (Ray Train, torchrun) already created.
    deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Rank(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_from_main(obj):
    """The main rank's ``obj`` on every rank (any picklable object; identity in a world of one)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (identity in a world of one)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.cuda.is_available():
            tensor = tensor.cuda()
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()
