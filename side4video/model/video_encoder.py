"""The retrieval model's video encoder (docs/model.md "Retrieval variant").

The frozen backbone with every block (CLIP) or every other block (EVA) tapped -> side network ->
per-frame side features (post BN, spatial mean) -> `side_proj` (d -> D, zero at init), added to
each frame's final class token -> the backbone's final norm and projection: frame embeddings
(B, T, E). At initialisation this is the frozen CLIP embedding of every frame; without a side
network (method `linear_probe`) it stays that.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from side4video.model.side import SideNetwork
from side4video.model.tower import FrozenBackbone


class SideProjection(nn.Module):
    """side features (..., d) -> (..., D): the zero-initialised map into the backbone's width."""

    def __init__(self, side_dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(side_dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


def frame_embeddings(
    backbone: FrozenBackbone, side: Optional[SideNetwork], side_proj: Optional[SideProjection], video: torch.Tensor
) -> torch.Tensor:
    """video (B, T, 3, H, W) -> frame embeddings (B, T, E)."""
    B, T = video.shape[:2]
    taps = backbone(video.flatten(0, 1), num_frames=T)
    x = taps[-1][:, 0].view(B, T, -1)  # each frame's final class token
    if side is not None:
        features = side(video, taps)  # (B, T, d)
        x = x.to(features.dtype) + side_proj(features)
    x = x.to(backbone.compute_dtype)
    return backbone.proj(backbone.final_norm(x))


class RetrievalVideoEncoder(nn.Module):
    """The retrieval video encoder alone: backbone + side network + side projection."""

    def __init__(self, backbone: FrozenBackbone, side: SideNetwork):
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.side = side
        self.side_proj = SideProjection(side.dim, backbone.width)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> frame embeddings (B, T, E)."""
        return frame_embeddings(self.backbone, self.side, self.side_proj, video)


def check_backbone(backbone: FrozenBackbone) -> None:
    if backbone.final_norm is None or backbone.proj is None or backbone.taps[-1] != backbone.num_layers - 1:
        raise ValueError("retrieval encoder needs the last block tapped, the final norm and the projection")
