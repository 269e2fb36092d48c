"""The precision policy: which dtype every part of a run uses, decided in one place.

- storage: the frozen backbone's weights at rest (`model.backbone.precision`), also the dtype of
  the taps a side network keeps for its backward;
- compute: what the backbone's blocks compute in. On GPUs the storage precision; on CPU hosts
  fp32, because half-precision matmuls there are 10-400x slower (docs/environment.md), one block
  upcast at a time while it runs;
- train: the trained parameters, their gradients and activations (`deepspeed.precision`);
- clips: the video tensors the loader hands over, i.e. what the model's first layers take: the
  backbone's compute precision (`data.dtype` overrides).

Methods that backpropagate through the backbone (`adapter`, `full`) cannot use the upcast hooks
(they swap weight data, which autograd must not see), and DeepSpeed trains them in its own
precision: for them storage = compute = clips = train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from side4video.config import Config
from side4video.errors import UserError

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FROZEN_METHODS = ("side4video", "linear_probe")  # no gradient ever enters the backbone
GRAD_THROUGH_METHODS = ("adapter", "full")  # gradients flow through the backbone's blocks


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES[dtype]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Precision:
    storage: torch.dtype
    compute: torch.dtype
    train: torch.dtype
    clips: torch.dtype

    def describe(self) -> Dict[str, str]:
        return {k: dtype_name(getattr(self, k)) for k in ("storage", "compute", "train", "clips")}


def resolve_precision(
    method: str, *, backbone: str, backbone_compute: str = "auto", train: str = "fp32", clips: str = "auto", cuda: bool
) -> Precision:
    """The policy for one run. Names are 'fp32' | 'bf16' | 'fp16' ('auto' where allowed)."""
    train_dtype = DTYPES[train]
    if method in GRAD_THROUGH_METHODS:
        if backbone_compute not in ("auto", train):
            raise UserError(
                f"model.method={method} backpropagates through the backbone, which then computes in the "
                f"training precision deepspeed.precision={train}; model.backbone.compute_precision="
                f"{backbone_compute} cannot apply (leave it auto)"
            )
        storage = compute = train_dtype
    else:
        storage = DTYPES[backbone]
        if backbone_compute == "auto":
            compute = storage if cuda else torch.float32
        else:
            compute = DTYPES[backbone_compute]
    return Precision(
        storage=storage, compute=compute, train=train_dtype, clips=compute if clips == "auto" else DTYPES[clips]
    )


def precision_from_config(cfg: Config, cuda: bool) -> Precision:
    """The policy of a config (model.method, model.backbone.*, deepspeed.precision, data.dtype)."""
    return resolve_precision(
        cfg.model.method,
        backbone=cfg.model.backbone.precision,
        backbone_compute=cfg.model.backbone.compute_precision,
        train=cfg.deepspeed.precision,
        clips=cfg.data.dtype,
        cuda=cuda,
    )
