"""Weight sync over a collective (rollout.weight_sync: collective): learner rank 0 broadcasts the student to
the rollout engines in a few large buckets, in the engines' dtype, each tied tensor once.

Learner rank 0 (group rank 0) and every rollout engine (ranks 1..n) join one process group of their own,
built from a TCPStore and independent of the learners' DeepSpeed group: gloo on CPU, NCCL on GPU. The
layout (names, shapes, dtype, buckets) is fixed when the group forms, so a sync sends only tensor data.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

BUCKET_BYTES = 256 * 2**20  # few, large messages; also bounds the receiver's staging buffer
TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Layout:
    """What a sync sends: tensors in this order, cut into buckets [start, stop) of the name list."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # the engines' dtype, e.g. 'float32' or 'bfloat16'
    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        """Back from dataclasses.asdict (tuples may arrive as lists through an RPC)."""
        return cls(tuple(d["names"]), tuple(tuple(x) for x in d["shapes"]), d["dtype"],
                   tuple(tuple(x) for x in d["buckets"]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes) * self.torch_dtype.itemsize


def layout_of(named: list[tuple[str, torch.Size]], dtype: str, bucket_bytes: int = BUCKET_BYTES) -> Layout:
    """The layout of `named` (name, shape) pairs, e.g. a module's named_parameters(), which lists a tied
    weight once."""
    size = getattr(torch, dtype).itemsize
    buckets, start, filled = [], 0, 0
    for i, (_, shape) in enumerate(named):
        n = math.prod(shape) * size
        if filled and filled + n > bucket_bytes:
            buckets.append((start, i))
            start, filled = i, 0
        filled += n
    if named:
        buckets.append((start, len(named)))
    return Layout(tuple(n for n, _ in named), tuple(tuple(s) for _, s in named), dtype, tuple(buckets))


def join(host: str, port: int, rank: int, world_size: int, device: torch.device):
    """This process's handle on the sync group (blocks until all `world_size` members have joined)."""
    store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
    if device.type == "cuda":
        return torch.distributed.ProcessGroupNCCL(store, rank, world_size)
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def send(group, tensors: list[torch.Tensor], layout: Layout) -> None:
    """Rank 0: broadcast `tensors` (in layout order) bucket by bucket."""
    for start, stop in layout.buckets:
        flat = torch.cat([t.detach().reshape(-1).to(layout.torch_dtype) for t in tensors[start:stop]])
        group.broadcast(flat, 0).wait()


def receive(group, layout: Layout, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks 1..n: (name, tensor) pairs as the buckets arrive; each tensor is a view of its bucket."""
    for start, stop in layout.buckets:
        sizes = [math.prod(s) for s in layout.shapes[start:stop]]
        flat = torch.empty(sum(sizes), dtype=layout.torch_dtype, device=device)
        group.broadcast(flat, 0).wait()
        for name, shape, part in zip(layout.names[start:stop], layout.shapes[start:stop], flat.split(sizes)):
            yield name, part.view(shape)

