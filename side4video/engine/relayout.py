"""Continuing a run on another number of ranks: the layout a checkpoint was written with, the
global batch kept across the change, and a world-size-free copy of the trained state.

DeepSpeed's ZeRO checkpoints (stages 1-3) hold each rank's partition of the fp32 master weights and
of the optimizer state, and its loader refuses another data-parallel world size. DeepSpeed's
universal format needs an offline conversion (ds_to_universal) of every checkpoint; here only the
side network is trained (at most ~183 M parameters), so every save also writes the whole trained
state gathered by parameter name (`trained_state.pt`: fp32 masters, AdamW moments, step counters,
loss scaler), and a resume on another world size scatters it back through DeepSpeed's own
per-parameter accessors (deepspeed.utils.safe_set_full_*), then checks it bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from side4video.config import Config
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

LAYOUT = "layout.json"
TRAINED_STATE = "trained_state.pt"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")
SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


# ------------------------------------------------------------------------------------- layout
def layout_of(cfg: Config, world_size: int) -> Dict[str, int]:
    train = cfg.train
    return {
        "world_size": int(world_size),
        "batch_size": int(train.batch_size),
        "grad_accum": int(train.grad_accum),
        "zero_stage": int(cfg.deepspeed.zero_stage),
    }


def global_batch(layout: Dict[str, int]) -> int:
    """Clips per optimizer step over all ranks (before repeated views)."""
    return layout["world_size"] * layout["batch_size"] * layout["grad_accum"]


def write_layout(folder: Path, layout: Dict[str, int]) -> None:
    (folder / LAYOUT).write_text(json.dumps(layout) + "\n")


def read_layout(folder: Path) -> Optional[Dict[str, int]]:
    """The layout a checkpoint was written with; None for one written before layouts were kept."""
    path = folder / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def keep_global_batch(cfg: Config, saved: Dict[str, int], world_size: int) -> None:
    """A resume on another world size keeps the saved global batch by changing train.grad_accum
    (the step count, schedule and learning rate then mean what they meant); says so in one line.
    `train.keep_global_batch=false` trains on with the configured grad_accum instead."""
    now = layout_of(cfg, world_size)
    if now["world_size"] == saved["world_size"]:
        return
    before, per_micro_step = global_batch(saved), now["world_size"] * now["batch_size"]
    change = f"resuming {saved['world_size']} ranks -> {now['world_size']}"
    if not cfg.train.keep_global_batch:
        log.warning("%s: global batch %d -> %d (train.keep_global_batch=false)", change, before, global_batch(now))
        return
    if before % per_micro_step:
        raise UserError(
            f"{change}: the global batch {before} ({saved['world_size']} x {saved['batch_size']} x "
            f"{saved['grad_accum']}) is not a multiple of {now['world_size']} ranks x train.batch_size="
            f"{now['batch_size']}: choose train.batch_size so that it is, or train.keep_global_batch=false "
            f"to train on with a global batch of {global_batch(now)}"
        )
    accum = before // per_micro_step
    log.warning("%s: grad_accum %d -> %d, global batch %d kept", change, now["grad_accum"], accum, before)
    cfg.train.grad_accum = accum


# ------------------------------------------------------------------------------ trained state
def _trained(engine) -> List[Tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine):
    return engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO optimizer


def _moment_keys(engine) -> List[str]:
    """The optimizer's per-element state (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer)."""
    states = list(_base_optimizer(engine).state.values())
    return sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0) if states else []


def _materialise_optimizer_state(engine) -> None:
    """DeepSpeed's ZeRO optimizers let the torch optimizer create its state at the first step (and
    ZeRO-1/2 link each parameter to its fragment of it only then): take that step now with zero
    gradients at learning rate 0, so that there is state to restore into. Every value it writes
    is overwritten by the restore."""
    zero, base = engine.optimizer, _base_optimizer(engine)
    if base.state:
        return
    rates = [group["lr"] for group in base.param_groups]
    for group in base.param_groups:
        group["lr"] = 0.0
    # With offload_optimizer a flat partition's .grad is DeepSpeed's own (pinned) gradient buffer,
    # which its backward writes into: it is put back afterwards, not dropped.
    if hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3 hands the optimizer one sub-group at a time
        for index, flat in enumerate(zero.fp32_partitioned_groups_flat):
            group = base.param_groups[zero.sub_group_to_group_id[index]]
            own = flat.grad
            group["params"], flat.grad = [flat], torch.zeros_like(flat)
            base.step()
            group["params"], flat.grad = [], own
    else:
        own = [flat.grad for flat in zero.single_partition_of_fp32_groups]
        for flat in zero.single_partition_of_fp32_groups:
            flat.grad = torch.zeros_like(flat)
        base.step()
        for flat, grad in zip(zero.single_partition_of_fp32_groups, own):
            flat.grad = grad
        zero._lazy_init_hp_params_optimizer_state()
    for group, rate in zip(base.param_groups, rates):
        group["lr"] = rate


def _stepped(engine, trained: List[Tuple[str, nn.Parameter]]) -> List[bool]:
    """Collective: for each trained parameter, whether the optimizer holds state for it on every
    rank that owns part of it (torch creates state only for a partition that had a gradient at a
    step; a group that never had one, e.g. an unused parameter, has none)."""
    from side4video.engine.collectives import any_rank

    zero, base = engine.optimizer, _base_optimizer(engine)
    missing = []
    for _, param in trained:
        if hasattr(param, "ds_id"):  # ZeRO-3: the sub-group's flat fp32 partition
            group = zero.grad_position[zero.get_param_id(param)][0]
            missing.append(not base.state.get(zero.fp32_partitioned_groups_flat[group]))
        else:  # ZeRO-1/2: this rank's fragment of it, if it owns one
            mapping = getattr(param, "_hp_mapping", None)
            missing.append(mapping is not None and not getattr(mapping, "optim_fragment", None))
    return [not m for m in any_rank(*missing)] if missing else []


def gather(engine) -> Dict[str, Any]:
    """Collective (ZeRO 1-3): the whole trained state by parameter name, on the CPU of every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    keys, trained = _moment_keys(engine), _trained(engine)
    stepped = _stepped(engine, trained)
    state: Dict[str, Any] = {"fp32": {}, "moments": {key: {} for key in keys}}
    for (name, param), has_state in zip(trained, stepped):
        state["fp32"][name] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for key in keys if has_state else ():  # a parameter the optimizer never stepped has no state yet
            state["moments"][key][name] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    steps = {int(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer partitions disagree on their step count: {sorted(steps)}")
    state["optimizer_step"] = steps.pop() if steps else 0
    state["counters"] = {key: int(getattr(engine, key)) for key in COUNTERS}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    state["loss_scaler"] = {k: float(getattr(scaler, k)) for k in SCALER if hasattr(scaler, k)}
    return state


def restore(engine, saved: Dict[str, Any]) -> int:
    """Collective (ZeRO 1-3): scatter a gathered state into this engine's partitions, the module's
    own (low-precision) weights from the fp32 masters; then gather again and require every tensor
    and counter to equal what was saved, bit for bit. Returns the number of tensors checked."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trained = _trained(engine)
    missing = sorted(set(saved["fp32"]) ^ {name for name, _ in trained})
    if missing:
        raise UserError(f"the checkpoint's trained parameters differ from this model's: {missing[:5]}")
    _materialise_optimizer_state(engine)
    if sorted(saved["moments"]) != _moment_keys(engine):
        raise UserError(
            f"the checkpoint's optimizer state {sorted(saved['moments'])} is not this optimizer's "
            f"{_moment_keys(engine)}: resume with the train.optimizer it was written with"
        )
    for name, param in trained:
        device = param.device
        safe_set_full_fp32_param(param, saved["fp32"][name].to(device))
        for key, values in saved["moments"].items():
            if name in values:
                safe_set_full_optimizer_state(param, values[name].to(device), key)
        _set_module_weight(param, saved["fp32"][name])
    for s in _base_optimizer(engine).state.values():
        if "step" in s:
            s["step"] = (
                torch.full_like(s["step"], saved["optimizer_step"])
                if torch.is_tensor(s["step"])
                else saved["optimizer_step"]
            )
    for key, value in saved["counters"].items():
        setattr(engine, key, value)
    # DeepSpeed finds an accumulation boundary by counting micro-batches: count them at this run's
    # grad_accum, so the next optimizer step takes exactly grad_accum of them
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in saved["loss_scaler"].items():
        setattr(scaler, key, type(getattr(scaler, key))(value))
    return _verify(engine, saved)


def _set_module_weight(param: nn.Parameter, fp32: torch.Tensor) -> None:
    """The module's weight from its fp32 master (ZeRO-3: through a gather, each rank keeping its
    partition of the result)."""
    import deepspeed

    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(fp32.to(param.device, param.dtype))
    else:
        param.data.copy_(fp32.to(param.device, param.dtype))


def _module_weight(param: nn.Parameter) -> torch.Tensor:
    """Collective under ZeRO-3: the module's whole weight, on the CPU."""
    import deepspeed

    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().cpu().clone()
    return param.data.detach().cpu().clone()


def _verify(engine, saved: Dict[str, Any]) -> int:
    now = gather(engine)
    checked = 0
    parts = {"fp32": (now["fp32"], saved["fp32"])}
    # (a parameter never stepped before the save has state now, materialised: nothing to compare)
    parts.update({key: (now["moments"][key], values) for key, values in saved["moments"].items()})
    for part, (restored, expected) in parts.items():
        for name, tensor in expected.items():
            if not torch.equal(restored[name], tensor):
                raise RuntimeError(f"restored {part} of {name} differs from the checkpoint's")
            checked += 1
    for name, param in _trained(engine):
        if not torch.equal(_module_weight(param), saved["fp32"][name].to(param.dtype)):
            raise RuntimeError(f"restored weight of {name} is not its fp32 master in {param.dtype}")
        checked += 1
    for part in ("optimizer_step", "counters", "loss_scaler"):
        if now[part] != saved[part]:
            raise RuntimeError(f"restored {part} {now[part]} differs from the checkpoint's {saved[part]}")
    return checked
