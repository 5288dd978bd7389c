"""Collective communication for data-parallel training, with a single-process stand-in of the same interface.

Launch with `torchrun --nproc_per_node N sae-kit train ...` (or any launcher setting RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT): NCCL on CUDA, gloo on CPU. The loop calls the same methods either way.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


class SingleProcess:
    """World of one: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes shared files."""
        return self.rank == 0

    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        """Average tensors in place over ranks."""

    def all_reduce_max_(self, tensor: Tensor) -> None:
        """Element-wise max in place over ranks."""

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's object on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank."""



class TorchDistributed(SingleProcess):
    """torch.distributed process group: gloo on CPU, NCCL on CUDA."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        if device.type == "cuda" and device.index is not None:
            # NCCL's barrier and object broadcasts run on the current device, and pinned host memory is made in its
            # context: without this every rank of a node would use GPU 0.
            torch.cuda.set_device(device)
        # The group is left up when training ends: a process may train again (re-initialising after a destroy
        # hangs under torchrun), and tearing it down after an error could block on a peer; exit cleans it up.
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        if not tensors:
            return
        # One flat buffer: one collective per step instead of one per parameter.
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_reduce_max_(self, tensor: Tensor) -> None:
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)

    def broadcast_object(self, obj: object) -> object:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.dist.barrier()


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> SingleProcess:
    """A process group when launched with several ranks (or one already exists), else the stand-in."""
    import torch.distributed as dist

    if launched_world_size() > 1 or (dist.is_available() and dist.is_initialized()):
        comm = TorchDistributed(device)
        if comm.world_size > 1:
            return comm
    return SingleProcess()
