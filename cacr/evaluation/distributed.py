"""Exact sharding of evaluation rows across DDP ranks and the gather that reassembles them.

``N`` rows (captions, pairs, work items) are split into ``W`` contiguous blocks whose
sizes differ by at most one: rank ``r`` owns ``[r*N // W, (r+1)*N // W)``. Every row is
owned by exactly one rank and nothing is padded or duplicated, unlike a
``DistributedSampler``, which repeats rows to even out the ranks and so biases metrics.
After scoring its block, each rank contributes a tensor of its own length; the gather
concatenates the blocks in rank order, which is the original row order.

Everything works without an initialised process group (one process, world size 1). The
rank helpers themselves are in :mod:`cacr.distributed`.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from cacr.distributed import is_distributed, rank_and_world_size  # noqa: F401 (re-exported)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)


def shard_bounds(n: int, world_size: int, rank: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s block of ``n`` rows."""
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_bounds: need n >= 0, world_size >= 1, 0 <= rank < world_size; "
                         f"got n={n}, world_size={world_size}, rank={rank}")
    return rank * n // world_size, (rank + 1) * n // world_size


def shard_range(n: int, group=None) -> range:
    """The rows this process owns (all ``n`` of them without a process group)."""
    rank, world = rank_and_world_size(group)
    return range(*shard_bounds(n, world, rank))


def _comm_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(local: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``local`` (variable first dimension, equal trailing shape
    and dtype) along dim 0 in rank order; returned on every rank, on ``local``'s device."""
    if not is_distributed():
        return local
    if not 1 <= local.dim() <= 8:
        raise ValueError(f"all_gather_rows: expected a tensor of 1 to 8 dimensions, got shape {tuple(local.shape)}")
    rank, world = rank_and_world_size(group)
    device = _comm_device(group)
    dtype_code = _DTYPES.index(local.dtype) if local.dtype in _DTYPES else -1
    if dtype_code < 0:
        raise ValueError(f"all_gather_rows: unsupported dtype {local.dtype}; use one of {_DTYPES}")
    meta = [local.shape[0], dtype_code, local.dim()] + list(local.shape[1:]) + [0] * (8 - local.dim())
    meta = torch.tensor(meta, dtype=torch.long, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    for r, m in enumerate(metas):
        if not torch.equal(m[1:], meta[1:]):
            raise ValueError(
                f"all_gather_rows: rank {r} holds {_DTYPES[int(m[1])]} rows of shape {m[3:2 + int(m[2])].tolist()}, "
                f"rank {rank} {local.dtype} rows of shape {list(local.shape[1:])}; they must agree"
            )
    sizes = [int(m[0]) for m in metas]
    longest = max(sizes)
    if longest == 0:
        return local
    padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)]).to(local.device)


def gather_shards(local: Tensor, n: int, group=None) -> Tensor:
    """Reassemble ``n`` rows sharded by :func:`shard_range`; checks that every rank
    contributed exactly its block."""
    rank, world = rank_and_world_size(group)
    start, stop = shard_bounds(n, world, rank)
    if local.shape[0] != stop - start:
        raise ValueError(f"gather_shards: rank {rank} owns rows [{start}, {stop}) but holds {local.shape[0]}")
    out = all_gather_rows(local, group)
    if out.shape[0] != n:
        raise ValueError(f"gather_shards: gathered {out.shape[0]} rows, expected {n}")
    return out


def all_gather_objects(obj: Any, group=None) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * rank_and_world_size(group)[1]
    dist.all_gather_object(out, obj, group=group)
    return out
