"""Data-parallel training over several processes: the standard launchers, no framework inside the loop.

``torchrun --nproc-per-node N -m mmprm_infer.cli train ...`` (or ``accelerate launch --num-processes N -m
mmprm_infer.cli train ...``, which sets the same variables) starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``Distributed.from_environment()`` joins them in one
process group (NCCL on GPUs, Gloo on CPUs).  Every process holds the whole model and draws the same seeded
batch order; each runs its share of an optimizer step's micro-batches (``share``: micro-batch i goes to
process i mod N), and ``all_reduce_gradients`` sums the gradients, so every process takes the optimizer step
the one-process run takes (``tests/test_train_distributed.py`` checks the weights match).  Process 0 writes
the logs, resume points and the final checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Distributed"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object created the process group (and destroys it in close)

    @classmethod
    def from_environment(cls) -> Distributed:
        """One process (no launcher), or this process's place in the launcher's group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist  # torch: heavy, loaded where used

        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        owns = False
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            owns = True
        return cls(rank, world, local, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """Each process's GPU: plain ``cuda`` means ``cuda:LOCAL_RANK``."""
        return f"cuda:{self.local_rank}" if self.world_size > 1 and device == "cuda" else device

    def share(self, micro_batches: Sequence) -> list:
        return list(micro_batches[self.rank::self.world_size])

    def all_reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes (one flat buffer, one call)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist  # torch: heavy, loaded where used

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist  # torch: heavy, loaded where used

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist  # torch: heavy, loaded where used

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist  # torch: heavy, loaded where used

            dist.destroy_process_group()
            self.owns_group = False
