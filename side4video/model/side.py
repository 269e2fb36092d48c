"""The Side4Video spatial-temporal side network (docs/model.md).

It runs beside the frozen backbone: its own Conv3d patch embedding of the raw video starts a
stream of N patch tokens per frame; after each tapped backbone block the tapped tokens are
projected to the side width, averaged into the stream, and one side block (temporal conv,
class-token-shift attention, MLP) is applied.

Layout: the side stream is kept channels-last, `(B, T, N, d)`, for the whole network, so the
pointwise convs are plain matmuls, BatchNorm runs over the flattened `(B*T*N, d)` view (the same
statistics as the reference's BatchNorm3d over `(B, d, T, h, w)`) and attention needs no
transposes of the stream: the reference's layout shuffles are not needed.

Memory: per block autograd keeps the stream the norms normalise, the pointwise conv's output, the
q/k/v projection and the attention output. Outputs of norms and of the depthwise temporal conv,
and fp32 copies of half-precision inputs, are rebuilt in backward from tensors kept anyway, and the
MLP branch is checkpointed (its 4d-wide hidden layer costs one extra fc1 matmul in backward): about
60% less kept per block, forward and gradients unchanged bit for bit. The machinery (and the fp32
norms that use it) is in model/recompute.py.

Variants: 'clip' (pre-norm, side block after every tapped layer, post BN) and 'eva' (post-norm,
projection LayerNorm after the linear, no post BN); `retrieval=True` gives the retrieval visual
encoder's details (N + 1 position rows added to all tokens, full self-attention, per-frame pool).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from side4video.model.recompute import (
    ChannelLastBatchNorm,
    LayerNormFp32,
    checkpoint_once,
    recompute_in_backward,
    statistics_frozen,
)


class TemporalDepthwiseConv(nn.Module):
    """Depthwise conv along T of a channels-last `(B, T, ..., C)` tensor, zero padded ('same').

    Equivalent to Conv3d(C, C, (k, 1, 1), padding=(k // 2, 0, 0), groups=C); written as k shifted
    multiply-adds because that needs no layout change. Weight `(C, k)`, PyTorch's Conv init.
    """

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("temporal kernel must be odd")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Conv3d's default init: kaiming_uniform(a=sqrt(5)) with fan_in = k, bias U(+-1/sqrt(k)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.kernel)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, half = x.shape[1], self.kernel // 2
        w = self.weight.to(x.dtype)
        out = x * w[:, half] + self.bias.to(x.dtype)
        for j in range(self.kernel):
            s = j - half  # out[t] += w[j] * x[t + s]
            if s == 0 or abs(s) >= T:
                continue
            if s < 0:
                out = out + F.pad(x[:, : T + s] * w[:, j], _pad_time(x.dim(), -s, 0))
            else:
                out = out + F.pad(x[:, s:] * w[:, j], _pad_time(x.dim(), 0, s))
        return out


def _pad_time(ndim: int, before: int, after: int) -> List[int]:
    """F.pad spec padding dim 1 of an ndim tensor."""
    return [0, 0] * (ndim - 2) + [before, after]


class TemporalConv(nn.Module):
    """pointwise d->d, depthwise temporal (3), pointwise d->d; all with bias, no activation."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.pw1 = nn.Linear(dim, dim)
        self.dw = TemporalDepthwiseConv(dim, kernel)
        self.pw2 = nn.Linear(dim, dim)
        self.lean = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pw1(x)
        d = self.dw(p)
        with recompute_in_backward(d, lambda: self.dw(p), self.lean):  # pw2 would keep d beside p
            return self.pw2(d)


class SideAttention(nn.Module):
    """Multi-head attention with fused q/k/v projection, via scaled_dot_product_attention.

    `patch_queries=True`: queries are the patch tokens only (all but the first), keys/values all
    tokens, as the recognition side blocks; otherwise full self-attention.
    """

    def __init__(self, dim: int, heads: int, patch_queries: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"side width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.patch_queries = patch_queries
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        M, L, d = z.shape
        qkv = self.in_proj(z).view(M, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (M, heads, L, head_dim)
        if self.patch_queries:
            q = q[:, :, 1:]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(M, q.shape[2], d))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample (first dimension) while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def shift_class_token(cls: torch.Tensor) -> torch.Tensor:
    """(B, T, d): channels [:d//2] take frame t+1's values, [d//2:] frame t-1's; zeros at the ends."""
    fold = cls.shape[-1] // 2
    forward = F.pad(cls[:, 1:, :fold], (0, 0, 0, 1))
    backward = F.pad(cls[:, :-1, fold:], (0, 0, 1, 0))
    return torch.cat([forward, backward], dim=-1)


class SideBlock(nn.Module):
    """One side block on the stream `(B, T, N, d)` with the projected class token `(B, T, d)`.

    clip (pre-norm):  x += conv(BN1(x)); x += attn(LN(z)); x += mlp(BN2(x))
    eva  (post-norm): x += BN1(conv(x)); x += LN(attn(z)); x += BN2(mlp(x))
    with z = [shifted class token, x + pos] per frame (retrieval: [cls, x] + pos over all tokens,
    full attention, patch outputs added back).
    """

    def __init__(self, dim: int, heads: int, variant: str = "clip", retrieval: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.variant = variant
        self.retrieval = retrieval
        self.conv_norm = ChannelLastBatchNorm(dim)
        self.conv = TemporalConv(dim)
        self.attn_norm = LayerNormFp32(dim)
        self.attn = SideAttention(dim, heads, patch_queries=not retrieval)
        self.mlp_norm = ChannelLastBatchNorm(dim)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path)
        self.set_lean(True)

    def set_lean(self, lean: bool) -> None:
        """lean: keep only what backward cannot cheaply rebuild (off inside a checkpointed layer,
        which keeps nothing)."""
        self.lean = self.conv.lean = self.conv_norm.lean = self.attn_norm.lean = lean
        self.mlp_norm.lean = lean and self.variant != "clip"  # the pre-norm MLP branch is checkpointed whole

    def forward(self, x: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, N, d = x.shape
        pre = self.variant == "clip"
        if pre:
            x = x + self.drop_path(self._pre_norm(self.conv, self.conv_norm, x))
        else:
            x = x + self.drop_path(self.conv_norm(self.conv(x)))

        cls = shift_class_token(cls).unsqueeze(2)
        if self.retrieval:
            z = torch.cat([cls, x], dim=2) + pos
        else:
            z = torch.cat([cls, x + pos], dim=2)
        z = z.view(B * T, N + 1, d)
        if pre:
            a = self._pre_norm(self.attn, self.attn_norm, z)
        else:
            a = self.attn_norm(self.attn(z))
        if self.retrieval:
            a = a[:, 1:]
        x = x + self.drop_path(a.reshape(B, T, N, d))

        if self.lean and torch.is_grad_enabled():
            m = self._mlp_branch(x)
        else:
            m = self.mlp(self.mlp_norm(x)) if pre else self.mlp_norm(self.mlp(x))
        return x + self.drop_path(m)

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch keeping only its input: its 4d-wide hidden layer (kept twice otherwise,
        before and after GELU) is recomputed in backward, one extra fc1 matmul (checkpoint stops
        before fc2). The pre-norm BatchNorm is recomputed with it, without a second update of its
        running statistics; the post-norm one stays outside (it needs fc2's output)."""
        if self.variant != "clip":
            return self.mlp_norm(checkpoint(self.mlp, x, use_reentrant=False, preserve_rng_state=False))
        return checkpoint_once(lambda x: self.mlp(self.mlp_norm(x)), x, frozen=self.mlp_norm, preserve_rng_state=False)

    def _pre_norm(self, branch: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """branch(norm(x)) keeping x only: the branch's first Linear would keep norm(x) beside the
        x the norm keeps, so norm(x) is rebuilt from x in backward."""
        n = norm(x)

        def rebuild() -> torch.Tensor:
            with statistics_frozen(norm):  # a BatchNorm's statistics moved in the forward
                return norm(x)

        with recompute_in_backward(n, rebuild, self.lean):
            return branch(n)


class TapProjection(nn.Module):
    """Backbone tokens (frames, 1 + N, D) -> side width: Linear(LN(x)) (clip) or LN(Linear(x)) (eva).

    The LayerNorm computes in fp32; the half-precision tap is cast on the fly.
    """

    def __init__(self, in_dim: int, dim: int, variant: str = "clip"):
        super().__init__()
        self.variant = variant
        self.norm = LayerNormFp32(in_dim if variant == "clip" else dim)
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.linear.weight.dtype
        if self.variant == "clip":
            return self.linear(self.norm(tokens, dtype))
        return self.norm(self.linear(tokens.to(dtype)), dtype)


class PositionEmbedding(nn.Module):
    """The learned spatial position embedding shared by all side blocks.

    A module of its own (not a bare parameter of SideNetwork) so that every use is a module call:
    under ZeRO-3 that is what gathers it, also when a checkpointed layer is recomputed in backward.
    """

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)


class SideNetwork(nn.Module):
    """side(video (B, T, 3, H, W), taps [(B*T, 1 + N, D)] * num_blocks) -> pooled (B, d).

    With retrieval=True, `forward` returns per-frame features (B, T, d) (post BN, spatial mean).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        num_blocks: int,
        patch_size: int,
        num_patches: int,
        heads: int = 0,
        variant: str = "clip",
        retrieval: bool = False,
        checkpointing: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if variant not in ("clip", "eva"):
            raise ValueError(f"unknown side variant {variant!r}")
        heads = heads or max(1, dim // 64)
        self.dim, self.variant, self.retrieval, self.checkpointing = dim, variant, retrieval, checkpointing
        self.recompute_taps = True  # recompute tap projections in backward instead of saving fp32 inputs
        self.num_patches = num_patches
        self.patch_embed = nn.Conv3d(3, dim, (3, patch_size, patch_size), (1, patch_size, patch_size), (1, 0, 0))
        self.patch_norm = ChannelLastBatchNorm(dim)
        full_attention = retrieval and variant == "clip"
        self.pos_embed = PositionEmbedding(num_patches + (1 if full_attention else 0), dim)
        rates = [drop_path * i / max(1, num_blocks - 1) for i in range(num_blocks)]  # linear, as timm
        self.taps = nn.ModuleList(TapProjection(in_dim, dim, variant) for _ in range(num_blocks))
        self.blocks = nn.ModuleList(SideBlock(dim, heads, variant, full_attention, r) for r in rates)
        self.post_norm = ChannelLastBatchNorm(dim) if variant == "clip" or retrieval else None
        self.set_checkpointing(checkpointing)
        self.reset_parameters()

    def set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing of the side layers on or off."""
        self.checkpointing = bool(on)
        for block in self.blocks:
            block.set_lean(not on)

    def reset_parameters(self) -> None:
        """The initialisation in effect in the reference (docs/model.md)."""
        d = self.dim
        if self.variant == "eva":  # everything PyTorch's default but the position embedding
            nn.init.normal_(self.pos_embed.weight, std=0.02)
            return
        nn.init.normal_(self.pos_embed.weight, std=0.01)
        proj_std = d**-0.5 * 24**-0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.in_proj.weight, std=d**-0.5)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * d) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            if self.retrieval:  # the retrieval model's conv names match its init rules; recognition's do not
                nn.init.normal_(block.conv.pw1.weight, std=0.02)
                nn.init.normal_(block.conv.pw2.weight, std=0.02)
                nn.init.normal_(block.conv.dw.weight, std=d**-0.5)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> the initial stream (B, T, N, d)."""
        B, T = video.shape[:2]
        x = self.patch_embed(video.transpose(1, 2).to(self.patch_embed.weight.dtype))  # (B, d, T, h, w)
        x = x.permute(0, 2, 3, 4, 1).reshape(B, T, -1, self.dim)
        return self.patch_norm(x)

    def layer(self, k: int, x: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """Fuse tap k into the stream and apply side block k."""
        B, T, N, d = x.shape
        project = self.taps[k]
        if torch.is_grad_enabled() and self.recompute_taps and not self.checkpointing:
            # Recompute the projection in backward: only the half-precision tap stays saved,
            # not an fp32 copy of it (the LayerNorm/Linear inputs).
            y = checkpoint(project, tap, use_reentrant=False)
        else:
            y = project(tap)
        y = y.view(B, T, N + 1, d)
        x = 0.5 * x + 0.5 * y[:, :, 1:]
        return self.blocks[k](x, y[:, :, 0], self.pos_embed(x.dtype))

    def _checkpointed_layer(self, k: int, x: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """Layer k under activation checkpointing: its forward runs again in backward, and that
        second run leaves the BatchNorm statistics alone (they move once per step)."""
        return checkpoint_once(lambda x, tap: self.layer(k, x, tap), x, tap, frozen=self.blocks[k])

    def forward(self, video: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(taps) != len(self.blocks):
            raise ValueError(f"side network has {len(self.blocks)} blocks but got {len(taps)} taps")
        x = self.embed(video)
        for k, tap in enumerate(taps):
            if self.checkpointing and torch.is_grad_enabled():
                x = self._checkpointed_layer(k, x, tap)
            else:
                x = self.layer(k, x, tap)
        if self.post_norm is not None:
            x = self.post_norm(x)
        if self.retrieval:
            return x.mean(dim=2)
        return x.mean(dim=(1, 2))
