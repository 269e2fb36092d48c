"""`model.method` -> a VideoModel: one frozen-backbone wrapper, one of four ways to train on it.

- side4video:   frozen backbone (no autograd) -> taps -> side network -> classifier (the paper)
- adapter:      ST-Adapter before each frozen block; gradients flow through the frozen blocks
- full:         the whole backbone trained (fp32 storage)
- linear_probe: frozen backbone, final class token averaged over frames, linear classifier
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from side4video.errors import UserError
from side4video.logs import get_logger
from side4video.model.adapter import STAdapter
from side4video.model.backbone import (DTYPES, BackboneSpec, FrozenBackbone, build_backbone, resolve_spec,
                                       resolve_taps)
from side4video.model.heads import ClassificationHead
from side4video.model.side import SideNetwork

log = get_logger(__name__)

METHODS = ("side4video", "adapter", "full", "linear_probe")


class VideoModel(nn.Module):
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

    def train(self, mode: bool = True):
        super().train(mode)  # FrozenBackbone.train keeps a frozen backbone in eval mode
        return self

    # -- what is trained, and what a checkpoint holds
    def _is_trainable_entry(self, name: str, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, nn.Parameter):
            return tensor.requires_grad
        in_frozen_backbone = name.startswith("backbone.") and not name.startswith("backbone.adapters.")
        return not in_frozen_backbone or self.backbone.trainable

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trained parameters + buffers outside the frozen backbone (e.g. BN statistics)."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if self._is_trainable_entry(k, v)}

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        expected = set(self.trainable_state_dict())
        if strict:
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            if missing or unexpected:
                raise KeyError(f"trainable state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)

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


# ------------------------------------------------------------------------------------ config
def resolve_precisions(cfg, method: str) -> Tuple[torch.dtype, torch.dtype]:
    """(storage, compute) dtypes of the backbone.

    compute 'auto': the storage precision with CUDA, fp32 on CPUs (half matmuls are 10-400x
    slower there). The upcast hooks only work without autograd through the weights, so where
    gradients flow through the backbone the weights are stored in the compute precision.
    """
    storage = DTYPES[cfg.model.backbone.precision]
    if method == "full":
        storage = torch.float32
    cp = cfg.model.backbone.compute_precision
    compute = (storage if torch.cuda.is_available() else torch.float32) if cp == "auto" else DTYPES[cp]
    if method == "adapter" and compute != storage:
        log.info("adapter baseline: backbone stored in %s (compute precision), since gradients flow through it", compute)
        storage = compute
    return storage, compute


def side_variant(cfg, spec: BackboneSpec) -> str:
    variant = cfg.model.side.variant
    return ("eva" if spec.family == "eva" else "clip") if variant == "auto" else variant


def _taps(cfg, spec: BackboneSpec, method: str) -> List[int]:
    if method == "side4video":
        return resolve_taps(cfg.model.side.layers, spec.layers, side_variant(cfg, spec))
    return [spec.layers - 1]


def _build(cfg, device, meta: bool) -> VideoModel:
    method = cfg.model.method
    if method not in METHODS:
        raise UserError(f"config key 'model.method' is {method!r}; allowed: {', '.join(METHODS)}")
    spec = resolve_spec(cfg.model.backbone, int(cfg.data.size))
    storage, compute = resolve_precisions(cfg, method)
    taps = _taps(cfg, spec, method)
    seed = int(cfg.train.seed)
    backbone = build_backbone(
        spec, taps, storage_dtype=storage, compute_dtype=compute, weights=str(cfg.model.backbone.weights or ""),
        seed=seed, device="meta" if meta else device, trainable=method == "full", grad_through=method == "adapter",
        keep_final_norm=method != "side4video", tap_dtype=storage if method == "side4video" else None)
    # Trained modules: fp32 (DeepSpeed casts them to its precision), deterministic from the seed.
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else device):
        torch.manual_seed(seed + 1)
        side = None
        if method == "side4video":
            s = cfg.model.side
            side = SideNetwork(spec.width, int(s.dim), len(taps), spec.patch_size, spec.num_patches, heads=int(s.heads),
                               variant=side_variant(cfg, spec), checkpointing=bool(s.checkpointing),
                               drop_path=float(s.drop_path))
            feat_dim = int(s.dim)
        else:
            feat_dim = spec.width
        if method == "adapter":
            a = cfg.model.adapter
            backbone.adapters = nn.ModuleList(STAdapter(spec.width, int(a.dim), int(a.kernel)) for _ in range(spec.layers))
        head = ClassificationHead(feat_dim, int(cfg.data.num_classes), float(cfg.model.head.dropout))
    model = VideoModel(method, backbone, side, head)
    model.train(False)
    return model


def build_model(cfg, device="cpu") -> VideoModel:
    """The model for a config: backbone materialised (storage precision) and loaded, the rest fp32."""
    return _build(cfg, device, meta=False)


def build_model_on_meta(cfg) -> VideoModel:
    """Same structure with every tensor on `meta`: parameter counting, planning; no memory."""
    return _build(cfg, "meta", meta=True)
