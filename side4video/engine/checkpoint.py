"""Checkpoints: trainable state only, written atomically, `latest` moved last, last K kept.

DeepSpeed writes the files (module state without frozen parameters, ZeRO-partitioned optimizer
state, its step counters); the trainer's state (engine/state.py: step, data-stream position, RNG
states, evaluations, fingerprint of the frozen backbone) rides along as client state. What
DeepSpeed does not do, and we do here:
- write into `.tmp-step_N/` and rename to `step_N/` once every rank has finished, then replace
  `latest` (a one-line file) atomically, so a kill at any moment leaves `latest` on a complete one;
- load every file with `torch.load(weights_only=True)` (DeepSpeed's own loader unpickles freely).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as torch_dist

from side4video.engine import relayout
from side4video.engine.collectives import barrier, is_distributed
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

LATEST = "latest"
TAG = re.compile(r"^step_(\d{7,})$")


def _rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


# ------------------------------------------------------------------------- safe deepspeed loads
def _deepspeed_safe_globals() -> list:
    """Non-tensor objects DeepSpeed pickles into its checkpoints, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine) -> None:
    """Make this engine load checkpoint files with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = SafeTorchCheckpointEngine(None)
    engine.checkpoint_engine = safe
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "checkpoint_engine"):
        optimizer.checkpoint_engine = safe


# ---------------------------------------------------------------------------------- directories
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(root: Path) -> Optional[str]:
    """The tag `latest` names, if it names a complete checkpoint."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if TAG.match(tag) and (root / tag).is_dir() else None


def resolve(resume: str, output_dir: str) -> Optional[tuple[Path, str]]:
    """`train.resume` -> (root, tag) to load, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        tag = latest_tag(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / LATEST).is_file():  # a checkpoints/ folder
        tag = latest_tag(path)
        if tag is None:
            raise UserError(f"train.resume: {path}/latest does not name a complete checkpoint")
        return path, tag
    if (path / "checkpoints" / LATEST).is_file():  # a run directory
        return resolve("auto", str(path))
    if path.is_dir() and TAG.match(path.name):
        return path.parent, path.name
    raise UserError(f"train.resume: {resume} is not a run directory, checkpoints folder or step_N checkpoint")


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)  # atomic on POSIX


def _prune(root: Path, keep: int) -> None:
    current = latest_tag(root)
    tags = sorted((p.name for p in root.iterdir() if TAG.match(p.name)), key=lambda t: int(TAG.match(t).group(1)))
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def _commit(root: Path, tmp_tag: str, tag: str) -> None:
    """Rank 0: turn the finished temporary folder into the checkpoint, then move `latest`."""
    final = root / tag
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.rename(root / tmp_tag, final)
    _write_latest(root, tag)


# --------------------------------------------------------------------------------- save / load
@dataclass(frozen=True)
class Saved:
    path: Path
    seconds: Dict[str, float]  # rank 0's: DeepSpeed's files, then the gathered trained state


def save(
    engine, output_dir: str | Path, step: int, client_state: Dict[str, Any], keep: int, layout: Dict[str, int]
) -> Saved:
    """Collective: every rank calls it at the same step. `layout`: the run's ranks, batch and ZeRO
    stage (engine/relayout.py); under ZeRO 1-3 the trained state is also written gathered, so
    that any number of ranks can continue from it."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:07d}"
    tmp_tag = f".tmp-{tag}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    started = time.perf_counter()
    engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
    )
    barrier()
    seconds = {"deepspeed_seconds": time.perf_counter() - started}
    started = time.perf_counter()
    trained = relayout.gather(engine) if layout["zero_stage"] >= 1 else None  # collective
    if _rank() == 0:
        relayout.write_layout(root / tmp_tag, layout)
        if trained is not None:
            torch.save({**trained, "trainer": client_state}, root / tmp_tag / relayout.TRAINED_STATE)
    barrier()  # every rank's shard is on disk before the folder becomes visible
    seconds["trained_state_seconds"] = time.perf_counter() - started
    if _rank() == 0:
        _commit(root, tmp_tag, tag)
        _prune(root, keep)
    barrier()
    log.debug("saved checkpoint %s", root / tag)
    return Saved(root / tag, seconds)


def file_sizes(folder: Path) -> Dict[str, int]:
    """Bytes of a checkpoint's parts: DeepSpeed's files, the gathered trained state, the rest."""
    sizes = {"deepspeed_bytes": 0, "trained_state_bytes": 0, "other_bytes": 0}
    for path in folder.rglob("*"):
        if path.is_file():
            part = "trained_state_bytes" if path.name == relayout.TRAINED_STATE else "other_bytes"
            part = "deepspeed_bytes" if path.suffix == ".pt" and path.name != relayout.TRAINED_STATE else part
            sizes[part] += path.stat().st_size
    return sizes


def load(engine, root: Path, tag: str, world_size: int) -> Dict[str, Any]:
    """Load the trained weights and optimizer state into the engine; return the trainer state
    saved with them (for engine/state.py `TrainerState.load_state_dict`). A ZeRO checkpoint
    written by another number of ranks is restored from its gathered copy (engine/relayout.py)."""
    layout = relayout.read_layout(root / tag)
    if layout and layout["world_size"] != world_size and layout["zero_stage"] >= 1:
        saved = torch.load(root / tag / relayout.TRAINED_STATE, weights_only=True)
        checked = relayout.restore(engine, saved)
        log.info(
            "restored %s/%s written by %d ranks on %d: %d tensors and the step counters "
            "equal the saved ones bit for bit",
            root.name,
            tag,
            layout["world_size"],
            world_size,
            checked,
        )
        return saved["trainer"]
    use_safe_loading(engine)
    path, client = engine.load_checkpoint(
        str(root), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"checkpoint {root / tag} could not be loaded")
    return client
