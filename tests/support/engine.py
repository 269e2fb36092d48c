"""Engine fixtures: a small synthetic motion dataset and helpers to run `side4video` commands
(one process, or several through torchrun) on a tiny CPU config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.support import REPO

DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_RETRIEVAL = str(REPO / "configs" / "demo_retrieval.yaml")
TRAIN_VIDEOS, VAL_VIDEOS = 24, 13  # 13: an odd split, so two ranks get unequal shares


@pytest.fixture(scope="session")
def motion_data(tmp_path_factory) -> Dict[str, str]:
    from side4video.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("motion")
    make_synthetic(
        str(out), videos=TRAIN_VIDEOS, classes=4, val_videos=VAL_VIDEOS, frames=8, size=32, seed=3, shard_samples=6
    )
    return {"train": str(out / "train" / "manifest.json"), "val": str(out / "val" / "manifest.json"), "root": str(out)}


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory) -> Dict[str, str]:
    """Retrieval: 24 train and 13 val captioned motion clips (make-synthetic --captions)."""
    from side4video.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("captions")
    make_synthetic(
        str(out),
        videos=TRAIN_VIDEOS,
        classes=4,
        val_videos=VAL_VIDEOS,
        frames=8,
        size=32,
        seed=4,
        shard_samples=6,
        captions=True,
    )
    return {"train": str(out / "train" / "manifest.json"), "val": str(out / "val" / "manifest.json"), "root": str(out)}


def retrieval_overrides(data: Dict[str, str], out_dir: Path, *extra: str) -> List[str]:
    """The retrieval demo config made tiny: 32 px, 4 frames, ViT-T-8 with its tiny text tower."""
    return [
        f"data.train.shards={data['train']}",
        f"data.val.shards={data['val']}",
        f"train.output_dir={out_dir}",
        "data.frames=4",
        "model.side.dim=64",
        "model.text.max_words=12",
        "train.batch_size=4",
        "eval.batch_size=4",
        "train.epochs=2",
        "train.log_every=1",
        "train.warmup_epochs=0.5",
        "logging.progress=false",
        *extra,
    ]


def tiny_overrides(data: Dict[str, str], out_dir: Path, *extra: str) -> List[str]:
    """Demo model at 32 px / 4 frames: a step costs a few tens of milliseconds."""
    return [
        f"data.train.shards={data['train']}",
        f"data.val.shards={data['val']}",
        f"train.output_dir={out_dir}",
        "model.backbone.name=ViT-T-16",
        "data.num_classes=4",
        "data.size=32",
        "data.resize=[36]",
        "data.frames=4",
        "model.side.dim=64",
        "train.batch_size=4",
        "train.epochs=2",
        "train.log_every=1",
        "train.warmup_epochs=0.5",
        "logging.progress=false",
        "logging.tensorboard=true",
        *extra,
    ]


def run_cli(
    args: List[str], nproc: int = 1, timeout: float = 600, env: Dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    from side4video.distributed import launch_command

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        launch_command(nproc, args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"side4video {' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def train_rows(run_dir: Path) -> List[dict]:
    """Every logged training row of metrics.jsonl, in the order written (a resumed run appends)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"]


def train_steps(run_dir: Path) -> List[int]:
    """The steps of the logged training rows, in order: a resume that restarted from step 1
    shows as a repeat."""
    return [r["step"] for r in train_rows(run_dir)]


def train_losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
