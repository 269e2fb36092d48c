"""`side4video bench fp16`: does an fp16-stored EVA ViT-E/14 compute without overflow?

EVA02-E-14's vision tower (width 1792, 64 blocks, 224 px: 257 tokens) is built on `meta` and its
blocks are materialised one at a time in fp16 with the same random init a random backbone gets
(model/backbone.py: PyTorch's default init for modules that have one, N(0, 0.02) otherwise), so
at most one block (136 MB in fp16, with a 272 MB fp32 copy) exists at once. The stem and every
block compute in fp16 from fp16 weights and an fp16 residual stream, as on a GPU (torch's CPU
fp16 kernels, a few seconds per block); each block is also computed in fp32 from the same input,
for the deviation fp16 brings. Recorded per block: the largest absolute value of every tensor a
module inside it produces (q/k/v projections, attention output, MLP hidden layer, norms) and of
the block output (the residual stream), against fp16's largest finite value 65504.

Random weights are not a checkpoint: a pretrained ViT can carry outlier features far above these
(README "fp16 and overflow" says what to do then). `--quick`: 4 blocks at 56 px.
Writes OUT/fp16.json and OUT/fp16.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from side4video.errors import UserError

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
NAME = "EVA02-E-14"


def _leaf_maxima(block: nn.Module) -> tuple:
    """Forward hooks recording max |output| per leaf module of `block`: (maxima dict, handles)."""
    maxima: Dict[str, float] = {}
    handles = []
    for name, module in block.named_modules():
        if list(module.children()):
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                maxima[name] = max(maxima.get(name, 0.0), float(out.detach().abs().max()))

        handles.append(module.register_forward_hook(hook))
    return maxima, handles


@torch.no_grad()
def block_maxima(
    name: str = NAME, image_size: int = 224, layers: Optional[int] = None, frames: int = 1, seed: int = 0
) -> Dict:
    """Per block: max |activation| anywhere inside it and of its output, the residual stream in fp16."""
    from side4video.model.backbone import build_tower, materialise, parameters_on_meta, random_init
    from side4video.model.spec import resolve_spec
    from side4video.model.tower import FrozenBackbone

    overrides = {"layers": layers} if layers else {}
    spec = resolve_spec(name, image_size, **overrides)
    if spec.family != "eva":
        raise UserError(f"bench fp16: {name} is not an EVA backbone")
    with parameters_on_meta():
        tower = build_tower(spec)
    backbone = FrozenBackbone(spec, tower, [spec.layers - 1], torch.float16, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(frames, 3, image_size, image_size, generator=generator)  # normalised pixels: N(0, 1)
    rows: List[Dict] = []
    torch.manual_seed(seed)
    half = torch.float16
    materialise(backbone.stem, half, half, "cpu")  # buffers (the rotary tables) in fp16 too, as on a GPU
    random_init(backbone.stem, grid_positions=True)
    x, rope = backbone.stem(images.to(half))
    for i, block in enumerate(backbone.blocks):
        t0 = time.perf_counter()
        materialise(block, half, half, "cpu")
        random_init(block)
        maxima, handles = _leaf_maxima(block)
        out = block(x) if rope is None else block(x, rope=rope)  # fp16 in, fp16 weights, fp16 out
        for h in handles:
            h.remove()
        maxima["(block output)"] = float(out.float().abs().max())
        # the same block in fp32 from the same input: how far fp16 compute lands from it
        exact = _upcast(block)
        reference = exact(x.float()) if rope is None else exact(x.float(), rope=rope.float())
        deviation = float((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        top = max(maxima, key=maxima.get)
        rows.append(
            {
                "block": i,
                "max_abs_inside": maxima[top],
                "where": top,
                "max_abs_output": maxima["(block output)"],
                "fraction_of_fp16_max": maxima[top] / FP16_MAX,
                "max_deviation_vs_fp32": deviation,  # max |fp16 - fp32| of the output over its max |fp32|
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        if not torch.isfinite(out).all():
            rows[-1]["overflow"] = True
        x = out  # the residual stream in fp16, as a GPU holds it
        backbone.blocks[i] = nn.Identity()  # free the block: one at a time
        del exact, block
    worst = max(rows, key=lambda r: r["max_abs_inside"])
    return {
        "backbone": name,
        "width": spec.width,
        "layers": spec.layers,
        "image_size": image_size,
        "tokens": 1 + spec.num_patches,
        "frames": frames,
        "weights": "random init (model/backbone.py random_init), fp16 storage",
        "compute": "fp16 (stem, every block, the residual stream), beside each block in fp32 from the same input",
        "fp16_max": FP16_MAX,
        "blocks": rows,
        "max_abs": worst["max_abs_inside"],
        "max_abs_block": worst["block"],
        "max_abs_where": worst["where"],
        "headroom": FP16_MAX / worst["max_abs_inside"],
        "max_deviation_vs_fp32": max(r["max_deviation_vs_fp32"] for r in rows),
        "overflow": any(r.get("overflow") or r["max_abs_inside"] > FP16_MAX for r in rows),
    }


def _upcast(module: nn.Module) -> nn.Module:
    """An fp32 copy of a module whose weights are stored in fp16 (values exactly those of fp16)."""
    import copy

    return copy.deepcopy(module).float()


def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    if config or overrides:
        raise UserError("bench fp16 takes no config or overrides: it measures EVA02-E-14 at 224 px")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = block_maxima(image_size=56 if quick else 224, layers=4 if quick else None)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "fp16.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_markdown(result, out_dir / "fp16.md")
    verdict = "OVERFLOW" if result["overflow"] else f"{result['headroom']:.0f}x headroom"
    print(
        f"{result['backbone']} {result['image_size']} px, {result['layers']} blocks: largest |activation| "
        f"{result['max_abs']:.1f} (block {result['max_abs_block']}, {result['max_abs_where']}), fp16 max 65504: "
        f"{verdict}",
        flush=True,
    )
    return result


def _write_markdown(r: Dict, path: Path) -> None:
    lines = [
        f"# fp16 activations of {r['backbone']} ({r['layers']} blocks, {r['image_size']} px, {r['tokens']} tokens)",
        "",
        f"Weights: {r['weights']}; compute: {r['compute']}. fp16's largest finite value: 65504.",
        "",
        "| block | max abs inside | where | max abs output | / 65504 | fp16 vs fp32 (max dev / max) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["blocks"]:
        lines.append(
            f"| {row['block']} | {row['max_abs_inside']:.2f} | {row['where']} | {row['max_abs_output']:.2f} | "
            f"{row['fraction_of_fp16_max']:.2e} | {row['max_deviation_vs_fp32']:.1e} |"
        )
    lines += [
        "",
        f"Largest: {r['max_abs']:.2f} in block {r['max_abs_block']} ({r['max_abs_where']}): "
        + ("overflow." if r["overflow"] else f"{r['headroom']:.0f}x below fp16's maximum."),
    ]
    path.write_text("\n".join(lines) + "\n")
