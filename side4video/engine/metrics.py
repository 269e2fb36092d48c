"""Run metrics: progress bar, metrics.jsonl, TensorBoard scalars, summary.json (rank 0 only)."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from side4video.logs import get_logger

log = get_logger(__name__)


def peak_memory() -> Dict[str, int]:
    """Peak resident memory of this process (and of the GPU allocator when there is one), bytes."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: the resident peak; RssFile: file-backed pages), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryTimeline:
    """This process's resident memory at the named moments of a run, each recorded once: after
    imports, after the model is built, after deepspeed.initialize, after the forward, backward and
    optimizer step of the first step and of the second (the first with the optimizer state and
    DeepSpeed's parameter trace in place). `rss` is the size then, `peak` the high-water mark so far (VmHWM):
    the difference between two marks is what that phase added, and a peak above both is a
    transient inside it."""

    def __init__(self):
        self.marks: Dict[str, Dict[str, int]] = {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = {"rss_bytes": rss_bytes(), "peak_bytes": status_bytes("VmHWM")}

    def as_list(self) -> list:
        return [{"at": name, **figures} for name, figures in self.marks.items()]


def held_bytes(params) -> int:
    """Bytes of these parameters this process holds: its ZeRO-3 partitions (wherever they are
    offloaded), or the whole tensors when not partitioned."""
    total = 0
    for p in params:
        shard = getattr(p, "ds_tensor", None)
        if shard is not None:
            total += shard.numel() * shard.element_size()
        # a ZeRO-3 parameter below the persistence threshold also keeps its whole tensor here
        if shard is None or getattr(p, "ds_persist", False):
            total += p.data.numel() * p.data.element_size()
    return total


class Throughput:
    """Clips/s and the fraction of step time spent waiting for data. Only time between steps
    counts: call `mark()` after an evaluation or a checkpoint so their time is left out."""

    def __init__(self):
        self.clips = 0
        self.busy = 0.0
        self.wait = 0.0
        self.mark()

    def mark(self) -> None:
        self.last = time.perf_counter()

    def add(self, clips: int, wait_s: float) -> None:
        now = time.perf_counter()
        self.busy += now - self.last
        self.last = now
        self.clips += clips
        self.wait += wait_s

    def read(self) -> Dict[str, float]:
        busy = max(self.busy, 1e-9)
        return {"clips_per_s": self.clips / busy, "data_wait_fraction": min(self.wait / busy, 1.0)}


class MetricsLogger:
    """Writes what rank 0 measures; other ranks hold a no-op instance."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        initial_step: int,
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            # SLURM log files are not terminals: a bar line per update there is still useful.
            self.bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0 if os.isatty(2) else 10.0,
            )

    def step(self, step: int, scalars: Dict[str, float]) -> None:
        """Progress bar update for every step; scalars are written by `log`."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: _short(v) for k, v in scalars.items()}, refresh=False)

    def log(self, kind: str, step: int, scalars: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **scalars}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def write(self, message: str) -> None:
        """A line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
