"""The run's length and its learning-rate schedule, as pure functions of the step.

Steps are optimizer steps (each `train.grad_accum` micro-batches). The schedule is linear warmup
then cosine to `train.min_lr`, as the reference; the loop sets the learning rate of step k
itself before stepping, so a resumed run needs no scheduler state, a skipped (non-finite) step
keeps its place in the schedule, and the first step of a run without warmup uses the configured
rate (DeepSpeed's WarmupCosineLR would start at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from side4video.config import TrainConfig
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int  # optimizer steps per data epoch (its micro-batches // grad_accum)
    total_steps: int
    warmup_steps: int
    grad_accum: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def as_dict(self) -> dict:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "grad_accum": self.grad_accum,
            "epochs": self.epochs,
        }


def run_length(train_cfg: TrainConfig, micro_batches_per_epoch: int) -> RunLength:
    """`train.*` + the loader's batches per epoch -> the step budget. A warmup longer than the run
    is clamped to it, and said."""
    accum = int(train_cfg.grad_accum)
    steps_per_epoch = int(train_cfg.steps_per_epoch) or max(micro_batches_per_epoch // accum, 1)
    total = int(train_cfg.max_steps) or int(train_cfg.epochs) * steps_per_epoch
    if total < 1:
        raise UserError("the run has no step: set train.epochs or train.max_steps to at least 1")
    warmup = int(round(float(train_cfg.warmup_epochs) * steps_per_epoch))
    if warmup > total:
        log.warning(
            "train.warmup_epochs=%s is %d steps, longer than the run's %d: warming up over the whole run",
            train_cfg.warmup_epochs,
            warmup,
            total,
        )
        warmup = total
    return RunLength(steps_per_epoch, total, warmup, accum)


def lr_at(step: int, length: RunLength, peak: float, floor: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `peak` (step `warmup`
    reaches it), then cosine from `peak` down towards `floor` (the last step is just above it)."""
    if step <= length.warmup_steps:
        return peak * step / length.warmup_steps
    decay_steps = max(length.total_steps - length.warmup_steps, 1)
    progress = (step - length.warmup_steps - 1) / decay_steps
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
