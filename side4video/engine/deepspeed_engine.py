"""Our config -> a DeepSpeed config, and the engine that optimises only the side network + head.

One engine holds the whole model: the frozen backbone is inside it (one forward, one set of
hooks; ZeRO-3 partitions and offloads the frozen weights too) but never in the optimizer. An
inference engine of its own for the backbone measured no better (`side4video bench memory`,
README "Measured"), so there is no second layout here.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from side4video.config import Config
from side4video.distributed import DistEnv
from side4video.engine import gloo_collectives
from side4video.errors import UserError
from side4video.logs import get_logger
from side4video.model.trainable import param_groups as trainable_param_groups
from side4video.precision import FROZEN_METHODS, Precision

log = get_logger(__name__)


def _is_not_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    # On CPU hosts the CPU accelerator is the expected choice, not a warning every process prints.
    return not record.getMessage().startswith("Setting accelerator to CPU")


def _import_deepspeed_on_stderr():
    """Import DeepSpeed with its log handler bound to stderr: it logs (and prints op builds) on
    stdout, which belongs to our --json output."""
    logging.getLogger("DeepSpeed").addFilter(_is_not_cpu_fallback_notice)
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401 - the handler takes sys.stdout as it is during this import
    return deepspeed


deepspeed = _import_deepspeed_on_stderr()


def has_cuda() -> bool:
    return torch.cuda.is_available()


def fp16_supported() -> bool:
    """DeepSpeed's own answer: GPUs yes; CPU hosts only with oneDNN fp16 (AVX512-FP16/AMX-FP16)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def init_distributed(dist: DistEnv, device: torch.device, timeout_minutes: int = 30) -> None:
    """Start torch.distributed the DeepSpeed way: NCCL on GPUs, gloo (+ DeepSpeed's shm) on CPUs."""
    from deepspeed.utils import logger as deepspeed_logger

    # DeepSpeed logs every config block and checkpoint file at INFO; our own lines say what matters.
    if not log.isEnabledFor(logging.DEBUG):
        deepspeed_logger.setLevel(logging.WARNING)
        # DeepSpeed calls torch's deprecated all_gather_into_tensor on every ZeRO gather.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    dist.export()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    # DeepSpeed prints its op-build notices on stdout, which belongs to our --json output.
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            rank=dist.rank,
            world_size=dist.world_size,
        )
    gloo_collectives.install_for_gloo()


def _offload(device: str, nvme_path: str, pin: bool) -> Dict[str, Any]:
    block: Dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    return block


OPTIMIZER_SUB_GROUP = int(2e7)  # ZeRO-3 sub-group (elements) the optimizer steps at once
REDUCE_BUCKET = int(5e7)  # gradient reduce bucket (elements), at most
PREFETCH_BUCKET = int(5e7)  # ZeRO-3 parameters (elements) gathered ahead of their module, when on


def prefetch_on(setting: str, cuda: bool) -> bool:
    """deepspeed.prefetch: `auto` prefetches on GPUs, where gathering the next block overlaps its
    host->GPU copy with compute, and not on CPU hosts, which are short of memory rather than time
    (bench vite, ViT-E on 2 ranks: 0.99 GiB less peak per rank, steps 25% longer)."""
    return setting == "always" or (setting == "auto" and cuda)


def deepspeed_config(
    cfg: Config,
    world_size: int,
    largest_frozen_unit: int = 0,
    trainable_params: int = 0,
    cuda: Optional[bool] = None,
) -> Dict[str, Any]:
    """The DeepSpeed JSON config for training the side network (+ head) under ZeRO.

    No scheduler: the loop sets each step's learning rate (engine/schedule.py). DeepSpeed owns
    gradient accumulation (`gradient_accumulation_steps`: the loss is scaled by 1/accum and the
    optimizer steps on every accum-th micro-batch) and the skipping of steps whose gradients are
    not finite (its ZeRO optimizers check under every precision, bf16 when asked to).
    `largest_frozen_unit`: parameters of the largest frozen block (sizes NVMe swap buffers);
    `trainable_params`: the trained parameters (a smaller network gets a bucket of its own size);
    `cuda`: whether the job runs on GPUs (default: this host has one; the planner plans for either).
    """
    engine_cfg = cfg.deepspeed
    tr = cfg.train
    micro = tr.batch_size * cfg.data.repeated_views
    zero: Dict[str, Any] = {"stage": engine_cfg.zero_stage}
    if trainable_params and engine_cfg.zero_stage >= 1:
        # 5e7 elements: measured on ViT-E, 1 rank, the bucket at the trained-parameter count
        # (183 M) cost 1.5 GiB more peak than this, and DeepSpeed's default is larger still
        zero["reduce_bucket_size"] = int(min(REDUCE_BUCKET, max(trainable_params, 1e6)))
    if engine_cfg.zero_stage >= 1 and engine_cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(engine_cfg.offload_optimizer, engine_cfg.nvme_path, has_cuda())
    if engine_cfg.zero_stage == 3:
        if engine_cfg.offload_param != "none":
            zero["offload_param"] = _offload(engine_cfg.offload_param, engine_cfg.nvme_path, has_cuda())
            if engine_cfg.offload_param == "nvme":
                # Each swap buffer must hold a whole gathered block (leaf module), and prefetching
                # keeps a few in flight: DeepSpeed's defaults (5 x 1e8) are too small for EVA-E.
                zero["offload_param"].update(buffer_size=max(int(1e8), int(largest_frozen_unit)), buffer_count=8)
        if prefetch_on(engine_cfg.prefetch, has_cuda() if cuda is None else cuda):
            # Frozen weights are gathered per block (ZeRO-3 leaf modules); keep prefetch modest so
            # a 4.4B backbone does not materialise several blocks at once.
            zero["stage3_prefetch_bucket_size"] = PREFETCH_BUCKET
        else:
            # Each module's parameters gathered when it runs and released after it, again in the
            # backward. Both settings are needed: a parameter the prefetcher found already gathered
            # is kept until that later use whatever the reuse distance (DeepSpeed's coordinator),
            # which from the second step (traced) kept the whole side network gathered from the
            # forward to the backward, a second whole copy on each of several ranks.
            zero["stage3_prefetch_bucket_size"] = 0
            zero["stage3_max_reuse_distance"] = 0
        zero["stage3_param_persistence_threshold"] = int(1e5)
        # The optimizer steps one sub-group of the flat partition at a time, and torch's AdamW makes
        # two temporaries of its size (sqrt, then the division): DeepSpeed's 1e9-element default
        # is one group for a 183 M side network on few ranks, 1.4 GiB of fp32 temporaries per step.
        zero["sub_group_size"] = OPTIMIZER_SUB_GROUP
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": micro * tr.grad_accum * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own progress bar and metrics report progress
        "wall_clock_breakdown": False,
    }
    if tr.grad_clip > 0:
        config["gradient_clipping"] = tr.grad_clip
    if engine_cfg.precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # bf16 has 8 bits of mantissa: sum the ranks' gradients in fp32
        config["communication_data_type"] = "fp32"
    elif engine_cfg.precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": engine_cfg.loss_scale,
            "initial_scale_power": engine_cfg.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return config


def param_groups(model: nn.Module, cfg: Config) -> List[Dict[str, Any]]:
    """Recognition's optimizer groups: the trainable parameters at train.lr, all decayed as in the
    reference, or with train.decay_norm_and_bias=false norm weights, biases and position
    embeddings apart without decay (model/trainable.py `skips_weight_decay`)."""
    tr = cfg.train
    return trainable_param_groups(model, tr.lr, tr.weight_decay, decay_all=bool(tr.decay_norm_and_bias))


def build_optimizer(groups: List[Dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """AdamW as the reference (DeepSpeed's CPU Adam when the optimizer state is offloaded)."""
    tr = cfg.train
    if tr.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tr.lr, momentum=0.9)
    if cfg.deepspeed.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps)


def mark_backbone_units_as_leaves(model: nn.Module) -> None:
    """ZeRO-3 gathers a whole frozen unit (stem, block, final norm; the text tower's blocks) at
    once: one all-gather per block, and attention modules that read child weights without calling
    them, like nn.MultiheadAttention's out_proj, still see full tensors."""
    from deepspeed.utils import set_z3_leaf_modules

    types = []
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        types += backbone.leaf_module_types()
    text = getattr(model, "text", None)
    if text is not None:
        types += [type(block) for block in text.transformer.resblocks]
    if types:
        set_z3_leaf_modules(model, list(dict.fromkeys(types)))


def check_trainable(cfg: Config) -> None:
    """Settings DeepSpeed would accept but that cannot train as this loop promises."""
    engine_cfg = cfg.deepspeed
    if engine_cfg.precision == "fp16" and not fp16_supported():
        raise UserError(
            "deepspeed.precision=fp16 is not supported by DeepSpeed's accelerator on this host "
            "(no GPU, no CPU fp16 units): use bf16 or fp32"
        )
    if engine_cfg.zero_stage == 0 and engine_cfg.precision == "fp32":
        # Without ZeRO and without mixed precision DeepSpeed hands the step to the plain torch
        # optimizer, which applies non-finite gradients instead of skipping the step.
        raise UserError(
            "deepspeed.zero_stage=0 with deepspeed.precision=fp32 cannot skip a step whose gradients "
            "are not finite: use deepspeed.zero_stage=1 (same memory on one process) or bf16"
        )


def initialize(
    model: nn.Module, cfg: Config, precision: Precision, world_size: int, groups: List[Dict[str, Any]] = None
):
    """DeepSpeed engine over the whole model; only trainable parameters reach the optimizer.

    The frozen backbone keeps its storage precision bit for bit: DeepSpeed casts every parameter
    to its training precision at initialisation, so under ZeRO 0-2 the backbone is left out of the
    engine's view while it initialises (it is frozen: no optimizer, gradient or broadcast concerns
    it) and under ZeRO-3 it is partitioned beforehand in its own precision (`zero.Init`), which
    DeepSpeed takes as a model that needs no casting: the trained part is then cast here.
    `groups`: the optimizer's parameter groups (default: `param_groups`).
    """
    check_trainable(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = deepspeed_config(cfg, world_size, _largest_frozen_unit(model), trainable)
    if cfg.deepspeed.zero_stage == 3:
        mark_backbone_units_as_leaves(model)
    optimizer = build_optimizer(groups if groups is not None else param_groups(model, cfg), cfg)
    with frozen_towers_kept(model, cfg, precision, ds_config):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    _after_initialize(engine.module)
    return engine


def initialize_for_inference(model: nn.Module, cfg: Config, precision: Precision, world_size: int):
    """ZeRO-3 inference engine (eval, predict): the frozen weights partitioned and offloaded as in
    training. Other stages need no engine: the caller places the model on its device."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": deepspeed_config(cfg, world_size, _largest_frozen_unit(model))["zero_optimization"],
    }
    mark_backbone_units_as_leaves(model)
    with frozen_towers_kept(model, cfg, precision, config):
        engine = deepspeed.initialize(model=model, config=config)[0]
    _after_initialize(engine.module)
    return engine


def _largest_frozen_unit(model: nn.Module) -> int:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return 0
    return max((sum(p.numel() for p in unit.parameters()) for unit in backbone.units()), default=0)


@contextlib.contextmanager
def frozen_towers_kept(model: nn.Module, cfg: Config, precision: Precision, ds_config: Dict[str, Any]):
    """Around deepspeed.initialize: keep the frozen towers' weights (the backbone; a frozen text
    tower) in their storage precision (see `initialize`). Methods that backpropagate through the
    backbone train it in DeepSpeed's precision anyway (side4video/precision.py)."""
    towers = model.frozen_towers() if hasattr(model, "frozen_towers") else {}
    if not towers:
        yield
        return
    if cfg.deepspeed.zero_stage == 3:
        for tower in towers.values():
            if not all(hasattr(p, "ds_id") for p in tower.parameters()):  # not partitioned at build
                partition_frozen_unit(tower, cfg, precision, ds_config)
        for p in model.parameters():  # DeepSpeed casts nothing of a model it finds partitioned
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.to(precision.train)
        yield
        return
    for name in towers:
        del model._modules[name]
    try:
        yield
    finally:
        model._modules.update(towers)
    device = next((p.device for p in model.parameters() if p.requires_grad), None)
    if device is not None:
        for tower in towers.values():
            tower.to(device)  # a device move only: .to(device) keeps every dtype


def partition_frozen_unit(unit: nn.Module, cfg: Config, precision: Precision, ds_config: Dict[str, Any]) -> None:
    """ZeRO-3-partition a frozen module's parameters in their own precision (this rank keeps its
    shard; offloaded to CPU/NVMe with deepspeed.offload_param)."""
    offload = cfg.deepspeed.offload_param
    with torch.no_grad():
        deepspeed.zero.Init(
            module=unit,
            config_dict_or_path=ds_config,
            dtype=precision.storage,
            remote_device=offload if offload != "none" else None,
            pin_memory=has_cuda(),
        )


def frozen_unit_placer(cfg: Config, precision: Precision, world_size: int, largest_frozen_unit: int):
    """For the model build (model/backbone.py `place_unit`): under ZeRO-3 with a frozen backbone,
    partition each unit as soon as it is loaded, so no rank ever holds the whole backbone (8 ranks
    of a node would otherwise each build a full EVA-E copy, 8 x 8.1 GiB of host memory); None
    otherwise (the backbone is built whole)."""
    if cfg.deepspeed.zero_stage != 3 or cfg.model.method not in FROZEN_METHODS:
        return None
    ds_config = deepspeed_config(cfg, world_size, largest_frozen_unit)
    return lambda unit: partition_frozen_unit(unit, cfg, precision, ds_config)


def _after_initialize(model: nn.Module) -> None:
    """Re-register the backbone's CPU upcast hooks so that, under ZeRO-3, they run after the
    gather hooks DeepSpeed has just installed (and restore before the release)."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        backbone.install_compute_hooks()
