"""Memory-saving autograd machinery of the side network (model/side.py): what lets its layers keep
less for backward with forward values and gradients unchanged bit for bit.

Why it exists: the side network trains on every tapped block of a frozen backbone, so its
activations are most of a step's memory. Plain autograd keeps, per side block, the stream, each
norm's output beside its input, the depthwise conv's output beside its input, fp32 copies of
half-precision norm inputs and the MLP's 4d-wide hidden layer twice. Here:

- `recompute_in_backward`: a tensor cheap to compute again (a norm's output, the depthwise conv's
  output, an fp32 copy) is rebuilt in backward from tensors kept anyway, instead of being saved;
- `LayerNormFp32`, `ChannelLastBatchNorm`: norms computed in fp32 whatever the precision, whose
  fp32 copy of a half-precision input is rebuilt that way (`lean`);
- `statistics_frozen`, `checkpoint_once`: a recomputation (checkpoint's, or a rebuilt norm output)
  gives the forward's output again without a second update of BatchNorm's running statistics.

About 60% less kept per side block than plain autograd.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _Rebuild:
    """What autograd keeps instead of a tensor: how to compute it again, and the view it saved."""

    def __init__(self, recipe: Callable[[], torch.Tensor], saved: torch.Tensor):
        self.recipe = recipe
        self.view = (saved.size(), saved.stride(), saved.storage_offset())

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.recipe().as_strided(*self.view)


def recompute_in_backward(tensor: torch.Tensor, recipe: Callable[[], torch.Tensor], enabled: bool = True):
    """Context: where an op inside it saves `tensor` (or a view of it) for backward, autograd keeps
    `recipe` instead and calls it in backward to rebuild the tensor.

    For a tensor that is cheap to compute again from tensors kept anyway (a norm's output from its
    input, the depthwise conv's output from its input) and is saved only by the op that consumes it
    (a Linear, for its weight gradient): what torch.utils.checkpoint would give around the pair,
    without running the consumer's matmul again. Written by hand because checkpoint recomputes
    whole regions. The recipe must give the same values bit for bit, and reads parameters only
    through module calls (under ZeRO-3 a module call is what gathers its parameters, in backward
    as in a checkpoint's recomputation). Disabled (`enabled=False`) inside checkpointed regions:
    the recipe would hold on to tensors that checkpointing drops.
    """
    if not (enabled and torch.is_grad_enabled() and tensor.requires_grad):
        return contextlib.nullcontext()
    storage = tensor.untyped_storage()._cdata  # views of it share the storage

    def pack(saved: torch.Tensor):
        return _Rebuild(recipe, saved) if saved.untyped_storage()._cdata == storage else saved

    def unpack(packed):
        return packed() if isinstance(packed, _Rebuild) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def fp32_input(x: torch.Tensor, lean: bool = True) -> Tuple[torch.Tensor, contextlib.AbstractContextManager]:
    """x in fp32 and a context in which ops saving that fp32 copy keep the (smaller) x instead."""
    if x.dtype == torch.float32:
        return x, contextlib.nullcontext()
    xf = x.float()
    return xf, recompute_in_backward(xf, lambda: x.float(), lean)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and parameter precision; output in
    `out_dtype` (default: the input's). State-dict keys are LayerNorm's."""

    lean = True  # recompute_in_backward allowed (False inside checkpointed regions)

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        xf, keep_x = fp32_input(x, self.lean)
        with keep_x:
            y = F.layer_norm(xf, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(out_dtype or x.dtype)


class ChannelLastBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of a channels-last tensor `(..., C)`, computed in fp32.

    Same statistics, parameters and buffers as BatchNorm3d over `(B, C, T, H, W)`; state-dict
    keys are BatchNorm's (weight, bias, running_mean, running_var, num_batches_tracked).
    """

    lean = True  # recompute_in_backward allowed (False inside checkpointed regions)
    update_statistics = True  # False while its output is recomputed in backward

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Calls inside give the forward's output again: batch statistics, running ones left alone."""
        before, self.update_statistics = self.update_statistics, False
        try:
            yield
        finally:
            self.update_statistics = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the training precision: DeepSpeed casts the parameters to
        # bf16/fp16 but leaves the running statistics in fp32, and half-precision variances are
        # imprecise anyway.
        if self.running_mean is not None and self.running_mean.dtype != torch.float32:
            self.running_mean.data = self.running_mean.data.float()
            self.running_var.data = self.running_var.data.float()
        momentum = self.momentum
        use_batch_stats = self.training or self.running_mean is None
        if self.training and self.track_running_stats:
            if not self.update_statistics:
                # Same batch statistics and the same saved tensors as the forward (checkpoint checks
                # them); momentum 0 leaves the running statistics as they are.
                momentum = 0.0
            else:
                self.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average, as BatchNorm
                    momentum = 1.0 / float(self.num_batches_tracked)
        xf, keep_x = fp32_input(x.reshape(-1, x.shape[-1]), self.lean)
        with keep_x:
            y = F.batch_norm(
                xf,
                self.running_mean,
                self.running_var,
                self.weight.float() if self.weight is not None else None,
                self.bias.float() if self.bias is not None else None,
                use_batch_stats,
                momentum or 0.0,
                self.eps,
            )
        return y.view(x.shape).to(x.dtype)


@contextlib.contextmanager
def statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Inside: every ChannelLastBatchNorm in `module` (itself included) gives its forward's output
    again, running statistics left alone (for a recomputation in backward). Other modules: no-op."""
    with contextlib.ExitStack() as stack:
        for norm in module.modules():
            if isinstance(norm, ChannelLastBatchNorm):
                stack.enter_context(norm.recomputing())
        yield


def checkpoint_once(
    fn: Callable[..., torch.Tensor], *args: torch.Tensor, frozen: nn.Module, preserve_rng_state: bool = True
) -> torch.Tensor:
    """fn(*args) under non-reentrant activation checkpointing, its recomputation in backward run
    under `statistics_frozen(frozen)`: the BatchNorm statistics in `frozen` move once per step."""
    calls = []

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            return fn(*inputs)
        with statistics_frozen(frozen):  # checkpoint's recomputation in backward
            return fn(*inputs)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)
