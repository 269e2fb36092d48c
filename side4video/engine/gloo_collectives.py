"""ZeRO's all-gather and reduce-scatter on gloo without gloo's whole-buffer copies.

gloo's `all_gather_into_tensor` gathers into a buffer of its own and copies it into the output,
and its `reduce_scatter_tensor` reduces a copy of the whole input: each holds one more buffer of
the gathered (or reduced) size while it runs (+1.00 x the output, +1.00 x the input, measured
through DeepSpeed's entry points by tests/engine/test_gloo_collectives.py). ZeRO-3 gathers a block
or a bucket of parameters and reduce-scatters its gradient bucket at every step, so on CPU hosts
every process peaked that much higher than the same step needs on NCCL, which works in place.
gloo's `all_reduce` works in place, so both are written here as one in-place all-reduce (twice the
bytes on the wire, no extra memory) and installed as the functions DeepSpeed's torch backend
calls. NCCL is left alone. (ViT-E, bench vite: 0.12 GiB less peak on 1 rank, 0.10 GiB on each
of 2.)
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


class _Done:
    """A finished collective, for callers that asked for async_op and will wait on it."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    """Every rank's `input_tensor` into its slot of `output_tensor`, bit for bit.

    Each rank writes its part into an otherwise zeroed output and the bytes are summed: a byte
    plus zeros is the same byte, so the result is exact (-0.0 and NaN payloads included), which
    a float sum would not be. The input may be this rank's slot of the output (ZeRO-3's gathers).
    """
    rank = torch_dist.get_rank(group)
    part = input_tensor.numel()
    flat = output_tensor.view(-1)
    # ZeRO-3 passes as input this rank's slot of the output itself: zero only the other slots
    flat[: rank * part].zero_()
    flat[(rank + 1) * part :].zero_()
    flat[rank * part : (rank + 1) * part].copy_(input_tensor.reshape(-1))
    return torch_dist.all_reduce(flat.view(torch.uint8), group=group, async_op=async_op)


def reduce_scatter_tensor(output_tensor, input_tensor, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
    """This rank's slice of the reduced `input_tensor` into `output_tensor`.

    Reduces `input_tensor` in place: ZeRO passes its gradient bucket (or a concatenated copy of
    it), which it discards after the call.
    """
    rank = torch_dist.get_rank(group)
    part = output_tensor.numel()
    flat = input_tensor.view(-1)
    torch_dist.all_reduce(flat, op=op, group=group)
    output_tensor.view(-1).copy_(flat[rank * part : (rank + 1) * part])
    return _Done() if async_op else None


def install_for_gloo() -> bool:
    """Route DeepSpeed's all-gather and reduce-scatter through the above when the process group
    is gloo. True when installed."""
    if not torch_dist.is_initialized() or torch_dist.get_backend() != "gloo":
        return False
    from deepspeed.comm import comm as deepspeed_comm

    backend = deepspeed_comm.cdb
    backend.all_gather_function = all_gather_into_tensor
    backend.reduce_scatter_function = reduce_scatter_tensor
    return True
