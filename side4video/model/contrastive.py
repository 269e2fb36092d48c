"""The retrieval loss: symmetric cross-entropy over the batch gathered from all ranks, scaled by a
learned, bounded temperature (`LogitScale`).

Every rank gathers every rank's text and video embeddings and scores the whole global batch, so
each rank computes the same loss L. The gather's backward sums the gradient of the gathered
tensor over ranks and hands each rank its own slice, i.e. world_size * dL/d(local slice). The
engine then averages parameter gradients over ranks, which gives exactly dL/d(parameters), the
gradient one process would get on the global batch (tested with 2 gloo ranks against 1). The
reference's own gather returns only the local slice of the local gradient: a 1/world_size scale
on the encoders' gradients (not on the WTI weights'), which Adam mostly hides.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from side4video.model.similarity import TextEmbedding, VideoEmbedding

CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial value, used when the weights bring none
MAX_LOGIT_SCALE = math.log(100)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums the gathered gradient over ranks (one all-reduce) and returns
    this rank's slice. Written here because torch.distributed.nn's all_gather is deprecated and,
    on gloo, runs its backward as scatter-based all-to-alls: with the four gathers of one WTI
    step (torch 2.14, 2 CPU ranks) it returned wrong video-feature gradients while the text ones
    were right (tests/model/test_contrastive.py caught it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on every rank) along dim 0, in rank order.

    Gradients flow back to the local slice (summed over ranks) when `x` requires them.
    """
    if world_size() == 1:
        return x
    if x.requires_grad:
        return _GatherWithGradient.apply(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_text(text: TextEmbedding) -> TextEmbedding:
    return TextEmbedding(gather_batch(text.features), gather_batch(text.mask), gather_batch(text.weights))


def gather_video(video: VideoEmbedding) -> VideoEmbedding:
    return VideoEmbedding(gather_batch(video.features), gather_batch(video.weights))


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(CE(logits) + CE(logits.T)) / 2 with the matching pairs on the diagonal (rows: texts)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class LogitScale(nn.Module):
    """exp(logit scale), the temperature of the contrastive loss, bounded by `max_value`.

    The bound is applied in forward too: under mixed precision the optimizer's master copy, not
    this parameter, is what the step updates, so a clamp of the parameter alone would not hold.
    The value is a 1-element tensor, not a 0-dim one: DeepSpeed broadcasts parameters as bytes.
    """

    def __init__(self, value: float = CLIP_LOGIT_SCALE, max_value: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.value = nn.Parameter(torch.tensor([float(value)]))
        self.max_value = float(max_value)

    def forward(self) -> torch.Tensor:
        return self.value.float().clamp(max=self.max_value).exp().reshape(())

    @torch.no_grad()
    def clamp_(self) -> None:
        if self.value.numel():  # a ZeRO-3 partition of another rank is empty
            self.value.clamp_(max=self.max_value)
