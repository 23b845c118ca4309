"""Process-group set-up from torchrun's environment: NCCL on GPUs, gloo on CPU.

rank, world = init_distributed()     # (0, 1) without torchrun
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Join the torchrun process group when there is one; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # With GPUs, CPU tensors (the data pipeline's step agreement, counters) still go over gloo.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


_waits = 0


def wait_for_rank0(what: str, timeout_s: int) -> None:
    """Rank 0 calls this when it has done `what` alone (loading, writing an export); the other ranks
    wait on the rendezvous store until then, not inside a collective, whose watchdog would kill a
    rank waiting longer than its timeout. Every rank must call it the same number of times."""
    global _waits
    if not dist.is_initialized():
        return
    _waits += 1
    key = f"mmloom/rank0/{_waits}"
    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, what)
    else:
        try:
            store.wait([key], timedelta(seconds=timeout_s))
        except RuntimeError as e:  # the store's timeout error
            raise TimeoutError(
                f"rank 0 did not finish {what} within train.dist_timeout_s={timeout_s} s; "
                f"raise it for slow filesystems"
            ) from e


def setup_logging(rank: int) -> None:
    """One format for every rank, the rank in every line; rank 0 at INFO, the others at WARNING."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, on every rank (just [obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown(ok: bool = True) -> None:
    """Leave the process group: after a barrier when all went well, at once after an error (the
    other ranks may never reach the barrier)."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
