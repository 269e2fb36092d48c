"""Pretrained backbone weights from a local checkpoint file (never downloaded).

Reads open_clip checkpoints (`visual.*`), timm EVA checkpoints (plain or under open_clip's
`visual.trunk.`), EVA-CLIP's own layout (converted by timm) and our own files (`backbone.*`,
from convert-official or exports); maps the tower's keys to FrozenBackbone's and copies tensor by
tensor into the already materialised (half-precision) parameters.

Loading never rounds silently: a half-precision checkpoint (fp16 or bf16) goes into storage of
its own precision (or fp32, exact). Into the other half precision it is refused in one line unless
`model.backbone.convert_weights` allows it; then one line says how many values the rounding
changed. An fp32 checkpoint is rounded to the configured storage as asked.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from side4video.errors import UserError, first_line
from side4video.logs import get_logger
from side4video.model.spec import BackboneSpec
from side4video.model.tower import FrozenBackbone

log = get_logger(__name__)

HALF = (torch.float16, torch.bfloat16)
HALF_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def half_crossing(
    path: str, dtypes, storage: Optional[torch.dtype], convert: bool, what: str = ""
) -> Optional[torch.dtype]:
    """The file's half precision when storing its tensors (`dtypes`) in `storage` would round them
    into the other half precision (None: no such tensor); refused in one line unless `convert`."""
    if storage not in HALF:
        return None
    found = next((d for d in HALF if d in set(dtypes) and d != storage), None)
    if found is not None and not convert:
        raise UserError(
            f"weights file {path}{what} is {HALF_NAMES[found]}, model.backbone.precision is "
            f"{HALF_NAMES[storage]}: storing it would round its values; set model.backbone.precision="
            f"{HALF_NAMES[found]} to keep them, or model.backbone.convert_weights=true to convert"
        )
    return found


def store(target: torch.Tensor, value: torch.Tensor) -> tuple:
    """Copy `value` into `target`; (values converted, values changed) when it crosses between fp16
    and bf16 (NaNs count as unchanged)."""
    if value.dtype in HALF and target.dtype in HALF and value.dtype != target.dtype:
        stored = value.to(target.dtype)
        target.data.copy_(stored)
        return value.numel(), int(((stored.to(value.dtype) != value) & ~value.isnan()).sum())
    target.data.copy_(value)
    return 0, 0


def report_conversion(path: str, crossing: Optional[torch.dtype], converted: int, changed: int, what: str = "") -> None:
    """The one line after a counted fp16 <-> bf16 conversion."""
    if converted:
        log.info(
            "model.backbone.convert_weights: %s of %s %s values of %s%s changed when stored in the other half "
            "precision (%.2f%%)",
            f"{changed:,}",
            f"{converted:,}",
            HALF_NAMES[crossing],
            path,
            what,
            100.0 * changed / converted,
        )


WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "model_ema")


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A local checkpoint's tensors (memory-mapped where possible), wrappers and `module.` removed."""
    if not os.path.isfile(path):
        raise UserError(f"config key 'model.backbone.weights': file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {first_line(e)}") from None
    for _ in range(3):
        if isinstance(sd, dict):
            inner = next((sd[k] for k in WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is not None:
                sd = inner
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"weights file {path} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def tower_keys(sd: Dict[str, torch.Tensor], spec: BackboneSpec, tower: nn.Module) -> Dict[str, torch.Tensor]:
    """Keys relative to the library tower (open_clip ViT names, timm Eva names)."""
    if spec.family == "vit":
        for prefix in ("visual.", ""):
            if prefix + "conv1.weight" in sd:
                return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        raise UserError("weights file holds no open_clip ViT vision tower (no 'visual.conv1.weight')")
    for prefix in ("visual.trunk.", "trunk."):  # open_clip's TimmModel layout: timm names under a prefix
        if prefix + "pos_embed" in sd:
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    from timm.models.eva import checkpoint_filter_fn

    # EVA-CLIP's own layout (visual.blocks.N.attn.q_proj...): timm knows how to convert it.
    return checkpoint_filter_fn(sd, tower)


STEM_KEYS = {
    "vit": {
        "conv1.weight": "patch_weight",
        "class_embedding": "class_embedding",
        "positional_embedding": "positional_embedding",
        "ln_pre.weight": "norm_weight",
        "ln_pre.bias": "norm_bias",
    },
    "eva": {
        "patch_embed.proj.weight": "patch_weight",
        "patch_embed.proj.bias": "patch_bias",
        "cls_token": "class_embedding",
        "pos_embed": "positional_embedding",
    },
}


def backbone_key(key: str, family: str) -> Optional[str]:
    """Tower-relative key -> key in FrozenBackbone, or None when we do not keep it."""
    stem = STEM_KEYS[family].get(key)
    if stem is not None:
        return "stem." + stem
    if family == "vit":
        if key.startswith("transformer.resblocks."):
            return "blocks." + key[len("transformer.resblocks.") :]
        if key.startswith("ln_post."):
            return "final_norm." + key[len("ln_post.") :]
        if key == "proj":
            return "proj.weight"
        return None
    if key.startswith("blocks."):
        return key
    if key.startswith("norm."):
        return "final_norm." + key[len("norm.") :]
    if key.startswith("head."):  # open_clip's EVA projection (timm's head), kept for retrieval
        return "proj." + key[len("head.") :]
    return None


def resize_position_embedding(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Resample an absolute position embedding (class token first) to another grid."""
    from timm.layers import resample_abs_pos_embed

    squeeze = value.dim() == 2
    v = value.unsqueeze(0) if squeeze else value
    old = int(round((v.shape[1] - 1) ** 0.5))
    new = int(round((target[-2] - 1) ** 0.5))
    v = resample_abs_pos_embed(v.float(), new_size=(new, new), old_size=(old, old), num_prefix_tokens=1)
    return v.squeeze(0) if squeeze else v


class WeightSource:
    """A checkpoint's vision tower mapped to FrozenBackbone's names, read once (memory-mapped), so
    that the backbone can be filled unit by unit: a rank that partitions each unit as soon as it is
    loaded never holds the whole backbone (engine/deepspeed_engine.py, ZeRO-3)."""

    def __init__(
        self,
        backbone: FrozenBackbone,
        tower: nn.Module,
        path: str,
        storage: Optional[torch.dtype] = None,
        convert: bool = False,
    ):
        self.path = path
        self.convert = bool(convert)
        self.converted = self.changed = 0  # half-precision values stored in the other half precision
        sd = read_checkpoint(path)
        if any(k.startswith("backbone.") for k in sd):  # our own format (convert-official, exports)
            self.tensors = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        else:
            self.tensors = {}
            for k, v in tower_keys(sd, backbone.spec, tower).items():
                name = backbone_key(k, backbone.spec.family)
                if name is not None:
                    self.tensors[name] = v
        needed = [
            name
            for unit_name, unit in backbone.named_units()
            for name in (f"{unit_name}.{k}" for k, _ in unit.named_parameters())
        ]
        missing = [k for k in needed if k not in self.tensors]
        if missing:
            raise UserError(
                f"weights file {path} lacks {len(missing)} tensors of {backbone.spec.name}'s vision tower "
                f"(e.g. {missing[0]}); is it a checkpoint of that model?"
            )
        self.crossing = half_crossing(path, {self.tensors[k].dtype for k in needed}, storage, self.convert)

    def report(self) -> None:
        """One line after loading: how many values the fp16 <-> bf16 conversion changed."""
        report_conversion(self.path, self.crossing, self.converted, self.changed)

    @torch.no_grad()
    def load(self, unit_name: str, unit: nn.Module) -> None:
        """Copy this unit's tensors (parameters and buffers the file has) into it, casting."""
        for k, target in unit.state_dict(keep_vars=True).items():
            name = f"{unit_name}.{k}"
            if name not in self.tensors:
                continue
            value = self.tensors[name]
            if value.shape != target.shape:
                if name == "stem.positional_embedding" and value.numel() // value.shape[-1] > 1:
                    value = resize_position_embedding(value, target.shape)
                if value.shape != target.shape:
                    raise UserError(
                        f"weights file {self.path}: {name} has shape {tuple(value.shape)}, the model needs "
                        f"{tuple(target.shape)} (check model.backbone.name and its overrides)"
                    )
            converted, changed = store(target, value)
            self.converted += converted
            self.changed += changed
