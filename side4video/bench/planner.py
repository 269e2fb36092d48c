"""`side4video plan`: parameter counts and weight memory of a config, without allocating anything.

The model is built on the `meta` device (EVA02-E-14 included, in about a second), so the counts
are those of the real modules, not a formula. Memory figures cover weights, gradients and
optimizer state; activation memory is measured by `side4video bench memory`.
"""

from __future__ import annotations

import time
from typing import Dict

import torch

from side4video.model.backbone import DTYPES
from side4video.model.build import build_model_on_meta, resolve_precisions

_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan(cfg) -> Dict:
    """One JSON-ready dict: architecture, tap layers, parameter counts, weight memory (bytes)."""
    t0 = time.perf_counter()
    model = build_model_on_meta(cfg)
    method = cfg.model.method
    storage, compute = resolve_precisions(cfg, method)
    backbone, spec = model.backbone, model.backbone.spec
    counts = model.parameter_counts()
    trainable = counts["trainable_params"]
    train_dtype = DTYPES[cfg.deepspeed.precision]
    frames = int(cfg.data.frames)
    n_bb = counts["backbone_params"]

    memory = {
        "backbone_weights_bytes": n_bb * _itemsize(storage),
        "backbone_weights_bytes_by_precision": {"fp32": n_bb * 4, "bf16": n_bb * 2, "fp16": n_bb * 2},
        # trained parameters (those of a 'full' backbone included): weights and gradients in the
        # DeepSpeed precision, plus fp32 master weights under mixed precision, plus optimizer state
        "trainable_weights_bytes": trainable * _itemsize(train_dtype),
        "gradients_bytes": trainable * _itemsize(train_dtype),
        "master_weights_bytes": trainable * 4 if train_dtype != torch.float32 else 0,
        "optimizer_state_bytes": trainable * (8 if cfg.train.optimizer == "adamw" else 4),
    }
    if method == "side4video":
        # The half-precision taps are what the side network keeps for its backward.
        tap_bytes = len(backbone.taps) * frames * (1 + spec.num_patches) * spec.width * _itemsize(storage)
        memory["kept_taps_bytes_per_clip"] = tap_bytes
    if method == "full" and storage != torch.float32:
        memory["backbone_weights_bytes"] = n_bb * 4
    memory["weights_total_bytes"] = (memory["backbone_weights_bytes"] + memory["trainable_weights_bytes"]
                                     + memory["gradients_bytes"] + memory["master_weights_bytes"]
                                     + memory["optimizer_state_bytes"])
    if method == "full":  # its trained weights are the backbone's: do not count them twice
        memory["weights_total_bytes"] -= memory["backbone_weights_bytes"]

    side = model.side
    report = {
        "method": method,
        "backbone": spec.name,
        "backbone_family": spec.family,
        "backbone_width": spec.width,
        "backbone_layers": spec.layers,
        "patch_size": spec.patch_size,
        "image_size": spec.image_size,
        "patches_per_frame": spec.num_patches,
        "frames": frames,
        "storage_precision": _NAMES[storage],
        "compute_precision": _NAMES[compute],
        "side_variant": side.variant if side is not None else None,
        "side_dim": side.dim if side is not None else None,
        "side_blocks": len(side.blocks) if side is not None else 0,
        "tap_layers": list(backbone.taps) if side is not None else [],
        **counts,
        "memory": memory,
        "plan_seconds": round(time.perf_counter() - t0, 3),
    }
    return report


def _millions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _layers(taps) -> str:
    if len(taps) > 6:
        step = taps[1] - taps[0]
        if all(b - a == step for a, b in zip(taps, taps[1:])):
            return f"{taps[0]}, {taps[1]}, ..., {taps[-1]} ({len(taps)})"
    return ", ".join(str(t) for t in taps)


def format_plan(report: Dict) -> str:
    """The plan as an aligned text table."""
    m = report["memory"]
    rows = [
        ("method", report["method"]),
        ("backbone", f"{report['backbone']} ({report['backbone_family']}): {report['backbone_layers']} blocks, width "
                     f"{report['backbone_width']}, patch {report['patch_size']}"),
        ("input", f"{report['frames']} frames x {report['image_size']} px ({report['patches_per_frame']} patches/frame)"),
        ("precision", f"storage {report['storage_precision']}, compute {report['compute_precision']}"),
    ]
    if report["side_blocks"]:
        rows += [("side network", f"{report['side_variant']} variant, d={report['side_dim']}, {report['side_blocks']} blocks"),
                 ("tap layers", _layers(report["tap_layers"]))]
    rows += [
        ("backbone params", _millions(report["backbone_params"])),
        ("side params", _millions(report["side_params"])),
    ]
    if report.get("adapter_params"):
        rows.append(("adapter params", _millions(report["adapter_params"])))
    rows += [
        ("head params", f"{report['head_params']:,}"),
        ("trainable params", _millions(report["trainable_params"])),
        ("backbone weights", f"{_gib(m['backbone_weights_bytes'])} ({report['storage_precision']}; fp32 would be "
                             f"{_gib(m['backbone_weights_bytes_by_precision']['fp32'])})"),
        ("trained weights+grads+optim", _gib(m["trainable_weights_bytes"] + m["gradients_bytes"] + m["master_weights_bytes"]
                                            + m["optimizer_state_bytes"])),
    ]
    if "kept_taps_bytes_per_clip" in m:
        rows.append(("kept taps per clip", _gib(m["kept_taps_bytes_per_clip"])))
    rows.append(("weights total", _gib(m["weights_total_bytes"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
