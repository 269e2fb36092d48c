"""`side4video bench checkpoint`: what a checkpoint of ViT-E's side network costs, and what
continuing it on another number of ranks costs.

Real `side4video train` runs of configs/experiments/ssv2_eva02e14.yaml (the 183 M-parameter EVA
side network beside the 4.35 B frozen EVA02-E-14, ZeRO-3; inputs reduced as in `bench vite`'s case
a), one after another in one run directory, one optimizer step each:

  1 rank, saves  ->  2 ranks: load (written by 1: the gathered copy) and save
                 ->  2 ranks: load (written by 2: DeepSpeed's own files) and save
                 ->  1 rank:  load (written by 2: the gathered copy) and save

Each run logs one JSON line per save and load (engine/runner.py): seconds on rank 0 (DeepSpeed's
files and the gathered trained state also apart) and the bytes of each. The 2-rank checkpoint is
also converted to DeepSpeed's universal format (`ds_to_universal`, the alternative to the gathered
copy: an offline step per checkpoint), timed and measured. Writes OUT/checkpoint.json, .md and .png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from side4video.bench.vite import case_overrides, clips_for, find_config, host_info
from side4video.distributed import launch_command
from side4video.errors import UserError, last_line

RUNS = [(1, 2), (2, 1), (2, 1), (1, 2)]  # (ranks, clips per rank): the global batch is 2 throughout
UNIVERSAL_AFTER = 3  # the run whose (2-rank) checkpoint is also converted to the universal format


def _universal(checkpoint: Path, out: Path) -> Dict:
    """DeepSpeed's offline conversion of a ZeRO checkpoint to its universal (any world size)
    format: seconds and bytes, then the copy is removed."""
    workers = str(max(1, min(2, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint)]
    command += ["--output_folder", str(out), "--num_extract_workers", workers, "--num_merge_workers", workers]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bench checkpoint: ds_to_universal failed: {last_line(proc.stderr)}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    files = sum(1 for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)
    return {"kind": "universal", "ranks": 2, "seconds": seconds, "universal_bytes": size, "files": files}


def _events(stderr: str) -> List[Dict]:
    """The run's "checkpoint saved: {...}" / "checkpoint loaded: {...}" lines."""
    events = []
    for line in stderr.splitlines():
        for kind in ("saved", "loaded"):
            marker = f"checkpoint {kind}: "
            if marker in line:
                events.append({"kind": kind, **json.loads(line.split(marker, 1)[1])})
    return events


def _run(config: Path, overrides: List[str], ranks: int, step: int) -> List[Dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    args = ["train", str(config), *overrides, f"train.stop_at_step={step}", "train.max_steps=100"]
    proc = subprocess.run(launch_command(ranks, args), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench checkpoint: the {ranks}-rank run to step {step} failed: {last_line(proc.stderr)}")
    return _events(proc.stderr)


def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    if overrides:
        raise UserError("bench checkpoint takes no overrides: its runs are fixed (see side4video/bench/checkpoint.py)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = find_config(config)
    cuda = torch.cuda.is_available()
    size, frames = (28, 2) if quick else (56, 2)
    results: Dict = {"config": str(config_path), "host": host_info(), "cuda": cuda, "quick": quick, "events": []}
    with tempfile.TemporaryDirectory(prefix="side4video-checkpoint-") as tmp:
        work = Path(tmp)
        base = case_overrides(work / "run", clips_for(work, size, frames), size, frames, 100, cuda, quick)
        results["trainable_params"] = _trainable_params(config_path, base)
        for step, (ranks, batch) in enumerate(RUNS, 1):
            events = _run(config_path, [*base, f"train.batch_size={batch}"], ranks, step)
            results["events"] += events
            for e in events:
                print(_describe(e), flush=True)
            if step == UNIVERSAL_AFTER:
                results["universal"] = _universal(work / "run" / "checkpoints" / f"step_{step:07d}", work / "universal")
                print(_describe(results["universal"]), flush=True)
    (out_dir / "checkpoint.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(results, out_dir / "checkpoint.md")
    _write_plot(results, out_dir / "checkpoint.png")
    return results


def _trainable_params(config: Path, overrides: List[str]) -> int:
    from side4video.config import load_config
    from side4video.engine.factory import model_on_meta

    return model_on_meta(load_config(config, overrides)).parameter_counts()["trainable_params"]


def _describe(e: Dict) -> str:
    if e["kind"] == "universal":
        return (
            f"universal conversion of the {e['ranks']}-rank checkpoint (ds_to_universal): {e['seconds']:.1f} s, "
            f"{e['universal_bytes'] / 2**30:.2f} GiB in {e['files']} files"
        )
    if e["kind"] == "saved":
        return (
            f"save on {e['ranks']} rank(s): {e['seconds']:.1f} s (DeepSpeed files {e['deepspeed_seconds']:.1f} s, "
            f"gathered copy {e['trained_state_seconds']:.1f} s), DeepSpeed files {e['deepspeed_bytes'] / 2**30:.2f} "
            f"GiB, gathered trained state {e['trained_state_bytes'] / 2**30:.2f} GiB"
        )
    route = "its gathered copy" if e["written_by"] != e["ranks"] else "DeepSpeed's files"
    return f"load on {e['ranks']} rank(s) of a {e['written_by']}-rank checkpoint ({route}): {e['seconds']:.1f} s"


def _write_markdown(r: Dict, path: Path) -> None:
    lines = [
        f"# Checkpoints of `{Path(r['config']).name}`'s side network" + (" (quick)" if r["quick"] else ""),
        "",
        "| event | ranks | written by | seconds | of which DeepSpeed files / gathered copy | "
        "DeepSpeed files (GiB) | gathered state (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in r["events"]:
        deepspeed = f"{e['deepspeed_bytes'] / 2**30:.2f}" if "deepspeed_bytes" in e else ""
        gathered = f"{e['trained_state_bytes'] / 2**30:.2f}" if "trained_state_bytes" in e else ""
        parts = f"{e['deepspeed_seconds']:.1f} / {e['trained_state_seconds']:.1f}" if "deepspeed_seconds" in e else ""
        row = [e["kind"], e["ranks"], e.get("written_by", ""), f"{e['seconds']:.1f}", parts, deepspeed, gathered]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    u = r.get("universal")
    if u:
        lines += [
            "",
            f"DeepSpeed's universal format instead (`ds_to_universal` of the {u['ranks']}-rank checkpoint, offline): "
            f"{u['seconds']:.1f} s, {u['universal_bytes'] / 2**30:.2f} GiB in {u['files']} files.",
        ]
    path.write_text("\n".join(lines) + "\n")


def _write_plot(r: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{e['kind']} {e.get('written_by', e['ranks'])}->{e['ranks']}"
        if e["kind"] == "loaded"
        else f"save {e['ranks']}"
        for e in r["events"]
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(labels)), [e["seconds"] for e in r["events"]], color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("seconds (rank 0)")
    ax.set_title("checkpoint save and load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
