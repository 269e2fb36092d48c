"""Building the frozen backbone: the library tower on the `meta` device, materialised directly in
the storage precision (EVA02-E-14, 4.35 B parameters, never exists in fp32), then loaded from a
local checkpoint or randomly initialised."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from side4video.model.spec import BackboneSpec, embed_dim
from side4video.model.tower import FrozenBackbone
from side4video.model.weights import WeightSource


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


def build_tower(spec: BackboneSpec, with_head: bool = False) -> nn.Module:
    """The library's vision tower (random init, no downloads); call under a device context.

    `with_head`: EVA towers get timm's head as the CLIP projection (open_clip's layout for them).
    """
    if spec.family == "vit":
        from open_clip.model import _build_vision_tower

        vision = dict(
            spec.vision_cfg,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            width=spec.width,
            layers=spec.layers,
            head_width=spec.width // spec.heads,
            patch_dropout=0.0,
            output_tokens=False,
        )
        # cast_dtype=None: norms compute in their input's dtype (fp32 on CPUs, half on GPUs).
        return _build_vision_tower(
            embed_dim=embed_dim(spec), vision_cfg=vision, quick_gelu=spec.quick_gelu, cast_dtype=None
        )
    import timm

    arch = dict(embed_dim=spec.width, depth=spec.layers, num_heads=spec.heads, patch_size=spec.patch_size)
    if spec.timm_name.startswith("eva02_large") and spec.overridden:
        arch["ref_feat_shape"] = (spec.grid, spec.grid)  # rotary table of the (smaller) grid
    return timm.create_model(
        spec.timm_name,
        pretrained=False,
        num_classes=embed_dim(spec) if with_head else 0,
        img_size=spec.image_size,
        **arch,
    )


def materialise(module: nn.Module, dtype: torch.dtype, buffer_dtype: torch.dtype, device) -> None:
    """Replace meta parameters by uninitialised ones of `dtype` on `device`; move buffers."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=dtype, device=device), requires_grad=p.requires_grad
                )
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device=device, dtype=buffer_dtype if b.is_floating_point() else b.dtype)


def sincos_position_embedding(rows: int, dim: int, temperature: float = 100.0) -> torch.Tensor:
    """(rows, dim) fixed 2-D sine-cosine position codes for a class token (row 0, zeros) and a square
    grid of rows - 1 patches (the MAE/timm form; a low temperature so a small grid's codes differ)."""
    grid = int(round(math.sqrt(rows - 1)))
    if grid * grid != rows - 1 or dim % 4:
        raise ValueError(f"no 2-D position code for {rows} rows x {dim} channels")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    ay, ax = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    codes = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), codes]).float()


@torch.no_grad()
def random_init(module: nn.Module, std: float = 0.02, grid_positions: bool = False) -> None:
    """Random init in place from the global RNG, in the storage precision (no fp32 copy).

    Modules with a `reset_parameters` get PyTorch's default init; other parameters: biases zero,
    everything else N(0, std). Random backbones only serve tests, demos and benchmarks.

    With `grid_positions` (image towers) the patch position embedding gets 2-D sine-cosine codes
    at the scale of the patch tokens instead: a pretrained ViT's tokens say where they are, and
    N(0, 0.02) codes drown under the patch content, so a side network over a random backbone could
    hardly learn position-dependent motion (rotation, zoom). The RNG stream is drawn the same.
    """
    done = set()
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
            if grid_positions and name.split(".")[-1] in ("positional_embedding", "pos_embed"):
                p.copy_(sincos_position_embedding(p.shape[-2], p.shape[-1]).view(p.shape))


def build_backbone(
    spec: BackboneSpec,
    taps: Sequence[int],
    *,
    storage_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    weights: str = "",
    convert_weights: bool = False,
    fp32_blocks: Sequence[int] = (),
    seed: int = 0,
    device="cpu",
    trainable: bool = False,
    grad_through: bool = False,
    keep_final_norm: bool = False,
    keep_proj: bool = False,
    tap_dtype: Optional[torch.dtype] = None,
    place_unit: Optional[Callable[[nn.Module], None]] = None,
) -> FrozenBackbone:
    """Build on meta, then unit by unit (stem, each block, final norm): materialise in
    `storage_dtype` on `device`, load from `weights` or randomly initialise (one RNG stream from
    `seed`, the same whatever happens to the units), then `place_unit(unit)`: e.g. ZeRO-3
    partitioning, so that only one unit is ever whole in this process. `device="meta"` only
    sets the dtypes (planning). A half-precision checkpoint is stored in the other half
    precision only with `convert_weights` (model/weights.py), and then says how many values changed."""
    with parameters_on_meta():
        tower = build_tower(spec, with_head=keep_proj)
    backbone = FrozenBackbone(
        spec,
        tower,
        taps,
        storage_dtype,
        compute_dtype,
        trainable=trainable,
        grad_through=grad_through,
        keep_final_norm=keep_final_norm,
        keep_proj=keep_proj,
        tap_dtype=tap_dtype,
        fp32_blocks=fp32_blocks,
    )
    # Tower modules the wrapper does not keep (e.g. the head) stay on meta and go away with `tower`.
    if str(device) == "meta":
        materialise(backbone, storage_dtype, compute_dtype, device)
    else:
        source = WeightSource(backbone, tower, weights, storage_dtype, convert=convert_weights) if weights else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, unit in backbone.named_units():
                materialise(unit, storage_dtype, compute_dtype, device)
                if source is not None:
                    source.load(name, unit)
                else:
                    random_init(unit, grid_positions=True)
                for p in unit.parameters():
                    p.requires_grad_(trainable)
                if place_unit is not None:
                    place_unit(unit)
        materialise(backbone, storage_dtype, compute_dtype, device)  # buffers outside the units
        if source is not None:
            source.report()
        if weights:
            backbone._fingerprint.update(weights=os.path.abspath(weights), seed=None)
            if source.converted:  # the stored bits are the file's rounded to the other half precision
                backbone._fingerprint["converted_to"] = str(storage_dtype).replace("torch.", "")
        else:
            backbone._fingerprint.update(weights="random", seed=int(seed))
    for p in backbone.parameters():
        p.requires_grad_(trainable)
    backbone.train(False)
    backbone.install_compute_hooks()
    return backbone
