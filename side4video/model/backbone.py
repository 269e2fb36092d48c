"""The frozen image backbone: an open_clip ViT or a timm EVA, seen as stem -> blocks -> final norm.

open_clip builds the ViT towers and timm the EVA towers (open_clip's EVA configs name a timm
model); we only regroup their modules into a uniform layout so that the token tensor after every
block, `(frames, 1 + N, D)`, can be tapped, and so that every unit whose weights are needed at once
(stem, each block, final norm) is a module that is *called*: DeepSpeed ZeRO-3 gathers a module's
parameters in its forward hooks, and our CPU upcast hooks work the same way.

Weights are never downloaded. Towers are built with their parameters on the `meta` device and
then materialised directly in the storage precision, so EVA02-E-14 (4.35 B parameters) never
exists in fp32; pretrained weights are copied in tensor by tensor from a local checkpoint file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------ the spec
@dataclass
class BackboneSpec:
    """The backbone a config asks for, resolved from open_clip's model config and the overrides."""

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
_EVA_ARCH = {
    "eva02_enormous_patch14_clip_224": dict(patch_size=14, width=1792, layers=64, heads=16),
    "eva02_large_patch14_clip_224": dict(patch_size=14, width=1024, layers=24, heads=16),
    "eva02_large_patch14_clip_336": dict(patch_size=14, width=1024, layers=24, heads=16),
    "eva02_base_patch16_clip_224": dict(patch_size=16, width=768, layers=12, heads=12),
}


# Tiny ViTs of our own (open_clip model-config layout) for tests and the CPU demo.
LOCAL_MODELS = {
    "ViT-T-16": {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 16}},
    "ViT-T-8": {"embed_dim": 128, "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "patch_size": 8}},
}


def model_config(name: str) -> Optional[Dict]:
    import open_clip

    return LOCAL_MODELS.get(name) or open_clip.get_model_config(name)


def resolve_spec(backbone_cfg, image_size: int) -> BackboneSpec:
    """Resolve `model.backbone` (+ `data.size`) to a BackboneSpec; bad names raise UserError."""
    import open_clip

    name = str(backbone_cfg.name)
    model_cfg = model_config(name)
    if model_cfg is None:
        known = list(LOCAL_MODELS) + [n for n in open_clip.list_models() if n.startswith(("ViT-B", "ViT-L", "EVA02"))]
        raise UserError(f"config key 'model.backbone.name' is {name!r}: not an open_clip model name "
                        f"(e.g. {', '.join(known[:8])}, ...)")
    vision = dict(model_cfg["vision_cfg"])
    overrides = {k: int(backbone_cfg[k]) for k in ("width", "layers", "heads", "patch_size") if int(backbone_cfg[k])}
    timm_name = vision.get("timm_model_name") or ""
    if timm_name:
        if timm_name not in _EVA_ARCH:
            raise UserError(f"model.backbone.name {name!r}: timm tower {timm_name!r} is not supported "
                            f"(supported: open_clip ViTs and {', '.join(sorted(_EVA_ARCH))})")
        arch = dict(_EVA_ARCH[timm_name], **overrides)
        if arch["width"] % arch["heads"]:
            raise UserError(f"model.backbone: width {arch['width']} is not divisible by heads {arch['heads']}")
        spec = BackboneSpec(name, "eva", image_size, arch["patch_size"], arch["width"], arch["layers"], arch["heads"],
                            False, vision, timm_name, overridden=bool(overrides))
    else:
        if not isinstance(vision.get("layers"), int):
            raise UserError(f"model.backbone.name {name!r} is not a ViT (ResNet towers are not supported)")
        width = overrides.get("width", vision.get("width", 768))
        heads = overrides.get("heads", width // vision.get("head_width", 64))
        if width % heads:
            raise UserError(f"model.backbone: width {width} is not divisible by heads {heads}")
        quick = bool(backbone_cfg.quick_gelu) or bool(model_cfg.get("quick_gelu", False))
        spec = BackboneSpec(name, "vit", image_size, overrides.get("patch_size", vision.get("patch_size", 16)), width,
                            overrides.get("layers", vision["layers"]), heads, quick, vision)
    if image_size % spec.patch_size:
        raise UserError(f"data.size {image_size} is not a multiple of the backbone's patch size {spec.patch_size}")
    return spec


# -------------------------------------------------------------------------------------- stem
class Stem(nn.Module):
    """Patch embedding, class token, absolute position embedding, optional pre-norm (+ EVA's rotary table).

    Holds its weights as direct parameters (not in child modules) so that one forward hook sees
    them all: ZeRO-3 gathers a module's own parameters when it is called, and so do our upcast
    hooks. Built from the library tower's modules; the maths is the libraries' own.
    """

    def __init__(self, patch: nn.Conv2d, class_embedding: nn.Parameter, positional_embedding: nn.Parameter,
                 norm: Optional[nn.Module] = None, rope: Optional[nn.Module] = None, grid_size=None):
        super().__init__()
        self.stride = patch.stride
        self.patch_weight = patch.weight
        self.patch_bias = patch.bias
        self.class_embedding = class_embedding
        self.positional_embedding = positional_embedding
        if isinstance(norm, nn.LayerNorm):
            self.norm_weight, self.norm_bias, self.norm_eps = norm.weight, norm.bias, norm.eps
        elif norm is None or isinstance(norm, nn.Identity):
            self.norm_weight = self.norm_bias = None
        else:
            raise UserError(f"backbone stem: unsupported pre-norm {type(norm).__name__}")
        self.rope = rope  # buffers only (rotary tables)
        self.grid_size = grid_size

    def forward(self, images: torch.Tensor):
        w = self.patch_weight
        x = F.conv2d(images.to(w.dtype), w, self.patch_bias, stride=self.stride)
        x = x.flatten(2).transpose(1, 2)  # (frames, N, D)
        D = x.shape[-1]
        cls = self.class_embedding.reshape(1, 1, D).to(x.dtype).expand(x.shape[0], 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.reshape(1, -1, D).to(x.dtype)
        if self.norm_weight is not None:
            x = F.layer_norm(x, (D,), self.norm_weight, self.norm_bias, self.norm_eps)
        rope = None
        if self.rope is not None:
            rope = self.rope.get_embed() if hasattr(self.rope, "feat_shape") else self.rope.get_embed(shape=self.grid_size)
        return x, rope


def vit_stem(tower: nn.Module) -> Stem:
    """open_clip VisionTransformer: conv1 (no bias), class_embedding, positional_embedding, ln_pre."""
    return Stem(tower.conv1, tower.class_embedding, tower.positional_embedding, tower.ln_pre)


def eva_stem(tower: nn.Module) -> Stem:
    """timm Eva: patch_embed.proj, cls_token, pos_embed (covering the class token), rope, norm_pre."""
    if (tower.no_embed_class or tower.reg_token is not None or tower.cls_token is None or tower.pos_embed is None
            or not isinstance(tower.patch_embed.norm, nn.Identity) or tower.dynamic_img_size):
        raise UserError("EVA backbone: only towers with a class token and a position embedding over it are supported")
    return Stem(tower.patch_embed.proj, tower.cls_token, tower.pos_embed, tower.norm_pre, tower.rope,
                tower.patch_embed.grid_size)


class FinalNorm(nn.Module):
    """The tower's final LayerNorm, computing in its input's precision with the weights cast on the fly.

    Casting (rather than swapping `.data` in a hook) keeps autograd correct when gradients flow
    through it to trained modules (retrieval's side projection).
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Projection(nn.Module):
    """The ViT's output projection (`x @ proj`), kept only where it is used (retrieval)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


# ------------------------------------------------------------------------------- the wrapper
class FrozenBackbone(nn.Module):
    """stem -> blocks (optionally each preceded by an adapter) -> taps; final norm on request.

    `forward(frames)` returns the token tensors `(frames, 1 + N, D)` after the tapped blocks. With
    a frozen backbone it runs without autograd, and taps are cast to `tap_dtype` if given (the
    storage precision, for taps a side network keeps).
    """

    def __init__(self, spec: BackboneSpec, tower: nn.Module, taps: Sequence[int], storage_dtype: torch.dtype,
                 compute_dtype: torch.dtype, trainable: bool = False, grad_through: bool = False,
                 keep_final_norm: bool = False, keep_proj: bool = False, tap_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.spec = spec
        self.tap_dtype = tap_dtype  # taps kept for a side network's backward: the storage precision
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype
        self.trainable = trainable  # backbone weights are trained ('full')
        self.grad_through = grad_through or trainable  # gradients flow through the blocks ('adapter', 'full')
        self.taps = sorted(set(int(i) for i in taps))
        if not self.taps or self.taps[0] < 0 or self.taps[-1] >= spec.layers:
            raise UserError(f"backbone tap layers {list(taps)} are outside 0..{spec.layers - 1}")
        if spec.family == "vit":
            self.stem = vit_stem(tower)
            self.blocks = tower.transformer.resblocks
            final_norm, proj = tower.ln_post, (Projection(tower.proj) if tower.proj is not None else None)
        else:
            self.stem = eva_stem(tower)
            self.blocks = tower.blocks
            final_norm, proj = tower.norm, None
        self.final_norm = FinalNorm(final_norm) if keep_final_norm else None
        if keep_proj and proj is None:
            raise UserError(f"backbone {spec.name}: no output projection to keep")
        self.proj = proj if keep_proj else None
        self.adapters: Optional[nn.ModuleList] = None
        self._hook_handles: List = []
        self._saved: Dict[int, list] = {}
        self._fingerprint: Dict = {"name": spec.name, "weights": "random", "seed": None}
        self._sha256: Optional[str] = None

    # -- structure
    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def units(self) -> List[nn.Module]:
        """The modules whose weights are used together (ZeRO-3 leaf modules)."""
        return [m for m in (self.stem, *self.blocks, self.final_norm, self.proj) if m is not None]

    def leaf_module_types(self) -> List[type]:
        """Module classes to mark as ZeRO-3 leaves (deepspeed.utils.set_z3_leaf_modules)."""
        return list(dict.fromkeys(type(m) for m in self.units()))

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's own weights (not the adapters)."""
        for m in self.units():
            yield from m.parameters()

    # -- modes
    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode whatever the caller asks; adapters follow.
        super().train(mode and self.trainable)
        if self.adapters is not None:
            self.adapters.train(mode)
        return self

    # -- precision: half storage, fp32 compute on CPUs
    def install_compute_hooks(self) -> None:
        """(Re-)register the per-unit upcast hooks when compute and storage precision differ.

        Pre-hook (appended): swap each parameter's (and buffer's) `.data` for a compute-precision copy; post-hook
        (prepended): restore the stored data. Call again after deepspeed.initialize so that under
        ZeRO-3 its gather hook runs before our upcast and its release hook after our restore.
        Only valid without autograd through the weights (frozen backbone under no_grad).
        """
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self.compute_dtype == self.storage_dtype:
            return
        if self.grad_through:
            raise RuntimeError("compute hooks swap weight data and cannot be used when gradients flow through the backbone")
        for unit in (self.stem, *self.blocks):  # final norm and projection cast on the fly
            self._hook_handles.append(unit.register_forward_pre_hook(self._upcast))
            self._hook_handles.append(unit.register_forward_hook(self._restore, prepend=True))

    def _upcast(self, module: nn.Module, args) -> None:
        saved = []
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point() and t.dtype != self.compute_dtype:
                saved.append((t, t.data))
                t.data = t.data.to(self.compute_dtype)
        self._saved[id(module)] = saved

    def _restore(self, module: nn.Module, args, output) -> None:
        for t, data in self._saved.pop(id(module), ()):
            t.data = data

    # -- forward
    def forward(self, frames: torch.Tensor, num_frames: Optional[int] = None) -> List[torch.Tensor]:
        """frames (B*T, 3, H, W) -> [tokens (B*T, 1 + N, D)] after each tapped block.

        `num_frames` (T) is needed only by adapters (their temporal conv).
        """
        with torch.set_grad_enabled(self.grad_through and torch.is_grad_enabled()):
            x, rope = self.stem(frames)
            out = []
            last = self.taps[-1]
            for i, block in enumerate(self.blocks):
                if self.adapters is not None:
                    x = self.adapters[i](x, num_frames)
                x = block(x) if rope is None else block(x, rope=rope)
                if i in self.taps:
                    out.append(x if self.grad_through or self.tap_dtype is None else x.to(self.tap_dtype))
                if i == last:  # blocks after the last tap would be wasted work
                    break
            return out

    def class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm class token of a block output: (frames, 1 + N, D) -> (frames, D)."""
        if self.final_norm is None:
            raise RuntimeError("backbone built without its final norm")
        with torch.set_grad_enabled(self.grad_through and torch.is_grad_enabled()):
            return self.final_norm(tokens[:, :1].to(self.compute_dtype)).squeeze(1)

    # -- identity
    def fingerprint(self) -> Dict:
        """What the frozen weights are: name, architecture, weights file + sha256 (or random + seed)."""
        fp = dict(self._fingerprint)
        fp["architecture"] = {k: getattr(self.spec, k) for k in ("width", "layers", "heads", "patch_size", "image_size")}
        if fp["weights"] != "random":
            if self._sha256 is None:
                self._sha256 = sha256_file(fp["weights"])
            fp["sha256"] = self._sha256
        return fp


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ construction
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on `meta` but real buffers.

    Written by hand because `with torch.device('meta')` would also put the computed buffers (EVA's
    rotary tables, zero k-biases) on meta, and their values would be lost on materialisation.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_tower(spec: BackboneSpec) -> nn.Module:
    """The library's vision tower (random init, no downloads); call under a device context."""
    if spec.family == "vit":
        from open_clip.model import _build_vision_tower

        vision = dict(spec.vision_cfg, image_size=spec.image_size, patch_size=spec.patch_size, width=spec.width,
                      layers=spec.layers, head_width=spec.width // spec.heads, patch_dropout=0.0, output_tokens=False)
        # cast_dtype=None: norms compute in their input's dtype (fp32 on CPUs, half on GPUs).
        return _build_vision_tower(embed_dim=_embed_dim(spec), vision_cfg=vision, quick_gelu=spec.quick_gelu,
                                   cast_dtype=None)
    import timm

    arch = dict(embed_dim=spec.width, depth=spec.layers, num_heads=spec.heads, patch_size=spec.patch_size)
    if spec.timm_name.startswith("eva02_large") and spec.overridden:
        arch["ref_feat_shape"] = (spec.grid, spec.grid)  # rotary table of the (smaller) grid
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=spec.image_size, **arch)


def _embed_dim(spec: BackboneSpec) -> int:
    return spec.embed_dim or int(model_config(spec.name)["embed_dim"])


def materialise(module: nn.Module, dtype: torch.dtype, buffer_dtype: torch.dtype, device) -> None:
    """Replace meta parameters by uninitialised ones of `dtype` on `device`; move buffers."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device=device, dtype=buffer_dtype if b.is_floating_point() else b.dtype)


@torch.no_grad()
def random_init(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic random init in place, in the storage precision (no fp32 copy).

    Modules with a `reset_parameters` get PyTorch's default init; other parameters: biases zero,
    everything else N(0, std). Random backbones only serve tests, demos and benchmarks.
    """
    done = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            own = list(m.parameters(recurse=False))
            if callable(reset) and own:
                reset()
                done.update(id(p) for p in own)
                if isinstance(m, nn.MultiheadAttention):  # it also initialises out_proj
                    done.update(id(p) for p in m.out_proj.parameters())
        for name, p in module.named_parameters():
            if id(p) in done:
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


# ---------------------------------------------------------------------------- weight loading
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "model_ema")


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
        raise UserError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    for _ in range(3):
        if isinstance(sd, dict):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is not None:
                sd = inner
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"weights file {path} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _tower_keys(sd: Dict[str, torch.Tensor], spec: BackboneSpec, tower: nn.Module) -> Dict[str, torch.Tensor]:
    """Keys relative to the library tower (open_clip ViT names, timm Eva names)."""
    if spec.family == "vit":
        for prefix in ("visual.", ""):
            if prefix + "conv1.weight" in sd:
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        raise UserError("weights file holds no open_clip ViT vision tower (no 'visual.conv1.weight')")
    for prefix in ("visual.trunk.", "trunk."):  # open_clip's TimmModel layout: timm names under a prefix
        if prefix + "pos_embed" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    from timm.models.eva import checkpoint_filter_fn

    # EVA-CLIP's own layout (visual.blocks.N.attn.q_proj...): timm knows how to convert it.
    return checkpoint_filter_fn(sd, tower)


_STEM_KEYS = {
    "vit": {"conv1.weight": "patch_weight", "class_embedding": "class_embedding",
            "positional_embedding": "positional_embedding", "ln_pre.weight": "norm_weight", "ln_pre.bias": "norm_bias"},
    "eva": {"patch_embed.proj.weight": "patch_weight", "patch_embed.proj.bias": "patch_bias",
            "cls_token": "class_embedding", "pos_embed": "positional_embedding"},
}


def _ours(key: str, family: str) -> Optional[str]:
    """Tower-relative key -> key in FrozenBackbone, or None when we do not keep it."""
    stem = _STEM_KEYS[family].get(key)
    if stem is not None:
        return "stem." + stem
    if family == "vit":
        if key.startswith("transformer.resblocks."):
            return "blocks." + key[len("transformer.resblocks."):]
        if key.startswith("ln_post."):
            return "final_norm." + key[len("ln_post."):]
        if key == "proj":
            return "proj.weight"
        return None
    if key.startswith("blocks."):
        return key
    if key.startswith("norm."):
        return "final_norm." + key[len("norm."):]
    return None


def _resize_pos(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Resample an absolute position embedding (class token first) to another grid."""
    from timm.layers import resample_abs_pos_embed

    squeeze = value.dim() == 2
    v = value.unsqueeze(0) if squeeze else value
    old = int(round((v.shape[1] - 1) ** 0.5))
    new = int(round((target[-2] - 1) ** 0.5))
    v = resample_abs_pos_embed(v.float(), new_size=(new, new), old_size=(old, old), num_prefix_tokens=1)
    return v.squeeze(0) if squeeze else v


@torch.no_grad()
def load_weights(backbone: FrozenBackbone, tower: nn.Module, path: str) -> None:
    """Copy a local checkpoint's vision tower into the backbone, tensor by tensor, casting."""
    sd = read_checkpoint(path)
    if any(k.startswith("backbone.") for k in sd):  # our own format (convert-official, exports)
        ours = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        ours = {}
        for k, v in _tower_keys(sd, backbone.spec, tower).items():
            name = _ours(k, backbone.spec.family)
            if name is not None:
                ours[name] = v
    targets = {k: v for k, v in backbone.state_dict(keep_vars=True).items() if not k.startswith("adapters.")}
    missing = [k for k in targets if k not in ours and isinstance(targets[k], nn.Parameter)]
    if missing:
        raise UserError(f"weights file {path} lacks {len(missing)} tensors of {backbone.spec.name}'s vision tower "
                        f"(e.g. {missing[0]}); is it a checkpoint of that model?")
    for k, target in targets.items():
        if k not in ours:
            continue
        value = ours[k]
        if value.shape != target.shape:
            if k == "stem.positional_embedding" and value.numel() // value.shape[-1] > 1:
                value = _resize_pos(value, target.shape)
            if value.shape != target.shape:
                raise UserError(f"weights file {path}: {k} has shape {tuple(value.shape)}, the model needs "
                                f"{tuple(target.shape)} (check model.backbone.name and its overrides)")
        target.data.copy_(value)
    backbone._fingerprint.update(weights=os.path.abspath(path), seed=None)


# ------------------------------------------------------------------------------------ entry
def resolve_taps(layers_cfg, num_layers: int, variant: str) -> List[int]:
    """`model.side.layers` -> sorted 0-based block indices feeding side blocks."""
    if isinstance(layers_cfg, str):
        if layers_cfg == "auto":
            layers_cfg = "every_other" if variant == "eva" else "all"
        if layers_cfg == "all":
            return list(range(num_layers))
        if layers_cfg == "every_other":  # after blocks 1, 3, 5, ... as the reference's EVA model
            return list(range(1, num_layers, 2))
        raise UserError(f"config key 'model.side.layers' is {layers_cfg!r}; allowed: auto, all, every_other or a list")
    taps = sorted(set(int(i) for i in layers_cfg))
    if not taps or taps[-1] >= num_layers:
        raise UserError(f"config key 'model.side.layers' {list(layers_cfg)}: the backbone has blocks 0..{num_layers - 1}")
    return taps


def build_backbone(spec: BackboneSpec, taps: Sequence[int], *, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
                   weights: str = "", seed: int = 0, device="cpu", trainable: bool = False,
                   grad_through: bool = False, keep_final_norm: bool = False, keep_proj: bool = False,
                   tap_dtype: Optional[torch.dtype] = None) -> FrozenBackbone:
    """Build on meta, materialise in `storage_dtype` on `device` (unless device is meta), load or init."""
    with parameters_on_meta():
        tower = build_tower(spec)
    backbone = FrozenBackbone(spec, tower, taps, storage_dtype, compute_dtype, trainable=trainable,
                              grad_through=grad_through, keep_final_norm=keep_final_norm, keep_proj=keep_proj,
                              tap_dtype=tap_dtype)
    if str(device) == "meta":
        for p in backbone.parameters():
            p.requires_grad_(trainable)
        return backbone
    # Tower modules the wrapper does not keep (e.g. the head) stay on meta and go away with `tower`.
    materialise(backbone, storage_dtype, compute_dtype, device)
    if weights:
        load_weights(backbone, tower, weights)
    else:
        random_init(backbone, seed)
        backbone._fingerprint.update(weights="random", seed=int(seed))
    for p in backbone.parameters():
        p.requires_grad_(trainable)
    backbone.train(False)
    backbone.install_compute_hooks()
    return backbone
