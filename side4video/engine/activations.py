"""What one training step's tensors cost, counted on the `meta` device: no memory, no compute.

The model of a config is built on `meta` (every parameter has its real shape and dtype) and one
forward + backward runs on a meta clip batch of the configured size. `LiveBytes`, a
TorchDispatchMode, sees every tensor an op creates and follows it until the last tensor on its
storage is gone, so it knows at every moment how many bytes of activations, temporaries and
gradients are alive: after the forward that is what autograd keeps for the backward (the kept
activations), and its maximum over the step is the step's peak. These are the real modules' own
saved tensors and temporaries (our memory-lean side network included), not a formula; a test
checks the count against the same step run on real tensors.

Two things differ on `meta` and are put right here:
- scaled_dot_product_attention picks its math path on `meta` (keeping the attention matrix);
  CPUs and GPUs run a fused kernel that keeps only q, k, v, the output and the log-sum-exp, so
  the fused CPU kernel (which has a meta implementation and keeps the same tensors as the GPU
  flash kernel) is called instead;
- parameter gradients are dropped as soon as they are accumulated, because where they live
  (whole, partitioned, offloaded) is the ZeRO stage's business: the plan adds them per stage.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive: `current`, `peak`.

    An op's output that shares no storage with the op's inputs is a new storage; it is followed
    through every tensor an op returns on it (views, in-place results) and counted until the last
    of those tensors is freed (weak references; autograd's saved tensors keep theirs alive).
    Outputs on the storage of an input that is not followed (parameters, inputs, buffers) are
    views or in-place results of memory that existed before, and are not counted.
    Not seen: storage swapped into a parameter with `.data = ...` (the CPU upcast of frozen
    weights, which the plan adds itself).
    """

    def __init__(self):
        super().__init__()
        self._live: Dict[int, List[int]] = {}  # storage id -> [bytes, tensors alive on it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {key_of(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = key_of(t)
            entry = self._live.get(key)
            if entry is None:
                if key in inputs:  # a view or in-place result of memory from before
                    continue
                entry = self._live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def key_of(t: torch.Tensor) -> int:
    """The identity of a tensor's storage (its views share it)."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """scaled_dot_product_attention on `meta` -> the fused kernel a CPU or GPU would run (module doc).

    Swaps the function in torch.nn.functional for the duration (the modules look it up there at
    call time, nn.MultiheadAttention included): a TorchFunctionMode would not see the call that
    MultiheadAttention's own torch-function dispatch makes.
    """
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or dropout_p or set(kwargs) - {"scale"}:
            return original(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, bool(is_causal), scale=kwargs.get("scale")
        )
        return out

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def gradients_dropped(model: torch.nn.Module) -> Iterator[None]:
    """Parameter gradients freed as soon as they are complete (their home depends on the ZeRO stage)."""

    def drop(p):
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def step_memory(
    model: torch.nn.Module,
    batch: int,
    frames: int,
    size: int,
    clip_dtype: torch.dtype,
    num_classes: int,
    backward: bool = True,
) -> Dict[str, int]:
    """One training step of `model` (on `meta`) on a (batch, frames, 3, size, size) clip batch.

    Returns bytes: `kept` (alive after the forward: what the backward needs, the logits and loss),
    `peak` (the most alive at once during forward + backward, parameter gradients excluded) and
    `forward_peak`.
    """
    video = torch.empty(batch, frames, 3, size, size, device="meta", dtype=clip_dtype)
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    model.train()
    with gradients_dropped(model), fused_attention(), LiveBytes() as live:
        loss = F.cross_entropy(model(video).float(), labels)
        kept, forward_peak = live.current, live.peak
        if backward:
            loss.backward()
        peak = live.peak
        del loss
    return {"kept": int(kept), "forward_peak": int(forward_peak), "peak": int(peak)}


def forward_memory(module: torch.nn.Module, *inputs, **kwargs) -> Dict[str, int]:
    """One forward of `module` on `meta` inputs without autograd: peak bytes alive above the
    inputs (its working set) and the bytes of its output."""
    with torch.no_grad(), fused_attention(), LiveBytes() as live:
        out = module(*inputs, **kwargs)
        result = {"peak": int(live.peak), "output": int(live.current)}
        del out
    return result


def total_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_zeros_like(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype or t.dtype, device="meta")
