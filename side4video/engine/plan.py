"""The plan of a config (`side4video plan`): parameter counts and weight memory, without allocating anything.

The model is built on the `meta` device (EVA02-E-14 included, in about a second), so the counts
are those of the real modules, not a formula. Memory figures cover weights, gradients and
optimizer state; activation memory is measured by `side4video bench memory`.
"""

from __future__ import annotations

import time
from typing import Dict

import torch

from side4video.engine.factory import model_on_meta, retrieval_model_on_meta, run_precision
from side4video.precision import dtype_name, itemsize


def plan(cfg) -> Dict:
    """One JSON-ready dict: architecture, tap layers, parameter counts, weight memory (bytes)."""
    t0 = time.perf_counter()
    precision = run_precision(cfg)
    retrieval = cfg.task == "retrieval"
    model = retrieval_model_on_meta(cfg, precision) if retrieval else model_on_meta(cfg, precision)
    method = cfg.model.method
    storage, compute, train_dtype = precision.storage, precision.compute, precision.train
    backbone, spec = model.backbone, model.backbone.spec
    counts = model.parameter_counts()
    trainable = counts["trainable_params"]
    frames = int(cfg.data.frames)
    n_bb = counts["backbone_params"]

    memory = {
        "backbone_weights_bytes": n_bb * itemsize(storage),
        "backbone_weights_bytes_by_precision": {"fp32": n_bb * 4, "bf16": n_bb * 2, "fp16": n_bb * 2},
        # trained parameters (those of a 'full' backbone included): weights and gradients in the
        # DeepSpeed precision, plus fp32 master weights under mixed precision, plus optimizer state
        "trainable_weights_bytes": trainable * itemsize(train_dtype),
        "gradients_bytes": trainable * itemsize(train_dtype),
        "master_weights_bytes": trainable * 4 if train_dtype != torch.float32 else 0,
        "optimizer_state_bytes": trainable * (8 if cfg.train.optimizer == "adamw" else 4),
    }
    if model.side is not None:
        # The half-precision taps are what the side network keeps for its backward.
        tap_bytes = len(backbone.taps) * frames * (1 + spec.num_patches) * spec.width * itemsize(storage)
        memory["kept_taps_bytes_per_clip"] = tap_bytes
    if retrieval:  # a frozen text tower is stored like the backbone (a trained one counts as trainable)
        text = list(model.text.parameters())
        frozen_text = 0 if text[0].requires_grad else counts["text_params"]
        memory["frozen_text_weights_bytes"] = frozen_text * itemsize(text[0].dtype)
    memory["weights_total_bytes"] = (memory["backbone_weights_bytes"] + memory["trainable_weights_bytes"]
                                     + memory["gradients_bytes"] + memory["master_weights_bytes"]
                                     + memory["optimizer_state_bytes"] + memory.get("frozen_text_weights_bytes", 0))
    if method == "full":  # its trained weights are the backbone's: do not count them twice
        memory["weights_total_bytes"] -= memory["backbone_weights_bytes"]

    side = model.side
    report = {
        "task": cfg.task,
        "method": method,
        "backbone": spec.name,
        "backbone_family": spec.family,
        "backbone_width": spec.width,
        "backbone_layers": spec.layers,
        "patch_size": spec.patch_size,
        "image_size": spec.image_size,
        "patches_per_frame": spec.num_patches,
        "frames": frames,
        "storage_precision": dtype_name(storage),
        "compute_precision": dtype_name(compute),
        "side_variant": side.variant if side is not None else None,
        "side_dim": side.dim if side is not None else None,
        "side_blocks": len(side.blocks) if side is not None else 0,
        "tap_layers": list(backbone.taps) if side is not None else [],
        **counts,
        "memory": memory,
        "plan_seconds": round(time.perf_counter() - t0, 3),
    }
    return report
