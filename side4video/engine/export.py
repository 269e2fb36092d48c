"""Trained weights outside DeepSpeed's partitioned files: per-checkpoint `trainable.safetensors`,
and the exported model (`model.safetensors` + `model.json`) used by eval and predict.

Evaluation and prediction read these instead of the ZeRO shards, so they work with any number of
processes. The exported model holds the trained weights; the frozen backbone travels with it only
when it was randomly initialised (no file to load it from), otherwise `model.json` names the
weights file and its fingerprint is checked at load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from safetensors.torch import load_file, save_file

from side4video.config import Config, redacted
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

TRAINABLE = "trainable.safetensors"
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"


def gathered_trainable_state(module: torch.nn.Module, zero_stage: int) -> Dict[str, torch.Tensor]:
    """The model's trainable state as full CPU tensors (collective under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.trainable_state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.trainable_state_dict().items()}


def _save(state: Dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or non-contiguous storage
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def write_trainable(engine, checkpoint_dir: Path, zero_stage: int, is_main: bool) -> None:
    """Collective: every rank joins the gather; rank 0 writes."""
    state = gathered_trainable_state(engine.module, zero_stage)
    if is_main:
        _save(state, Path(checkpoint_dir) / TRAINABLE)


def export_model(
    module: torch.nn.Module,
    cfg: Config,
    out_dir: Path,
    class_names: Sequence[str],
    zero_stage: int,
    is_main: bool,
    fingerprint: Dict[str, Any],
) -> None:
    """Collective: write OUT/model.safetensors + OUT/model.json."""
    state = gathered_trainable_state(module, zero_stage)
    with_backbone = not cfg.model.backbone.weights
    if with_backbone:  # random-init frozen towers travel with the export: there is no file to load them from
        for name, tower in module.frozen_towers().items():
            state.update(_tower_state(name, tower, zero_stage))
    if not is_main:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(state, out_dir / MODEL_FILE)
    meta = {
        "format": "side4video-export-1",
        "config": redacted(cfg),
        "class_names": list(class_names),
        "backbone": fingerprint,
        "contains_backbone": with_backbone,
    }
    (out_dir / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log.info("exported %s", out_dir)


def _tower_state(name: str, tower: torch.nn.Module, zero_stage: int) -> Dict[str, torch.Tensor]:
    """A frozen tower's full tensors under its attribute name (collective under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(tower.parameters()), modifier_rank=None, enabled=zero_stage == 3):
        return {f"{name}.{k}": v.detach().cpu().clone() for k, v in tower.state_dict().items()}


def read_export_meta(export_dir: str | Path) -> Dict[str, Any]:
    path = Path(export_dir) / MODEL_JSON
    if not path.is_file():
        raise UserError(f"{export_dir} is not an exported model (no {MODEL_JSON})")
    return json.loads(path.read_text())


def export_config(export_dir: str | Path, overrides: Sequence[str] = ()):
    """The config an export was trained with, as a typed config (plus inference overrides)."""
    from side4video.config import load_config

    stored = read_export_meta(export_dir)["config"]
    stored["data"].pop("s3", None)  # redacted secrets: inference falls back to the environment
    return load_config(None, overrides, base=stored)


def load_trained_state(source: str | Path, fingerprint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Trained weights from an export folder, a step_N checkpoint, a checkpoints folder or a run dir."""
    from side4video.engine import checkpoint

    path = Path(source)
    if (path / MODEL_FILE).is_file():
        meta = read_export_meta(path)
        if not meta.get("contains_backbone") and meta.get("backbone") != fingerprint:
            raise UserError(f"{path} was trained over another frozen backbone: {meta.get('backbone')} != {fingerprint}")
        return load_file(str(path / MODEL_FILE))
    if (path / TRAINABLE).is_file():
        return load_file(str(path / TRAINABLE))
    if (path / "export" / MODEL_FILE).is_file():
        return load_trained_state(path / "export", fingerprint)
    found = checkpoint.resolve(str(path), "")
    if found is not None and (found[0] / found[1] / TRAINABLE).is_file():
        return load_file(str(found[0] / found[1] / TRAINABLE))
    raise UserError(f"checkpoint={source}: no exported model, {TRAINABLE} or checkpoints found there")


def apply_trained_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Trainable keys through the model's own loader; frozen backbone keys (exports of randomly
    initialised backbones) straight into the module."""
    trainable = set(model.trainable_state_dict())
    frozen = {k: v for k, v in state.items() if k not in trainable}
    try:
        model.load_trainable_state_dict({k: v for k, v in state.items() if k in trainable})
    except KeyError as e:
        raise UserError(f"trained weights do not fit the configured model: {e.args[0]}") from None
    if frozen:
        expected = set(model.state_dict())
        unexpected = sorted(k for k in frozen if k not in expected)
        if unexpected:
            raise UserError(f"trained weights do not fit this model: unexpected keys {unexpected[:3]}...")
        params = [p for tower in model.frozen_towers().values() for p in tower.parameters() if hasattr(p, "ds_id")]
        if params:  # ZeRO-3 partitioned at build: gather, let rank 0 write, partition again
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                model.load_state_dict(frozen, strict=False)
        else:
            model.load_state_dict(frozen, strict=False)
