"""`side4video demo` (`make demo`): the whole path on a CPU in a few minutes.

Synthetic motion-only clips -> a 2-process ZeRO-2 run of the side network over a tiny random ViT
-> the linear-probe baseline on the same data -> multi-view evaluation -> a results table.
A frame-averaging probe cannot tell "left" from "right"; the side network's temporal modelling can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from side4video.distributed import launch_command
from side4video.engine.status import RunStatus
from side4video.errors import UserError

METHODS = ("side4video", "linear_probe")


def find_config(name: str = "demo.yaml") -> Path:
    """configs/ of the working tree, else of the source checkout this package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / name
        if path.is_file():
            return path
    raise UserError(f"configs/{name} not found (run from the side4video checkout)")


def _run(cmd: List[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed with status {result.returncode}: {' '.join(cmd)}")


def _summary(run_dir: Path) -> Dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _finished(run_dir: Path) -> bool:
    """A run the demo need not redo (a stopped run continues when started again)."""
    summary = _summary(run_dir)
    return bool(summary) and RunStatus.read(summary.get("status")).complete


def cmd_demo(args) -> int:
    if args.task == "retrieval":
        return run_retrieval_demo(args.out, nproc=args.nproc, fresh=args.fresh)
    return run_demo(args.out, nproc=args.nproc, videos=args.videos, fresh=args.fresh)


def _demo_data(data: Path, videos: int, val_videos: int, *extra: str) -> List[str]:
    """The demo's generated clips (made once, 8 classes of 16 frames at 32 px) and the overrides
    that point a run at them."""
    if not (data / "val" / "manifest.json").is_file():
        size = ["--classes", "8", "--frames", "16", "--size", "32", "--workers", "2"]
        counts = ["--videos", str(videos), "--val-videos", str(val_videos)]
        _run([sys.executable, "-m", "side4video.cli", "make-synthetic", str(data), *extra, *counts, *size])
    return [
        f"data.train.shards={data / 'train' / 'manifest.json'}",
        f"data.val.shards={data / 'val' / 'manifest.json'}",
    ]


def run_demo(out: str = "runs/demo", nproc: int = 2, videos: int = 1024, fresh: bool = False) -> int:
    out_dir = Path(out)
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    data = out_dir / "data"
    config = str(find_config())
    shards = _demo_data(data, videos, max(videos // 8, 16))
    for method in METHODS:
        run_dir = out_dir / method
        if _finished(run_dir):
            print(f"{method}: already trained in {run_dir} (--fresh to redo)")
            continue
        overrides = [*shards, f"model.method={method}", f"train.output_dir={run_dir}"]
        if method == "linear_probe":
            overrides += ["train.lr=1e-2"]  # a linear head alone wants a larger step
        _run(launch_command(nproc, ["train", config, *overrides]))
    side_dir = out_dir / "side4video"
    _run(
        [
            sys.executable,
            "-m",
            "side4video.cli",
            "eval",
            config,
            *shards,
            f"train.output_dir={side_dir}",
            f"checkpoint={side_dir / 'export'}",
            "eval.crops=3",
            "eval.clips=2",
        ]
    )
    _print_table(out_dir)
    return 0


def _print_table(out_dir: Path) -> None:
    rows = []
    for method in METHODS:
        s = _summary(out_dir / method)
        rows.append(
            (
                method,
                100 * s.get("top1", float("nan")),
                s.get("trainable_params", 0) / 1e6,
                s.get("peak_rss_bytes", 0) / 2**30,
                s.get("clips_per_s", float("nan")),
            )
        )
    multi = (
        json.loads((out_dir / "side4video" / "eval.json").read_text())
        if (out_dir / "side4video" / "eval.json").is_file()
        else {}
    )
    print()
    print(f"{'method':<14} {'top-1 (%)':>10} {'trainable (M)':>14} {'peak RSS (GiB)':>15} {'clips/s':>9}")
    for method, top1, params, mem, speed in rows:
        print(f"{method:<14} {top1:>10.1f} {params:>14.3f} {mem:>15.2f} {speed:>9.1f}")
    if multi:
        print(
            f"\nside4video, {multi.get('views')} views (3 crops x 2 clips): top-1 {100 * multi['top1']:.1f}%, "
            f"top-5 {100 * multi['top5']:.1f}% on {multi['samples']} videos"
        )
    side = out_dir / "side4video"
    print(f"\nrun directories: {out_dir / 'side4video'}, {out_dir / 'linear_probe'}")
    print(f"plots: {side / 'curves.png'}, {side / 'final_eval_confusion.png'}, {side / 'eval_confusion.png'}")
    print(f"exported model: {side / 'export'}  (side4video predict {side / 'export'} VIDEO)")


# ------------------------------------------------------------------------------------ retrieval
RETRIEVAL_RUNS = (("side4video", "side4video"), ("frozen", "linear_probe"))  # run folder, model.method


def run_retrieval_demo(out: str = "runs/demo", nproc: int = 2, fresh: bool = False) -> int:
    """Captioned motion clips -> the side network and the frozen CLIP baseline (no side network:
    the side projection left at zero) trained alike -> t2v / v2t R@K on held-apart captions."""
    out_dir = Path(out) / "retrieval"
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    data = out_dir / "data"
    config = str(find_config("demo_retrieval.yaml"))
    shards = _demo_data(data, RETRIEVAL_VIDEOS, RETRIEVAL_VAL_VIDEOS, "--captions")
    for name, method in RETRIEVAL_RUNS:
        run_dir = out_dir / name
        if _finished(run_dir):
            print(f"{name}: already trained in {run_dir} (--fresh to redo)")
            continue
        _run(launch_command(nproc, ["train", config, *shards, f"model.method={method}", f"train.output_dir={run_dir}"]))
    _print_retrieval_table(out_dir)
    return 0


RETRIEVAL_VIDEOS, RETRIEVAL_VAL_VIDEOS = 512, 128


def _print_retrieval_table(out_dir: Path) -> None:
    print()
    print(
        f"{'model':<12} {'t2v R@1':>8} {'R@5':>6} {'R@10':>6} {'MedR':>6} "
        f"{'v2t R@1':>8} {'R@5':>6} {'R@10':>6} {'MedR':>6}"
    )
    chance = None
    for name, _ in RETRIEVAL_RUNS:
        s = _summary(out_dir / name)
        if not s:
            continue
        t, v = s["t2v"], s["v2t"]
        chance = s.get("chance_R1")
        print(
            f"{name:<12} {t['R1']:>8.1f} {t['R5']:>6.1f} {t['R10']:>6.1f} {t['MedianR']:>6.1f} "
            f"{v['R1']:>8.1f} {v['R5']:>6.1f} {v['R10']:>6.1f} {v['MedianR']:>6.1f}"
        )
    if chance is not None:
        print(f"\nchance R@1: {chance:.2f}% (held-apart captions of {RETRIEVAL_VAL_VIDEOS} validation videos)")
    print(
        f"run directories: {out_dir / 'side4video'}, {out_dir / 'frozen'} (summary.json, final_eval.json, "
        f"final_eval_recall.png)"
    )
