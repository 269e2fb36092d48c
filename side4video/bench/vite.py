"""`side4video bench vite`: the 4.35 B-parameter EVA ViT-E/14 trained for real, measured.

Each case is a real `side4video train` run of configs/experiments/ssv2_eva02e14.yaml (EVA02-E-14,
random init stored in fp16, the 183 M-parameter EVA side network, ZeRO-3 with `offload_param: cpu`)
on generated clips, in fresh processes:

  (a) 1 rank at a reduced input (56 px, 2 frames, 1 clip), a few steps;
  (b) the same on 2 ranks of this host: the backbone partitioned between them;
  (c) one step at the paper's input (224 px, 8 frames, 1 clip), 1 rank.

On CPU hosts the blocks compute in fp32 (upcast one at a time) and the side network trains in
fp32 (bf16 matmuls are 10-400x slower there); on GPUs the configured precision. Per rank the run
reports (summary.json, `memory_per_rank`): resident memory once the engine is built, the peak
while training (before the final save), the backbone bytes it holds, and the step times. The
weights' own size is computed beside them, so the peak reads as a ratio to the weights, and so is
`side4video plan`'s prediction for the same case.
Writes OUT/vite.json, OUT/vite.md and OUT/vite.png.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from side4video.distributed import launch_command
from side4video.errors import UserError, last_line

CONFIG = "configs/experiments/ssv2_eva02e14.yaml"
CASES = [  # name, ranks, size, frames, steps
    ("a: 1 rank, 56 px x 2 frames", 1, 56, 2, 3),
    ("b: 2 ranks, 56 px x 2 frames", 2, 56, 2, 3),
    ("c: 1 rank, 224 px x 8 frames", 1, 224, 8, 1),
]
QUICK_CASES = [  # a tiny EVA-shaped backbone: the benchmark's own smoke test
    ("a: 1 rank, 28 px x 2 frames", 1, 28, 2, 2),
    ("b: 2 ranks, 28 px x 2 frames", 2, 28, 2, 2),
]
QUICK_MODEL = ["model.backbone.width=128", "model.backbone.layers=4", "model.backbone.heads=2", "model.side.dim=64"]


def find_config(config: Optional[str]) -> Path:
    if config:
        return Path(config)
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / CONFIG).is_file():
            return root / CONFIG
    raise UserError(f"bench vite: {CONFIG} not found (run from the side4video checkout, or give --config)")


def clips_for(folder: Path, size: int, frames: int) -> Path:
    from side4video.data.synthetic import make_synthetic

    data = folder / f"clips-{size}px-{frames}f"
    if not (data / "train" / "manifest.json").is_file():
        # 4 shards of 2: enough readers for 2 ranks x 2 readers; frames >= 2 per TSN segment
        make_synthetic(
            str(data), videos=8, classes=2, val_videos=0, frames=max(2 * frames, 4), size=size, shard_samples=2
        )
    return data / "train" / "manifest.json"


def case_overrides(
    run_dir: Path, shards: Path, size: int, frames: int, steps: int, cuda: bool, quick: bool
) -> List[str]:
    out = [
        f"data.train.shards={shards}",
        "data.val.shards=",
        f"data.size={size}",
        f"data.resize=[{size}]",
        f"data.frames={frames}",
        "data.num_classes=2",
        "data.repeated_views=1",
        "data.randaugment.enabled=false",
        "data.shuffle_buffer=4",
        "train.batch_size=1",
        f"train.max_steps={steps}",
        "train.warmup_epochs=0",
        "train.export=false",
        "train.log_every=1",
        f"train.output_dir={run_dir}",
        "train.save_every=1000000",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plots=false",
    ]
    if not cuda:  # CPU hosts: fp32 compute (bf16 storage stays); the config's precision on GPUs
        out += ["train.device=cpu", "deepspeed.precision=fp32"]
    return out + (QUICK_MODEL if quick else [])


def _weights(config: Path, overrides: Sequence[str]) -> Dict[str, int]:
    """The weights' own bytes (meta build: exact counts, no memory)."""
    from side4video.config import load_config
    from side4video.engine.factory import model_on_meta, run_precision
    from side4video.precision import itemsize

    cfg = load_config(config, list(overrides))
    precision = run_precision(cfg)
    counts = model_on_meta(cfg, precision).parameter_counts()
    trainable = counts["trainable_params"]
    train = itemsize(precision.train)
    master = 4 if precision.train != torch.float32 else 0
    return {
        "backbone_params": counts["backbone_params"],
        "trainable_params": trainable,
        "backbone_bytes": counts["backbone_params"] * itemsize(precision.storage),
        # weights + gradients in the training precision, fp32 master copies, AdamW's two moments
        "trainable_state_bytes": trainable * (2 * train + master + 8),
    }


def planned_peak_bytes(config: Path, overrides: Sequence[str], ranks: int, cuda: bool) -> int:
    """`side4video plan`'s predicted peak per rank for a case: GPU memory on GPUs; on CPU hosts the
    device total plus what it offloads to host memory (the same memory there). Neither counts the
    process's own baseline (interpreter, libraries), which the measured RSS includes."""
    from side4video.config import load_config
    from side4video.engine.plan import plan

    placement = [] if cuda else ["slurm.gpus_per_node=0", f"slurm.tasks_per_node={ranks}"]
    cfg = load_config(config, [*overrides, "slurm.nodes=1", *placement])
    rank_plan = plan(cfg, gpus=ranks if cuda else None)["plan"]
    offloaded = 0 if cuda else rank_plan["frozen_weights"]["host"] + rank_plan["trained_state"]["host"]
    return int(rank_plan["peak_per_rank"] + offloaded)


def _run_case(
    config: Path,
    name: str,
    ranks: int,
    size: int,
    frames: int,
    steps: int,
    work: Path,
    cuda: bool,
    quick: bool,
    extra: Sequence[str] = (),
) -> Dict:
    """One case in fresh processes; `extra`: overrides after the case's own (the GPU kit's
    `deepspeed.offload_param=none` run)."""
    run_dir = work / name.split(":")[0]
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = case_overrides(run_dir, clips_for(work, size, frames), size, frames, steps, cuda, quick)
    overrides += list(extra)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks))),
    }
    proc = subprocess.run(
        launch_command(ranks, ["train", str(config), *overrides]), env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench vite case {name!r} failed: {last_line(proc.stderr)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [r["step_s"] for r in rows if r.get("kind") == "train"]
    return {
        "case": name,
        "ranks": ranks,
        "size": size,
        "frames": frames,
        "steps": len(step_s),
        "step_s": step_s,
        "steady_step_s": min(step_s[1:] or step_s),
        "per_rank": sorted(summary["memory_per_rank"], key=lambda m: m["rank"]),
        "planned_peak_per_rank": planned_peak_bytes(config, overrides, ranks, cuda),
        **_weights(config, overrides),
    }


def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    if overrides:
        raise UserError("bench vite takes no overrides: its cases are fixed (see side4video/bench/vite.py)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = find_config(config)
    cuda = torch.cuda.is_available()
    from side4video.config import load_config

    storage = str(load_config(config_path, []).model.backbone.precision)
    results = {"config": str(config_path), "host": host_info(), "cuda": cuda, "quick": quick, "storage": storage}
    results["cases"] = []
    with tempfile.TemporaryDirectory(prefix="side4video-vite-") as tmp:
        for name, ranks, size, frames, steps in QUICK_CASES if quick else CASES:
            row = _run_case(config_path, name, ranks, size, frames, steps, Path(tmp), cuda, quick)
            results["cases"].append(row)
            peaks = ", ".join(f"{m['peak_rss_training_bytes'] / 2**30:.2f}" for m in row["per_rank"])
            print(f"{name:<32} peak per rank {peaks} GiB   step {row['steady_step_s']:.1f} s", flush=True)
    _ratios(results)
    (out_dir / "vite.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(results, out_dir / "vite.md")
    _write_plot(results, out_dir / "vite.png")
    return results


def host_info() -> Dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _ratios(results: Dict) -> None:
    """Peak over the weights (backbone + trained state), and the 2-rank partition against 1 rank."""
    for row in results["cases"]:
        weights = row["backbone_bytes"] + row["trainable_state_bytes"]
        row["weights_bytes"] = weights
        row["peak_over_weights"] = max(m["peak_rss_training_bytes"] for m in row["per_rank"]) / weights
        row["backbone_held_fraction"] = [m["backbone_bytes_held"] / row["backbone_bytes"] for m in row["per_rank"]]
    one = next((r for r in results["cases"] if r["ranks"] == 1), None)
    two = next((r for r in results["cases"] if r["ranks"] == 2), None)
    if one and two:
        results["two_ranks_sum_minus_one_rank_bytes"] = (
            sum(m["peak_rss_training_bytes"] for m in two["per_rank"]) - one["per_rank"][0]["peak_rss_training_bytes"]
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _write_markdown(r: Dict, path: Path) -> None:
    h = r["host"]
    lines = [
        f"# EVA ViT-E/14 training steps ({'GPU' if r['cuda'] else 'CPU'}: {h['gpu'] or h['cpu']}, {h['cores']} cores)",
        "",
        f"Config {r['config']}: random-init EVA02-E-14 stored in {r.get('storage', 'fp16')}, ZeRO-3 + offload_param cpu"
        + ("" if r["cuda"] else ", blocks computed in fp32, side network trained in fp32 (CPU host)")
        + ".",
        "",
        "| case | rank | built (GiB) | peak training (GiB) | planned (GiB) | backbone held (GiB) | weights (GiB) "
        "| peak / weights | step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["cases"]:
        for m in row["per_rank"]:
            lines.append(
                f"| {row['case']} | {m['rank']} | {_gib(m['rss_after_build_bytes'])} | "
                f"{_gib(m['peak_rss_training_bytes'])} | {_gib(row['planned_peak_per_rank'])} | "
                f"{_gib(m['backbone_bytes_held'])} | "
                f"{_gib(row['weights_bytes'])} | {row['peak_over_weights']:.2f} | {row['steady_step_s']:.1f} |"
            )
    if "two_ranks_sum_minus_one_rank_bytes" in r:
        lines += ["", f"2 ranks together peak {_gib(r['two_ranks_sum_minus_one_rank_bytes'])} GiB above 1 rank."]
    lines += ["", *_timeline_table(r)]
    path.write_text("\n".join(lines) + "\n")


def _timeline_table(r: Dict) -> List[str]:
    """Each rank's resident memory after each phase of its run (engine/metrics.MemoryTimeline),
    GiB: the size then / the peak so far."""
    marks = [m["at"] for m in r["cases"][0]["per_rank"][0]["timeline"]]
    lines = [
        "Resident memory after each phase, GiB (now / peak so far):",
        "",
        "| case | rank | " + " | ".join(marks) + " |",
        "|---|---|" + "---|" * len(marks),
    ]
    for row in r["cases"]:
        for m in row["per_rank"]:
            cells = [f"{_gib(t['rss_bytes'])} / {_gib(t['peak_bytes'])}" for t in m["timeline"]]
            lines.append(f"| {row['case']} | {m['rank']} | " + " | ".join(cells) + " |")
    return lines


def _write_plot(r: Dict, path: Path) -> None:
    from side4video.engine.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    labels, peaks, held, built = [], [], [], []
    for row in r["cases"]:
        for m in row["per_rank"]:
            labels.append(f"{row['case'].split(':')[0]} r{m['rank']}")
            peaks.append(m["peak_rss_training_bytes"] / 2**30)
            built.append(m["rss_after_build_bytes"] / 2**30)
            held.append(m["backbone_bytes_held"] / 2**30)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(labels))
    ax.bar([i - 0.27 for i in x], held, width=0.27, label="backbone held")
    ax.bar(list(x), built, width=0.27, label="after build")
    ax.bar([i + 0.27 for i in x], peaks, width=0.27, label="peak training")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GiB per rank")
    ax.legend()
    ax.set_title("EVA ViT-E/14 + side network, ZeRO-3 + CPU offload")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
