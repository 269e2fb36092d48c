"""What backbone a name stands for: architecture read from open_clip's model configs (and timm's
EVA definitions), tiny local variants for tests and the demo, and the tap layers of a side network.
Nothing here builds a module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from side4video.errors import UserError


@dataclass
class BackboneSpec:
    """A backbone resolved from open_clip's model config and the architecture overrides."""

    name: str
    family: str  # 'vit' (open_clip VisionTransformer) or 'eva' (timm Eva)
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    quick_gelu: bool
    vision_cfg: Dict = field(default_factory=dict)
    timm_name: str = ""
    overridden: bool = False  # architecture overrides were given (a small test variant)
    embed_dim: int = 0  # output projection width (0: the model config's)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


# Architecture of the timm EVA towers open_clip names (read from timm's model definitions);
# needed before anything is built, e.g. to check the image size against the patch size.
EVA_ARCH = {
    "eva02_enormous_patch14_clip_224": dict(patch_size=14, width=1792, layers=64, heads=16),
    "eva02_large_patch14_clip_224": dict(patch_size=14, width=1024, layers=24, heads=16),
    "eva02_large_patch14_clip_336": dict(patch_size=14, width=1024, layers=24, heads=16),
    "eva02_base_patch16_clip_224": dict(patch_size=16, width=768, layers=12, heads=12),
}


# Tiny ViTs of our own (open_clip model-config layout) for tests and the CPU demo; their text
# towers (retrieval) keep CLIP's vocabulary so open_clip's tokenizer applies.
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
LOCAL_MODELS = {
    "ViT-T-16": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16},
        "text_cfg": _TINY_TEXT,
    },
    "ViT-T-8": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "patch_size": 8},
        "text_cfg": _TINY_TEXT,
    },
}


def open_clip_config(name: str) -> Optional[Dict]:
    """open_clip's model config for `name` (ours for the tiny local models), None if unknown."""
    import open_clip

    return LOCAL_MODELS.get(name) or open_clip.get_model_config(name)


def resolve_spec(
    name: str,
    image_size: int,
    *,
    quick_gelu: bool = False,
    width: int = 0,
    layers: int = 0,
    heads: int = 0,
    patch_size: int = 0,
) -> BackboneSpec:
    """A backbone name (+ input size and non-zero architecture overrides) -> BackboneSpec."""
    import open_clip

    named = open_clip_config(name)
    if named is None:
        known = list(LOCAL_MODELS) + [n for n in open_clip.list_models() if n.startswith(("ViT-B", "ViT-L", "EVA02"))]
        raise UserError(
            f"config key 'model.backbone.name' is {name!r}: not an open_clip model name "
            f"(e.g. {', '.join(known[:8])}, ...)"
        )
    vision = dict(named["vision_cfg"])
    overrides = {
        k: int(v) for k, v in dict(width=width, layers=layers, heads=heads, patch_size=patch_size).items() if v
    }
    timm_name = vision.get("timm_model_name") or ""
    if timm_name:
        if timm_name not in EVA_ARCH:
            raise UserError(
                f"model.backbone.name {name!r}: timm tower {timm_name!r} is not supported "
                f"(supported: open_clip ViTs and {', '.join(sorted(EVA_ARCH))})"
            )
        arch = dict(EVA_ARCH[timm_name], **overrides)
        if arch["width"] % arch["heads"]:
            raise UserError(f"model.backbone: width {arch['width']} is not divisible by heads {arch['heads']}")
        spec = BackboneSpec(
            name,
            "eva",
            image_size,
            arch["patch_size"],
            arch["width"],
            arch["layers"],
            arch["heads"],
            False,
            vision,
            timm_name,
            overridden=bool(overrides),
        )
    else:
        if not isinstance(vision.get("layers"), int):
            raise UserError(f"model.backbone.name {name!r} is not a ViT (ResNet towers are not supported)")
        tower_width = overrides.get("width", vision.get("width", 768))
        tower_heads = overrides.get("heads", tower_width // vision.get("head_width", 64))
        if tower_width % tower_heads:
            raise UserError(f"model.backbone: width {tower_width} is not divisible by heads {tower_heads}")
        quick = bool(quick_gelu) or bool(named.get("quick_gelu", False))
        spec = BackboneSpec(
            name,
            "vit",
            image_size,
            overrides.get("patch_size", vision.get("patch_size", 16)),
            tower_width,
            overrides.get("layers", vision["layers"]),
            tower_heads,
            quick,
            vision,
        )
    if image_size % spec.patch_size:
        raise UserError(f"data.size {image_size} is not a multiple of the backbone's patch size {spec.patch_size}")
    return spec


def embed_dim(spec: BackboneSpec) -> int:
    """Width of the tower's output projection."""
    return spec.embed_dim or int(open_clip_config(spec.name)["embed_dim"])


def side_variant(variant: str, spec: BackboneSpec) -> str:
    """'clip' (pre-norm) or 'eva' (post-norm) side blocks; 'auto' follows the backbone family."""
    return ("eva" if spec.family == "eva" else "clip") if variant == "auto" else variant


def resolve_taps(layers: Union[str, Sequence[int]], num_layers: int, variant: str) -> List[int]:
    """`model.side.layers` -> sorted 0-based block indices feeding side blocks."""
    if isinstance(layers, str):
        if layers == "auto":
            layers = "every_other" if variant == "eva" else "all"
        if layers == "all":
            return list(range(num_layers))
        if layers == "every_other":  # after blocks 1, 3, 5, ... as the reference's EVA model
            return list(range(1, num_layers, 2))
        raise UserError(f"config key 'model.side.layers' is {layers!r}; allowed: auto, all, every_other or a list")
    taps = sorted(set(int(i) for i in layers))
    if not taps or taps[-1] >= num_layers:
        raise UserError(f"config key 'model.side.layers' {list(layers)}: the backbone has blocks 0..{num_layers - 1}")
    return taps
