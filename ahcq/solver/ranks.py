"""One run across several processes started by ``torchrun``: which rank this is, and the few collectives
the pipeline needs (torch.distributed: gloo on CPU, nccl on GPUs).

Work that is per image (preparing the feature cache, evaluation) is split across ranks by position
(rank r takes items r, r + N, ...) and gathered back in the original order, so every gathered result is the
single-process one. Reconstruction is data-parallel: each rank trains on its share of the calibration
images, gradients averaged every step (``average``), so every rank holds the same parameters. A rank that
dies ends the run: ``torchrun`` stops the others and reports the failed rank; a rank left waiting in a
collective gives up after ``AHCQ_DIST_TIMEOUT_S`` seconds (default 1800).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["SINGLE", "Ranks", "init_ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` (``world == 1``: no process group, every call is local)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 owns the run folder and writes ``results.json``."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def unshard(self, parts: Sequence[Sequence[T]]) -> list[T]:
        """The original order of items split by ``shard`` (``parts`` by rank)."""
        total = sum(len(p) for p in parts)
        return [parts[i % self.world][i // self.world] for i in range(total)]

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace every tensor by its mean over the ranks, in place, in one all-reduce (the gradients of a
        data-parallel step)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Ranks()


def init_ranks(device: str) -> Ranks:
    """The ranks of this run: ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``), a process group on first
    use (gloo, or nccl with ``--device cuda``, each rank on GPU ``LOCAL_RANK``), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=float(os.environ.get("AHCQ_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Ranks(rank, world)
