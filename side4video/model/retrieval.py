"""The retrieval variant's video encoder (docs/model.md "Retrieval variant"): per-frame embeddings.

Side features (post BN, spatial mean per frame) go through `side_proj` (d -> D, zero at init) and
are added to the frozen last-layer class token of each frame; the backbone's final norm and
projection then give `(B, T, E)` frame embeddings. At initialisation this is frozen CLIP.
(The text tower, the similarity and the retrieval training loop come with the retrieval issue.)
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch
import torch.nn as nn

from side4video.model.backbone import build_backbone
from side4video.model.side import SideNetwork
from side4video.model.spec import resolve_spec
from side4video.model.tower import FrozenBackbone


class RetrievalVideoEncoder(nn.Module):
    def __init__(self, backbone: FrozenBackbone, side: SideNetwork):
        super().__init__()
        if backbone.final_norm is None or backbone.proj is None or backbone.taps[-1] != backbone.num_layers - 1:
            raise ValueError("retrieval encoder needs the last block tapped, the final norm and the projection")
        self.backbone = backbone
        self.side = side
        self.side_proj = nn.Parameter(torch.zeros(side.dim, backbone.width))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> frame embeddings (B, T, E)."""
        B, T = video.shape[:2]
        taps = self.backbone(video.flatten(0, 1), num_frames=T)
        side = self.side(video, taps)  # (B, T, d)
        cls = taps[-1][:, 0].view(B, T, -1)
        x = cls.to(side.dtype) + side @ self.side_proj.to(side.dtype)
        x = x.to(self.backbone.compute_dtype)
        return self.backbone.proj(self.backbone.final_norm(x))


def retrieval_encoder_from_official(state_dict: Dict[str, torch.Tensor], config: Dict) -> RetrievalVideoEncoder:
    """The reference retrieval video encoder (fixture config keys) as ours: fp32, eval mode."""
    from side4video.model.convert import convert_official_state_dict

    width, layers, heads, patch = (int(config[k]) for k in ("width", "layers", "heads", "patch_size"))
    spec = dataclasses.replace(resolve_spec("ViT-B-16", int(config["image_size"]), quick_gelu=True, width=width,
                                            layers=layers, heads=heads, patch_size=patch),
                               embed_dim=int(config["output_dim"]))
    backbone = build_backbone(spec, range(layers), storage_dtype=torch.float32, compute_dtype=torch.float32,
                              keep_final_norm=True, keep_proj=True)
    side = SideNetwork(width, int(config["side_dim"]), layers, patch, spec.num_patches,
                       heads=int(config.get("side_heads", 0)), variant="clip", retrieval=True)
    model = RetrievalVideoEncoder(backbone, side)
    model.load_state_dict(convert_official_state_dict(state_dict), strict=True)
    return model.float().eval()
