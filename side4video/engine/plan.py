"""The memory plan of a config (`side4video plan`): what one GPU (or CPU rank) holds, and whether it fits.

Nothing is allocated. Two sources, kept apart in the report:
- counts of the real modules: the model is built on the `meta` device (EVA02-E-14 included), so
  parameter counts, per-unit sizes and which parameters ZeRO-3 keeps whole are read off the
  modules, and the activations come from one forward + backward of that model on a meta clip
  batch of the configured size (engine/activations.py: every tensor an op creates is followed
  while it is alive; what is alive after the forward is what autograd keeps);
- DeepSpeed's bookkeeping, from the DeepSpeed config the engine builds
  (engine/deepspeed_engine.deepspeed_config, DeepSpeed's defaults filled in): by ZeRO stage,
  which of weights, gradients, fp32 master copies and optimizer state are partitioned over the
  ranks, the gradient reduce bucket, ZeRO-3's gathered unit and prefetch bucket, and what
  offloading moves to host memory and over the host link every step.

Approximations (stated here, not hidden in numbers): gradients and their partitions are counted in
the training precision; a ZeRO-3 rank with prefetch on holds the trained parameters gathered from
forward to backward (DeepSpeed keeps parameters used again), without it one block at a time;
the CUDA context and allocator fragmentation are not, hence the headroom in the verdict.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from side4video.config import Config
from side4video.engine.activations import forward_memory, step_memory
from side4video.engine.factory import eval_batch_size, run_precision
from side4video.engine.tasks import task_for
from side4video.precision import Precision, dtype_name, itemsize

GiB = 2**30
HEADROOM = 0.10  # share of the GPU kept free for the CUDA context, cuDNN workspaces, fragmentation
DEFAULT_LINK_GBS = 25.0  # host link (PCIe 4.0 x16, about 25 GB/s in practice) for offload traffic
DEFAULT_SOURCE = (1920, 1080)  # the largest source video DALI decodes (its buffers grow to it)
# Host memory of one training process before any tensor: the interpreter with torch, DeepSpeed, DALI,
# open_clip and timm imported (resident size measured alone on the CPU host, README "Measured",
# bench vite). A GPU process maps CUDA's libraries on top (not measured here).
PROCESS_BASELINE = int(0.80 * GiB)


# ----------------------------------------------------------------------------------- DeepSpeed
@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that decide memory (DeepSpeed's defaults filled in)."""

    stage: int
    offload_param: str
    offload_optimizer: str
    reduce_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int
    sub_group_size: int
    max_reuse_distance: int = 10**9

    @property
    def keeps_trained_gathered(self) -> bool:
        """ZeRO-3 keeps a trained parameter gathered from its forward to its backward when its reuse
        is within the reuse distance, or when the prefetcher found it already gathered (it then
        holds it until that use); otherwise it is gathered only while its module runs."""
        return self.prefetch_bucket_size > 0 or self.max_reuse_distance > 0


def zero_settings(cfg: Config, world_size: int, trainable_params: int = 0, cuda: bool = True) -> ZeroSettings:
    """From the DeepSpeed config the engine builds (for a GPU job or a CPU one: `cuda`), through
    DeepSpeed's own config class."""
    from side4video.engine.deepspeed_engine import deepspeed_config  # first: it quiets DeepSpeed's import

    DeepSpeedZeroConfig = importlib.import_module("deepspeed.runtime.zero.config").DeepSpeedZeroConfig

    zero_dict = deepspeed_config(cfg, world_size, trainable_params=trainable_params, cuda=cuda)["zero_optimization"]
    z = DeepSpeedZeroConfig(**zero_dict)
    return ZeroSettings(
        stage=int(z.stage),
        offload_param=cfg.deepspeed.offload_param if z.stage == 3 else "none",
        offload_optimizer=cfg.deepspeed.offload_optimizer if z.stage >= 1 else "none",
        reduce_bucket_size=int(z.reduce_bucket_size),
        overlap_comm=bool(z.overlap_comm),
        contiguous_gradients=bool(z.contiguous_gradients),
        prefetch_bucket_size=int(z.prefetch_bucket_size),
        param_persistence_threshold=int(z.param_persistence_threshold),
        max_live_parameters=int(z.max_live_parameters),
        sub_group_size=int(z.sub_group_size),
        max_reuse_distance=int(z.max_reuse_distance),
    )


# ------------------------------------------------------------------------------------ weights
def frozen_weights(model, zero: ZeroSettings, world: int, storage: torch.dtype) -> Dict[str, int]:
    """Bytes of the frozen backbone on one rank (device) and, offloaded, in its host memory."""
    backbone = model.backbone
    params = [p for p in backbone.frozen_parameters() if not p.requires_grad]
    size = itemsize(storage)
    total = sum(p.numel() for p in params) * size
    if not params:
        return {
            "total": 0,
            "resident": 0,
            "partition": 0,
            "persistent": 0,
            "gathered_unit": 0,
            "prefetch": 0,
            "host": 0,
        }
    if zero.stage < 3:  # only ZeRO-3 partitions parameters; the frozen ones are never in the optimizer
        return {
            "total": total,
            "resident": total,
            "partition": 0,
            "persistent": 0,
            "gathered_unit": 0,
            "prefetch": 0,
            "host": 0,
        }
    persistent = sum(p.numel() for p in params if p.numel() <= zero.param_persistence_threshold) * size
    partition = math.ceil((total - persistent) / world)
    unit = max(sum(p.numel() for p in u.parameters() if not p.requires_grad) for u in backbone.units()) * size
    prefetch = min(zero.prefetch_bucket_size * size, total - persistent)
    offloaded = zero.offload_param != "none"
    return {
        "total": total,
        "resident": persistent + (0 if offloaded else partition),
        "partition": partition,
        "persistent": persistent,
        "gathered_unit": unit,
        "prefetch": prefetch,
        "host": partition if offloaded else 0,
    }


def trained_state(
    trainable: int,
    train: torch.dtype,
    optimizer: str,
    zero: ZeroSettings,
    world: int,
    persistent: int = 0,
    cuda: bool = True,
    largest_unit: int = 0,
) -> Dict[str, int]:
    """Bytes per rank of the trained parameters: weights, gradients, fp32 master copies, optimizer
    state (on the device, or `host` when offloaded) and DeepSpeed's gradient reduce bucket.

    `persistent`: trained parameters ZeRO-3 keeps whole (small ones); `largest_unit`: trained
    parameters of the largest block ZeRO-3 gathers at once when it does not keep them gathered.
    On a CPU host only the touched part of the (uninitialised) reduce bucket is resident.
    """
    t = itemsize(train)
    mixed = train != torch.float32
    per_param_state = 8 if optimizer == "adamw" else 4  # fp32 exp_avg + exp_avg_sq, or momentum

    def shard(n: int) -> int:
        return math.ceil(n / world)

    stage = zero.stage
    weights = trainable * t if stage < 3 else (persistent + shard(trainable - persistent)) * t
    # ZeRO-3 gathers trained parameters for their forward, and keeps them until their backward
    # or gathers them again there (one block at a time, a checkpointed block's recomputation)
    kept = min(trainable, zero.max_live_parameters) if zero.keeps_trained_gathered else min(largest_unit, trainable)
    gathered = kept * t if stage == 3 else 0
    grads = trainable * t if stage < 2 else shard(trainable) * t
    master = (trainable if stage == 0 else shard(trainable)) * 4 if mixed else 0
    states = (trainable if stage == 0 else shard(trainable)) * per_param_state
    bucket = 0
    if stage >= 1 and zero.contiguous_gradients:  # gradients are copied into it as they are produced
        elements = zero.reduce_bucket_size if cuda else min(zero.reduce_bucket_size, trainable)  # CPU: touched pages
        # ZeRO-1/2 with overlap_comm double-buffer it; ZeRO-3 reduce-scatters a bucket of several
        # gradients by first concatenating them (DeepSpeed's reduce_scatter_coalesced): a copy
        copies = 2 if stage == 3 or zero.overlap_comm else 1
        bucket = elements * t * copies
    host = 0
    if zero.offload_param != "none":  # partitions live in host memory, gathered to the device when used
        host += weights - persistent * t
        weights = persistent * t
    if zero.offload_optimizer != "none":  # master copies, optimizer state and fp32 gradients move to the host
        host += master + states + shard(trainable) * 4
        master = states = 0
    # torch's AdamW makes two fp32 temporaries the size of what it steps at once (sqrt, division):
    # ZeRO-3 steps one sub-group of the flat partition at a time, ZeRO-1/2 the flat partition;
    # DeepSpeed's CPU Adam (optimizer offloaded) makes none
    stepped = min(zero.sub_group_size, shard(trainable)) if stage == 3 else shard(trainable)
    temporaries = 2 * 4 * stepped if optimizer == "adamw" and zero.offload_optimizer == "none" and stage >= 1 else 0
    return {
        "weights": weights,
        "gathered": gathered,
        "gradients": grads,
        "master": master,
        "optimizer_state": states,
        "reduce_bucket": bucket,
        "host": host,
        "step_temporaries": temporaries,
    }


def largest_trained_unit(model) -> int:
    """Trained parameters of the largest block of a module list (a side block, its tap projection,
    a backbone block's adapters): what ZeRO-3 holds gathered at once when it keeps nothing else."""
    units = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    sizes = [sum(p.numel() for p in unit.parameters() if p.requires_grad) for unit in units]
    return max(sizes, default=0) or model.parameter_counts()["trainable_params"]


def model_trained_state(model, cfg: Config, train: torch.dtype, zero: ZeroSettings, world: int, cuda: bool):
    """trained_state for a built (meta) model: its counts, small parameters and largest unit."""
    persistent = sum(
        p.numel() for p in model.parameters() if p.requires_grad and p.numel() <= zero.param_persistence_threshold
    )
    trainable = model.parameter_counts()["trainable_params"]
    return trained_state(
        trainable, train, cfg.train.optimizer, zero, world, persistent, cuda, largest_trained_unit(model)
    )


# -------------------------------------------------------------------------------- activations
def _cast_trained(model, train: torch.dtype) -> None:
    """DeepSpeed's cast of the trained modules to its precision (the frozen backbone keeps its storage)."""
    if train == torch.float32:
        return
    for module in (model.side, getattr(model, "head", None), getattr(model.backbone, "adapters", None)):
        if module is not None:
            module.to(train)


def activation_memory(
    model, cfg: Config, precision: Precision, batch: int, checkpointing: Optional[bool] = None
) -> Dict[str, int]:
    """One meta training step of the model at `batch` clips (side checkpointing switched as asked)."""
    side = model.side
    configured = side.checkpointing if side is not None else None
    if side is not None and checkpointing is not None:
        side.set_checkpointing(checkpointing)
    try:
        return step_memory(
            model, batch, int(cfg.data.frames), int(cfg.data.size), precision.clips, int(cfg.data.num_classes)
        )
    finally:
        if side is not None:
            side.set_checkpointing(configured)


def meta_model(cfg: Config, precision: Precision):
    """The config's model on `meta`, trained modules in DeepSpeed's training precision."""
    model = task_for(cfg).model_on_meta(precision)
    _cast_trained(model, precision.train)
    return model


def backbone_block_memory(model, batch: int, frames: int, dtype: torch.dtype) -> Dict[str, int]:
    """Working set of one backbone block's forward without autograd at `batch` x `frames`."""
    spec = model.backbone.spec
    tokens = torch.empty(batch * frames, 1 + spec.num_patches, spec.width, dtype=dtype, device="meta")
    return forward_memory(model.backbone.blocks[0], tokens)


def _with(cfg: Config, key: str, value):
    """A copy of the config with one key changed (the alternatives the verdict tries)."""
    from omegaconf import OmegaConf

    changed = copy.deepcopy(cfg)
    OmegaConf.update(changed, key, value, merge=False)
    return changed


# ------------------------------------------------------------------------------------- the plan
def dali_buffer_bytes(cfg: Config, source: Tuple[int, int] = DEFAULT_SOURCE) -> Dict[str, int]:
    """DALI's decode buffers (outside torch's allocator, on the GPU with 'mixed' decoding): each
    pipeline holds a batch of decoded frames at the source resolution, and they grow to the largest
    video seen (`make-shards --short-side` bounds it). Train and validation have a pipeline each."""
    width, height = source
    frame = width * height * 3  # decoded RGB, uint8
    frames = int(cfg.data.frames)
    train = int(cfg.train.batch_size) * frames * frame
    val = eval_batch_size(cfg) * frames * int(cfg.eval.clips) * frame
    return {"train": train, "val": val if cfg.data.val.shards else 0, "source": f"{width}x{height}"}


def plan(
    cfg: Config,
    gpus: Optional[int] = None,
    gpu_mem_gib: Optional[float] = None,
    link_gbs: float = DEFAULT_LINK_GBS,
    source: Tuple[int, int] = DEFAULT_SOURCE,
) -> Dict:
    """One JSON-ready dict: the model (counts), the weights, and the per-rank memory plan."""
    t0 = time.perf_counter()
    nodes = max(int(cfg.slurm.nodes), 1)
    per_node = int(cfg.slurm.gpus_per_node)
    if gpus:
        per_node = min(per_node, gpus) if per_node else min(8, gpus)
    world = int(gpus) if gpus else nodes * per_node
    cuda = world > 0
    if not cuda:  # a CPU job: ranks are tasks, the budget is host memory
        per_node = max(int(cfg.slurm.tasks_per_node), 1)
        world = nodes * per_node
    precision = run_precision(cfg, cuda)
    model = meta_model(cfg, precision)
    report = _model_report(cfg, model, precision)
    # the per-rank plan counts a recognition step's activations; retrieval plans its weights
    report["plan"] = (
        _rank_plan(cfg, model, precision, world, per_node, cuda, gpu_mem_gib, link_gbs, source)
        if task_for(cfg).plans_activations
        else None
    )
    report["plan_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _model_report(cfg: Config, model, precision: Precision) -> Dict:
    """Architecture, counts and whole-model weight bytes (the plan before it was per rank)."""
    storage, train_dtype = precision.storage, precision.train
    backbone, spec, side = model.backbone, model.backbone.spec, model.side
    counts = model.parameter_counts()
    trainable, n_bb = counts["trainable_params"], counts["backbone_params"]
    frames = int(cfg.data.frames)
    memory = {
        "backbone_weights_bytes": n_bb * itemsize(storage),
        "backbone_weights_bytes_by_precision": {"fp32": n_bb * 4, "bf16": n_bb * 2, "fp16": n_bb * 2},
        "trainable_weights_bytes": trainable * itemsize(train_dtype),
        "gradients_bytes": trainable * itemsize(train_dtype),
        "master_weights_bytes": trainable * 4 if train_dtype != torch.float32 else 0,
        "optimizer_state_bytes": trainable * (8 if cfg.train.optimizer == "adamw" else 4),
    }
    if side is not None:  # the half-precision taps the side network keeps
        memory["kept_taps_bytes_per_clip"] = kept_taps_bytes(model, frames, storage)
    memory.update(task_for(cfg).frozen_weights(model))  # retrieval: a frozen text tower
    memory["weights_total_bytes"] = (
        memory["backbone_weights_bytes"]
        + memory["trainable_weights_bytes"]
        + memory["gradients_bytes"]
        + memory["master_weights_bytes"]
        + memory["optimizer_state_bytes"]
        + memory.get("frozen_text_weights_bytes", 0)
    )
    if cfg.model.method == "full":  # its trained weights are the backbone's: do not count them twice
        memory["weights_total_bytes"] -= memory["backbone_weights_bytes"]
    return {
        "task": cfg.task,
        "method": cfg.model.method,
        "backbone": spec.name,
        "backbone_family": spec.family,
        "backbone_width": spec.width,
        "backbone_layers": spec.layers,
        "patch_size": spec.patch_size,
        "image_size": spec.image_size,
        "patches_per_frame": spec.num_patches,
        "frames": frames,
        "batch_size": int(cfg.train.batch_size) * int(cfg.data.repeated_views),
        "storage_precision": dtype_name(storage),
        "compute_precision": dtype_name(precision.compute),
        "train_precision": dtype_name(train_dtype),
        "side_variant": side.variant if side is not None else None,
        "side_dim": side.dim if side is not None else None,
        "side_blocks": len(side.blocks) if side is not None else 0,
        "side_checkpointing": bool(side.checkpointing) if side is not None else False,
        "tap_layers": list(backbone.taps) if side is not None else [],
        **counts,
        "memory": memory,
    }


def kept_taps_bytes(model, frames: int, storage: torch.dtype) -> int:
    """Per clip: the taps a side network keeps for its backward, in the storage precision."""
    spec = model.backbone.spec
    return len(model.backbone.taps) * frames * (1 + spec.num_patches) * spec.width * itemsize(storage)


def _rank_plan(
    cfg: Config,
    model,
    precision: Precision,
    world: int,
    per_node: int,
    cuda: bool,
    gpu_mem_gib: Optional[float],
    link_gbs: float,
    source: Tuple[int, int] = DEFAULT_SOURCE,
) -> Dict:
    trainable = model.parameter_counts()["trainable_params"]
    zero = zero_settings(cfg, world, trainable, cuda)
    batch = int(cfg.train.batch_size) * int(cfg.data.repeated_views)
    frames = int(cfg.data.frames)
    method = cfg.model.method

    frozen = frozen_weights(model, zero, world, precision.storage)
    state = model_trained_state(model, cfg, precision.train, zero, world, cuda)

    # Activations: the configured step, its batch-1 step (the per-clip slope), the other
    # checkpointing setting, and one backbone block's working set.
    step = activation_memory(model, cfg, precision, batch)
    one = activation_memory(model, cfg, precision, 1) if batch > 1 else step
    activations = {
        "step_peak": step["peak"],
        "kept": step["kept"],
        "kept_per_clip": round(step["kept"] / batch),
        "peak_per_added_clip": round((step["peak"] - one["peak"]) / (batch - 1)) if batch > 1 else 0,
        "peak_batch_1": one["peak"],
    }
    block = backbone_block_memory(model, batch, frames, precision.compute)
    activations["backbone_block_working_set"] = block["peak"]
    if method == "side4video":
        on = bool(cfg.model.side.checkpointing)
        other = activation_memory(model, cfg, precision, batch, checkpointing=not on)
        with_ckpt, without = (step, other) if on else (other, step)
        activations.update(
            {
                "side_kept_per_clip": round(without["kept"] / batch),
                "side_kept_per_clip_checkpointed": round(with_ckpt["kept"] / batch),
                "step_peak_checkpointed": with_ckpt["peak"],
                "step_peak_not_checkpointed": without["peak"],
                "kept_taps_per_clip": kept_taps_bytes(model, frames, precision.storage),
            }
        )

    dali = dali_buffer_bytes(cfg, source)
    device = _device_total(frozen, state, activations["step_peak"], zero) + dali["train"] + dali["val"]
    budget = int(gpu_mem_gib * GiB) if gpu_mem_gib else None
    host = host_memory(frozen, state, per_node)
    traffic = offload_traffic(frozen, state, zero, cfg, trainable, world, precision.train)
    plan = {
        "device": "cuda" if cuda else "cpu",
        "ranks": world,
        "ranks_per_node": per_node,
        "nodes": math.ceil(world / per_node),
        "micro_batch": batch,
        "grad_accum": int(cfg.train.grad_accum),
        "zero": zero.__dict__,
        "frozen_weights": frozen,
        "trained_state": state,
        "activations": activations,
        "dali_buffers": dali,
        "peak_per_rank": device,
        "host_per_node_offloaded": host["offloaded_per_node"],
        "host_per_node": host,
        "offload_traffic_per_step": dict(
            traffic, link_gbs=link_gbs, seconds=round(traffic["bytes"] / (link_gbs * 1e9), 3)
        ),
    }
    if budget is not None:
        fits = device <= budget * (1 - HEADROOM)
        plan["verdict"] = {
            "memory_gib": gpu_mem_gib,
            "usable_bytes": int(budget * (1 - HEADROOM)),
            "headroom": HEADROOM,
            "fits": fits,
        }
        if not fits:
            checkpointed = {"peak": activations.get("step_peak_checkpointed", step["peak"])}
            plan["verdict"]["what_would_fit"] = _alternatives(
                cfg, model, precision, world, budget, step, one, batch, checkpointed, cuda, dali["train"] + dali["val"]
            )
    return plan


def host_memory(frozen: Dict[str, int], state: Dict[str, int], per_node: int) -> Dict[str, int]:
    """Host memory of one node: each of its ranks holds what it offloads (its partition of the frozen
    backbone, its trained state when offloaded) plus a process's own baseline (PROCESS_BASELINE)."""
    offloaded = frozen["host"] + state["host"]
    per_rank = offloaded + PROCESS_BASELINE
    return {
        "ranks": per_node,
        "offloaded_per_rank": offloaded,
        "frozen_partition_per_rank": frozen["host"],
        "trained_state_per_rank": state["host"],
        "process_baseline_per_rank": PROCESS_BASELINE,
        "per_rank": per_rank,
        "offloaded_per_node": offloaded * per_node,
        "total": per_rank * per_node,
    }


def _device_total(frozen: Dict[str, int], state: Dict[str, int], activation_peak: int, zero: ZeroSettings) -> int:
    working = frozen["gathered_unit"] + frozen["prefetch"]
    trained = state["weights"] + state["gathered"] + state["gradients"] + state["master"] + state["optimizer_state"]
    # the optimizer's temporaries come after the backward, when the activations are gone
    return (
        frozen["resident"]
        + working
        + trained
        + state["reduce_bucket"]
        + max(activation_peak, state["step_temporaries"])
    )


def offload_traffic(
    frozen: Dict[str, int],
    state: Dict[str, int],
    zero: ZeroSettings,
    cfg: Config,
    trainable: int,
    world: int,
    train: torch.dtype,
) -> Dict[str, int]:
    """Bytes one rank moves over its host link per optimizer step.

    Offloaded parameters: each rank copies its partition to the device whenever the unit is
    used (frozen units once per micro-step, trained ones in forward and backward; NVLink/network
    all-gathers are not host traffic). Offloaded optimizer: gradient partitions out, updated
    parameter partitions back, once per step.
    """
    accum = int(cfg.train.grad_accum)
    params = 0
    if zero.offload_param != "none":
        trained_partition = math.ceil(trainable / world) * itemsize(train)
        params = accum * (frozen["partition"] + 2 * trained_partition)
    optimizer = 0
    if zero.offload_optimizer != "none":
        optimizer = 2 * math.ceil(trainable / world) * itemsize(train)
    return {"bytes": params + optimizer, "parameters": params, "optimizer": optimizer}


def _alternatives(
    cfg: Config,
    model,
    precision: Precision,
    world: int,
    budget: int,
    step: Dict,
    one: Dict,
    batch: int,
    checkpointed: Dict,
    cuda: bool,
    outside: int = 0,
) -> List[Dict]:
    """Changes that would fit, each with its predicted peak (the first is the least disruptive).
    `outside`: memory the changes leave as it is (DALI's buffers)."""
    usable = budget * (1 - HEADROOM) - outside
    options: List[Tuple[str, object, Dict]] = []
    if cfg.model.method == "side4video" and not cfg.model.side.checkpointing:
        options.append(("model.side.checkpointing=true", None, {"model.side.checkpointing": True}))
    if cfg.deepspeed.zero_stage < 3:
        options.append(("deepspeed.zero_stage=3", None, {"deepspeed.zero_stage": 3}))
    if cfg.deepspeed.offload_param == "none":
        options.append(
            (
                "deepspeed.zero_stage=3 deepspeed.offload_param=cpu",
                None,
                {"deepspeed.zero_stage": 3, "deepspeed.offload_param": "cpu"},
            )
        )
    if cfg.deepspeed.offload_optimizer == "none":
        options.append(("deepspeed.offload_optimizer=cpu", None, {"deepspeed.offload_optimizer": "cpu"}))
    found = []
    for label, _, changes in options:
        alt = cfg
        for key, value in changes.items():
            alt = _with(alt, key, value)
        peak = _predicted_peak(
            alt, model, precision, world, checkpointed if "model.side.checkpointing" in changes else step, cuda
        )
        if peak <= usable:
            found.append({"change": label, "peak_per_rank": peak + outside})
    # The largest batch that fits as configured (the activation peak grows linearly per clip; the
    # optimizer's temporaries come after the backward, so a peak is the larger of the two).
    temporaries = _step_temporaries(cfg, model, world, cuda)
    fixed = _predicted_peak(cfg, model, precision, world, {"peak": 0}, cuda) - temporaries  # neither of them
    per_clip = (step["peak"] - one["peak"]) / (batch - 1) if batch > 1 else step["peak"]
    if fixed + max(one["peak"], temporaries) <= usable and per_clip > 0:
        fitting = 1 + int((usable - fixed - one["peak"]) // per_clip)
        if fitting < batch:
            activations = one["peak"] + (fitting - 1) * per_clip
            found.append(
                {
                    "change": f"train.batch_size={max(1, fitting // max(int(cfg.data.repeated_views), 1))} "
                    f"(micro-batch {fitting} clips, with train.grad_accum to keep the global batch)",
                    "peak_per_rank": int(fixed + max(activations, temporaries)) + outside,
                }
            )
    return found


def _step_temporaries(cfg: Config, model, world: int, cuda: bool) -> int:
    """The optimizer step's temporaries (fp32 whatever the training precision)."""
    trainable = model.parameter_counts()["trainable_params"]
    zero = zero_settings(cfg, world, trainable, cuda)
    return trained_state(trainable, torch.float32, cfg.train.optimizer, zero, world, 0, cuda)["step_temporaries"]


def _predicted_peak(cfg: Config, model, precision: Precision, world: int, step: Dict, cuda: bool) -> int:
    zero = zero_settings(cfg, world, model.parameter_counts()["trainable_params"], cuda)
    frozen = frozen_weights(model, zero, world, precision.storage)
    state = model_trained_state(model, cfg, precision.train, zero, world, cuda)
    return _device_total(frozen, state, step["peak"], zero)


# ----------------------------------------------------------------------- this host, plain step
def plain_step_peak(cfg: Config) -> Dict[str, int]:
    """Predicted memory above the built model of a plain PyTorch AdamW step on this CPU host
    (`side4video bench memory`'s method cases): the previous step's gradients (freed only after
    the forward), AdamW's state and the step's activation peak."""
    precision = run_precision(cfg, False)
    model = meta_model(cfg, precision)
    trainable = model.parameter_counts()["trainable_params"]
    batch = int(cfg.train.batch_size)
    step = activation_memory(model, cfg, precision, batch)
    per_param_state = 8 if cfg.train.optimizer == "adamw" else 4
    grads, states = trainable * 4, trainable * per_param_state
    return {
        "activations_peak": step["peak"],
        "kept": step["kept"],
        "gradients": grads,
        "optimizer_state": states,
        "peak_above_model": step["peak"] + grads + states,
    }
