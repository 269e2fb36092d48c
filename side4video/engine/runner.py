"""The pieces of a run, set up once: process group, device, model, loaders, engine, run directory.

`train` (train.py) and `evaluate_checkpoint` (below) both start here; the evaluation library
itself is evaluate.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from side4video import distributed
from side4video.allocator import release_freed_memory
from side4video.config import Config, to_yaml
from side4video.engine import checkpoint, deepspeed_engine, export, relayout
from side4video.engine.collectives import all_gather_objects, barrier
from side4video.engine.factory import loader_from_config, run_precision
from side4video.engine.metrics import MemoryTimeline, held_bytes, rss_bytes
from side4video.engine.schedule import RunLength, run_length
from side4video.engine.state import TrainerState
from side4video.engine.tasks import Compute, task_for
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init everywhere (data order has its own seeds)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Runner:
    """Context manager owning a run's process group, model, loaders and engine.

    `model` is the module (built once; DeepSpeed's engine wraps this same object), `engine` the
    DeepSpeed engine once built (None for a plain eval on one device), `compute()` what a task
    calls: the engine's forward when there is one."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.memory = MemoryTimeline()  # RSS at the run's phases (summary.json: memory_per_rank)
        self.memory.mark("imports")
        release_freed_memory()  # freed activations go back to the OS (side4video/allocator.py)
        self.dist = distributed.detect()
        self.device = distributed.select_device(cfg.train.device, self.dist.local_rank, self.dist.local_world_size)
        deepspeed_engine.init_distributed(self.dist, self.device, cfg.deepspeed.timeout_minutes)
        self.precision = run_precision(cfg, self.device.type == "cuda")
        self.clip_dtype = self.precision.clips
        self.run_dir = Path(cfg.train.output_dir)
        seed_everything(cfg.train.seed)
        self.task = task_for(cfg)
        self.model = self.task.build_model(self.device, self.precision, self._frozen_unit_placer())
        self.memory.mark("model built")
        self.engine = None
        self.resume_point: Optional[Tuple[Path, str]] = None  # the checkpoint training continues from
        self.memory_after_build: Dict[str, int] = {}  # this rank's RSS and backbone bytes once the engine is built
        self.train_loader = None
        self.val_loader = self._build_loader("val") if cfg.data.val.shards else None
        self.class_names = list(getattr(self.val_loader, "class_names", None) or [])

    # ------------------------------------------------------------------------------ building
    def _frozen_unit_placer(self):
        """ZeRO-3: partition the frozen backbone unit by unit while it is built (see
        deepspeed_engine.frozen_unit_placer)."""
        if self.cfg.deepspeed.zero_stage != 3:
            return None
        largest = max(
            sum(p.numel() for p in unit.parameters())
            for unit in self.task.model_on_meta(self.precision).backbone.units()
        )
        return deepspeed_engine.frozen_unit_placer(self.cfg, self.precision, self.dist.world_size, largest)

    def _build_loader(self, split: str):
        return loader_from_config(
            self.cfg,
            split,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            dtype=self.clip_dtype,
            device=self.device,
            labelled=self.task.labelled,
        )

    def build_training(self) -> RunLength:
        """Train loader, step budget, and the DeepSpeed engine over the model."""
        cfg = self.cfg
        if not cfg.data.train.shards:
            raise UserError("data.train.shards is empty: give the training shard spec")
        self.train_loader = self._build_loader("train")
        self.resume_point = checkpoint.resolve(cfg.train.resume, str(self.run_dir))
        saved_layout = relayout.read_layout(Path(*self.resume_point)) if self.resume_point else None
        if saved_layout:  # another number of ranks: the global batch is kept (engine/relayout.py)
            relayout.keep_global_batch(cfg, saved_layout, self.dist.world_size)
        if not self.class_names:
            self.class_names = list(getattr(self.train_loader, "class_names", None) or [])
        length = run_length(cfg.train, len(self.train_loader))
        groups = self.task.param_groups(self.model)  # each with its lr_scale (engine/tasks.py)
        self.lr_scales = [group["lr_scale"] for group in groups]
        self.engine = deepspeed_engine.initialize(self.model, cfg, self.precision, self.dist.world_size, groups)
        self.memory.mark("deepspeed.initialize")
        self.memory_after_build = {
            "rss_after_build_bytes": rss_bytes(),
            "backbone_bytes_held": held_bytes(self.model.backbone.frozen_parameters()),
        }
        log.info(
            "run: %s; precision %s; backbone held here %.2f GiB",
            length.as_dict(),
            self.precision.describe(),
            self.memory_after_build["backbone_bytes_held"] / 2**30,
        )
        return length

    def build_inference(self) -> None:
        """For eval/predict: ZeRO-3 still partitions (and offloads) the frozen weights; other
        stages just place the model on the device (a device move keeps every dtype)."""
        if self.cfg.deepspeed.zero_stage == 3:
            self.engine = deepspeed_engine.initialize_for_inference(
                self.model, self.cfg, self.precision, self.dist.world_size
            )
        else:
            self.model.to(self.device)
        self.model.eval()

    def compute(self) -> Compute:
        """The model as tasks call it: through the engine when there is one (its hooks gather
        ZeRO-3 partitions), clips on this rank's device in the clip dtype."""
        call = self.engine if self.engine is not None else self.model
        return Compute(model=self.model, call=call, device=self.device, clip_dtype=self.clip_dtype)

    # ------------------------------------------------------------------------------ run folder
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def prepare_run_dir(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        barrier()

    def fingerprint(self) -> Dict[str, Any]:
        return self.model.backbone.fingerprint()

    def trainer_state(self) -> TrainerState:
        return TrainerState(
            loader=self.train_loader,
            fingerprint=self.fingerprint(),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, state: TrainerState) -> Path:
        """Collective: the engine's files + the trainer state, then trainable.safetensors."""
        started = time.perf_counter()
        layout = relayout.layout_of(self.cfg, self.dist.world_size)
        client = {**state.state_dict(), "loader_positions": all_gather_objects(state.loader_position)}
        saved = checkpoint.save(self.engine, self.run_dir, state.step, client, self.cfg.train.keep_checkpoints, layout)
        path = saved.path
        export.write_trainable(self.engine, path, self.cfg.deepspeed.zero_stage, self.is_main)
        barrier()
        if self.is_main:  # one JSON line: `side4video bench checkpoint` reads it
            timing = {"tag": path.name, "ranks": self.dist.world_size, "seconds": time.perf_counter() - started}
            log.info("checkpoint saved: %s", json.dumps({**timing, **saved.seconds, **checkpoint.file_sizes(path)}))
        return path

    def resume(self, state: TrainerState) -> Optional[Path]:
        """Restore `latest` (or train.resume, found by build_training) into the engine and `state`;
        None for a fresh start."""
        if self.resume_point is None:
            return None
        root, tag = self.resume_point
        started = time.perf_counter()
        saved = checkpoint.load(self.engine, root, tag, self.dist.world_size)
        # loading an optimizer replaces its groups with the saved ones: the task's scales are the
        # truth (a checkpoint written before groups carried lr_scale has none)
        for group, scale in zip(self.engine.optimizer.param_groups, self.lr_scales):
            group["lr_scale"] = scale
        state.load_state_dict(saved, where=f"checkpoint {root / tag}")
        written_by = (relayout.read_layout(root / tag) or {}).get("world_size")
        timing = {"tag": tag, "written_by": written_by, "ranks": self.dist.world_size}
        log.info("checkpoint loaded: %s", json.dumps({**timing, "seconds": time.perf_counter() - started}))
        log.info("resumed from %s at step %d", root / tag, state.step)
        return root / tag

    def load_weights_for_eval(self, source: str) -> None:
        """Trained weights from an export folder, a checkpoint (step_N/), a checkpoints folder
        or a run directory; then the inference engine."""
        if not source:
            raise UserError("eval needs checkpoint=PATH (a run directory, checkpoint or export folder)")
        state = export.load_trained_state(source, self.fingerprint())
        export.apply_trained_state(self.model, state)
        self.build_inference()

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, Any]:
        if self.val_loader is None:
            raise UserError("data.val.shards is empty: nothing to evaluate")
        was_training = self.model.training
        self.model.eval()
        try:
            return self.task.evaluate(self.compute(), self.val_loader, self.class_names)
        finally:
            self.model.train(was_training)

    def write_eval_report(self, report: Dict[str, Any], tag: str = "eval") -> None:
        if self.is_main:
            self.task.write_report(report, self.run_dir, self.class_names, tag)
            log.info("%s: %s", tag, self.task.headline(report))

    # ------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate_checkpoint(cfg: Config) -> Dict[str, Any]:
    """`eval`: load the trained weights named by `checkpoint`, evaluate on every rank, write
    OUTPUT_DIR/eval.json (+ confusion PNG); the report (the same on every rank)."""
    with Runner(cfg) as run:
        run.load_weights_for_eval(cfg.checkpoint)
        report = run.evaluate()
        run.write_eval_report(report)
    return report
