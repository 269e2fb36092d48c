"""The method -> a VideoModel: one frozen-backbone wrapper, one of four ways to train on it.

- side4video:   frozen backbone (no autograd) -> taps -> side network -> classifier (the paper)
- adapter:      ST-Adapter before each frozen block; gradients flow through the frozen blocks
- full:         the whole backbone trained
- linear_probe: frozen backbone, final class token averaged over frames, linear classifier

`build_model(ModelArgs(...))` takes plain arguments, as open_clip's `create_model`; the engine
turns a config into them (engine/factory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from side4video.errors import UserError
from side4video.model.adapter import STAdapter
from side4video.model.args import BackboneArgs, SideArgs
from side4video.model.backbone import build_backbone
from side4video.model.heads import ClassificationHead
from side4video.model.side import SideNetwork
from side4video.model.spec import BackboneSpec
from side4video.model.tower import FrozenBackbone
from side4video.model.trainable import TrainableState
from side4video.precision import FROZEN_METHODS, Precision

METHODS = ("side4video", "adapter", "full", "linear_probe")


@dataclass(frozen=True)
class ModelArgs:
    """Everything that decides a recognition model's modules and weights."""

    num_classes: int
    precision: Precision
    method: str = "side4video"
    backbone: BackboneArgs = field(default_factory=BackboneArgs)
    side: SideArgs = field(default_factory=SideArgs)  # method side4video only
    adapter_dim: int = 64
    adapter_kernel: int = 3
    head_dropout: float = 0.0
    seed: int = 0


class VideoModel(TrainableState, nn.Module):
    """video (B, T, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, method: str, backbone: FrozenBackbone, side: Optional[SideNetwork], head: nn.Module):
        super().__init__()
        self.method = method
        self.backbone = backbone
        self.side = side
        self.head = head

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(video))

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Pooled video features (B, d): side features, or the mean final class token."""
        taps = self.backbone(video.flatten(0, 1), num_frames=video.shape[1])
        return self.features_from_taps(video, taps)

    def features_from_taps(self, video: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        """The part after the backbone (lets an engine run the backbone on its own)."""
        if self.side is not None:
            return self.side(video, taps)
        B, T = video.shape[:2]
        return self.backbone.class_token(taps[-1]).view(B, T, -1).mean(dim=1)

    def frozen_towers(self) -> Dict[str, nn.Module]:
        """Frozen modules by attribute name (the engine keeps them in their storage precision)."""
        return {"backbone": self.backbone} if self.method in FROZEN_METHODS else {}

    # -- what is trained, and what a checkpoint holds
    def _is_trainable_entry(self, name: str, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, nn.Parameter):
            return tensor.requires_grad
        in_frozen_backbone = name.startswith("backbone.") and not name.startswith("backbone.adapters.")
        return not in_frozen_backbone or self.backbone.trainable

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trained parameters + buffers outside the frozen backbone (e.g. BN statistics)."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if self._is_trainable_entry(k, v)}

    def parameter_counts(self) -> Dict[str, int]:
        def count(params) -> int:
            return sum(p.numel() for p in params)

        adapters = self.backbone.adapters
        return {
            "backbone_params": count(self.backbone.frozen_parameters()),
            "side_params": count(self.side.parameters()) if self.side is not None else 0,
            "adapter_params": count(adapters.parameters()) if adapters is not None else 0,
            "head_params": count(self.head.parameters()),
            "trainable_params": count(p for p in self.parameters() if p.requires_grad),
        }


def _taps(args: ModelArgs, spec: BackboneSpec) -> List[int]:
    if args.method == "side4video":
        return args.side.taps(spec)
    return [spec.layers - 1]


def _build(args: ModelArgs, device, place_unit=None) -> VideoModel:
    method = args.method
    if method not in METHODS:
        raise UserError(f"config key 'model.method' is {method!r}; allowed: {', '.join(METHODS)}")
    spec = args.backbone.spec()
    taps = _taps(args, spec)
    p = args.precision
    backbone = build_backbone(
        spec,
        taps,
        storage_dtype=p.storage,
        compute_dtype=p.compute,
        weights=args.backbone.weights,
        convert_weights=args.backbone.convert_weights,
        fp32_blocks=args.backbone.fp32_blocks,
        seed=args.seed,
        device=device,
        trainable=method == "full",
        grad_through=method == "adapter",
        keep_final_norm=method != "side4video",
        tap_dtype=p.storage if method in FROZEN_METHODS else None,
        place_unit=place_unit,
    )
    # Trained modules: fp32 (DeepSpeed casts them to its precision), deterministic from the seed.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(args.seed + 1)
        side = None
        if method == "side4video":
            side = args.side.network(spec, len(taps))
            feat_dim = args.side.dim
        else:
            feat_dim = spec.width
        if method == "adapter":
            backbone.adapters = nn.ModuleList(
                STAdapter(spec.width, args.adapter_dim, args.adapter_kernel) for _ in range(spec.layers)
            )
        head = ClassificationHead(feat_dim, args.num_classes, args.head_dropout)
    model = VideoModel(method, backbone, side, head)
    model.train(False)
    return model


def build_model(args: ModelArgs, device="cpu", place_unit=None) -> VideoModel:
    """The model: backbone materialised in its storage precision and loaded, the rest fp32.
    `place_unit(unit)` is called on each frozen unit once it is loaded (e.g. ZeRO-3 partitioning)."""
    return _build(args, device, place_unit)


def build_model_on_meta(args: ModelArgs) -> VideoModel:
    """Same structure with every tensor on `meta`: parameter counting, planning; no memory."""
    return _build(args, "meta")
