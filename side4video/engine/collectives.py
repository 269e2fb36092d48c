"""The few collective helpers the loops need, safe to call in a single process too."""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if is_distributed() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool) -> List[bool]:
    """For each flag: is it true on any rank? One all-reduce for all of them."""
    values = torch.tensor([float(f) for f in flags], device=_device())
    if is_distributed():
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def all_gather_objects(obj: Any) -> List[Any]:
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def max_over_ranks(*values: int) -> List[int]:
    """For each integer: its largest value over all ranks. One all-reduce for all of them."""
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_device())
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]
