"""The frozen image backbone as a module: stem -> blocks -> final norm, built from a library tower.

open_clip builds the ViT towers and timm the EVA towers (open_clip's EVA configs name a timm
model); `FrozenBackbone` only regroups their modules into a uniform layout so that the token tensor
after every block, `(frames, 1 + N, D)`, can be tapped, and so that every unit whose weights are
needed at once (stem, each block, final norm) is a module that is *called*: DeepSpeed ZeRO-3
gathers a module's parameters in its forward hooks, and our CPU upcast hooks work the same way.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from side4video.errors import UserError
from side4video.model.spec import BackboneSpec


class Stem(nn.Module):
    """Patch embedding, class token, absolute position embedding, optional pre-norm (+ EVA's rotary table).

    Holds its weights as direct parameters (not in child modules) so that one forward hook sees
    them all: ZeRO-3 gathers a module's own parameters when it is called, and so do our upcast
    hooks. Built from the library tower's modules; the maths is the libraries' own.
    """

    def __init__(
        self,
        patch: nn.Conv2d,
        class_embedding: nn.Parameter,
        positional_embedding: nn.Parameter,
        norm: Optional[nn.Module] = None,
        rope: Optional[nn.Module] = None,
        grid_size=None,
    ):
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
            rope = (
                self.rope.get_embed() if hasattr(self.rope, "feat_shape") else self.rope.get_embed(shape=self.grid_size)
            )
        return x, rope


def vit_stem(tower: nn.Module) -> Stem:
    """open_clip VisionTransformer: conv1 (no bias), class_embedding, positional_embedding, ln_pre."""
    return Stem(tower.conv1, tower.class_embedding, tower.positional_embedding, tower.ln_pre)


def eva_stem(tower: nn.Module) -> Stem:
    """timm Eva: patch_embed.proj, cls_token, pos_embed (covering the class token), rope, norm_pre."""
    if (
        tower.no_embed_class
        or tower.reg_token is not None
        or tower.cls_token is None
        or tower.pos_embed is None
        or not isinstance(tower.patch_embed.norm, nn.Identity)
        or tower.dynamic_img_size
    ):
        raise UserError("EVA backbone: only towers with a class token and a position embedding over it are supported")
    return Stem(
        tower.patch_embed.proj,
        tower.cls_token,
        tower.pos_embed,
        tower.norm_pre,
        tower.rope,
        tower.patch_embed.grid_size,
    )


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
    """The tower's output projection, kept only where it is used (retrieval): open_clip ViTs'
    `x @ proj`, or timm EVA's `head` Linear (weight (E, D) and bias), cast on the fly."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


# ------------------------------------------------------------------------------- the wrapper
class FrozenBackbone(nn.Module):
    """stem -> blocks (optionally each preceded by an adapter) -> taps; final norm on request.

    `forward(frames)` returns the token tensors `(frames, 1 + N, D)` after the tapped blocks. With
    a frozen backbone it runs without autograd, and taps are cast to `tap_dtype` if given (the
    storage precision, for taps a side network keeps).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        tower: nn.Module,
        taps: Sequence[int],
        storage_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        trainable: bool = False,
        grad_through: bool = False,
        keep_final_norm: bool = False,
        keep_proj: bool = False,
        tap_dtype: Optional[torch.dtype] = None,
        fp32_blocks: Sequence[int] = (),
    ):
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
        self.fp32_blocks = sorted(set(int(i) for i in fp32_blocks))
        if self.fp32_blocks and (self.fp32_blocks[0] < 0 or self.fp32_blocks[-1] >= spec.layers):
            raise UserError(
                f"config key 'model.backbone.fp32_blocks': {self.fp32_blocks} are not all blocks of "
                f"{spec.name} (0..{spec.layers - 1})"
            )
        if spec.family == "vit":
            self.stem = vit_stem(tower)
            self.blocks = tower.transformer.resblocks
            final_norm, proj = tower.ln_post, (Projection(tower.proj) if tower.proj is not None else None)
        else:
            self.stem = eva_stem(tower)
            self.blocks = tower.blocks
            head = getattr(tower, "head", None)  # a Linear when built with the CLIP embedding width
            final_norm, proj = tower.norm, (Projection(head.weight, head.bias) if isinstance(head, nn.Linear) else None)
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
        return [unit for _, unit in self.named_units()]

    def named_units(self) -> List[tuple]:
        """(name in this module, unit) in forward order: stem, blocks.0, ..., final_norm, proj."""
        named = [
            ("stem", self.stem),
            *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
            ("final_norm", self.final_norm),
            ("proj", self.proj),
        ]
        return [(name, unit) for name, unit in named if unit is not None]

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
        fp32 = [self.blocks[i] for i in self.fp32_blocks if self.compute_dtype != torch.float32]
        if self.compute_dtype == self.storage_dtype and not fp32:
            return
        if self.grad_through:
            raise RuntimeError(
                "compute hooks swap weight data and cannot be used when gradients flow through the backbone"
            )
        for unit in (self.stem, *self.blocks):  # final norm and projection cast on the fly
            if any(unit is b for b in fp32):  # fp32 weights, fp32 input, output back in the compute precision
                self._hook_handles.append(unit.register_forward_pre_hook(self._upcast_fp32, with_kwargs=True))
                self._hook_handles.append(unit.register_forward_hook(self._restore_fp32, prepend=True))
            elif self.compute_dtype != self.storage_dtype:
                self._hook_handles.append(unit.register_forward_pre_hook(self._upcast))
                self._hook_handles.append(unit.register_forward_hook(self._restore, prepend=True))

    def _upcast_fp32(self, module: nn.Module, args, kwargs):
        """A block of `fp32_blocks`: its weights and its inputs (tokens, rotary tables) in fp32."""
        self._upcast(module, args, torch.float32)

        def up(v):
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def _restore_fp32(self, module: nn.Module, args, output):
        self._restore(module, args, output)
        return output.to(self.compute_dtype)

    def _upcast(self, module: nn.Module, args, dtype: Optional[torch.dtype] = None) -> None:
        dtype = dtype or self.compute_dtype
        saved = []
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                copy = t.data.to(dtype)
                # The copy's tensor is kept with the stored data until the restore (it lives as
                # long anyway, in the parameter): memory accounting that follows tensors sees it.
                saved.append((t, t.data, copy))
                t.data = copy
        self._saved[id(module)] = saved

    def _restore(self, module: nn.Module, args, output) -> None:
        for t, data, _ in self._saved.pop(id(module), ()):
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
        fp["architecture"] = {
            k: getattr(self.spec, k) for k in ("width", "layers", "heads", "patch_size", "image_size")
        }
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
