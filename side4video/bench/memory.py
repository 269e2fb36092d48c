"""`side4video bench memory`: what one training step costs per method, measured, and what it changes.

Methods side by side on one backbone (default: ViT-B/16, 224 px, fp32 training, frozen weights
stored in fp16 and computed in fp32 on CPUs): Side4Video, its light variant (d=128), the
ST-Adapter baseline, full fine-tuning and the linear probe, each at 1, 2 and 4 clips of 8 frames
and at 1 clip of 16 frames. The growth per added clip (the slope over 1, 2, 4 clips) is what the
method changes, the activations; the rest (the intercept) is fixed: gradients, optimizer state,
working memory. Beside every measured peak: the planner's prediction (engine/plan.py, counted on
the meta device). Then the engine layout question (the frozen backbone inside the DeepSpeed engine
or in an inference engine of its own, ZeRO-2 and ZeRO-3), and one case with glibc's default
malloc behaviour, which keeps freed memory (side4video/allocator.py).

Every case runs in a fresh process (peak memory is per process), with freed memory returned to
the system unless said otherwise: build the model, run two forward/backward/AdamW steps,
report the peak resident memory above the built model and the step time; on a GPU, the
allocator's peak. Writes OUT/memory.json, OUT/memory.md and OUT/memory.png.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from side4video.config import Config
from side4video.engine.metrics import rss_bytes, status_bytes
from side4video.errors import UserError, last_line

FULL_SETUP = [
    "model.backbone.name=ViT-B-16",
    "model.backbone.patch_size=0",
    "model.side.dim=320",
    "data.size=224",
    "data.frames=8",
    "model.backbone.precision=fp16",
]
QUICK_SETUP = [
    "model.backbone.name=ViT-T-16",
    "model.backbone.patch_size=0",
    "model.side.dim=128",
    "data.size=32",
    "data.frames=4",
    "model.backbone.precision=fp16",
]
BATCHES = (1, 2, 4)  # clips per step at the setup's frames; the growth per clip is the slope
PLAN_CHECK_BATCH = 2  # the batch at which the planner must be within PLAN_TOLERANCE of the measured peak
PLAN_TOLERANCE = 0.15
GOALS = {"side4video_vs_adapter": 0.5, "side4video_vs_full": 0.3}  # growth per added clip, at most

METHOD_CASES = [
    ("Side4Video", ["model.method=side4video"]),
    ("Side4Video light (d=128)", ["model.method=side4video", "model.side.dim=128"]),
    ("ST-Adapter", ["model.method=adapter"]),
    ("full fine-tuning", ["model.method=full"]),
    ("linear probe", ["model.method=linear_probe"]),
]
ENGINE_CASES = [
    ("shared, ZeRO-2", "shared", 2),
    ("separate, ZeRO-2", "separate", 2),
    ("shared, ZeRO-3", "shared", 3),
    ("separate, ZeRO-3", "separate", 3),
]


def peak_rss_bytes() -> int:
    """The resident peak since the process started or since `reset_peak_rss` (Linux VmHWM)."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Start a new peak from the current resident size (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def file_rss_bytes() -> int:
    """Resident file-backed pages: the code of the libraries (MKL, oneDNN, ...) paged in as used."""
    return status_bytes("RssFile")


# ----------------------------------------------------------------------------------- one case
class SideAndHead(nn.Module):
    """The trained part alone, for the 'separate' layout: the backbone's taps come in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.side, self.head = model.side, model.head

    def forward(self, video: torch.Tensor, taps: List[torch.Tensor]) -> torch.Tensor:
        return self.head(self.side(video, taps))


class BackboneAlone(nn.Module):
    """The frozen backbone on its own, for the 'separate' layout's inference engine."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, frames: torch.Tensor, num_frames: int) -> List[torch.Tensor]:
        return self.backbone(frames, num_frames=num_frames)


def _plain_step(model, optimizer, video, labels) -> None:
    loss = F.cross_entropy(model(video).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _engine_step(engine, backbone, video, labels) -> None:
    if backbone is None:
        logits = engine(video)
    else:
        taps = backbone(video.flatten(0, 1), num_frames=video.shape[1])
        logits = engine(video, taps)
    loss = F.cross_entropy(logits.float(), labels)
    engine.backward(loss)
    engine.step()


def _engines(cfg: Config, model, precision, layout: str):
    """DeepSpeed over the whole model, or over side + head with the backbone beside it."""
    from side4video import distributed
    from side4video.engine import deepspeed_engine

    device = next(model.parameters()).device
    deepspeed_engine.init_distributed(distributed.detect(), device)
    if layout == "shared":
        return deepspeed_engine.initialize(model, cfg, precision, world_size=1), None
    engine = deepspeed_engine.initialize(SideAndHead(model), cfg, precision, world_size=1)
    frozen = BackboneAlone(model.backbone)
    if cfg.deepspeed.zero_stage == 3:  # an inference-only ZeRO-3 engine partitions/offloads it too
        frozen = deepspeed_engine.initialize_for_inference(frozen, cfg, precision, world_size=1)
    return engine, frozen


def measure(
    config: Optional[str],
    overrides: Sequence[str],
    layout: str = "",
    steps: int = 2,
    release_freed: bool = True,
    variants: Optional[Sequence[Sequence[int]]] = None,
) -> List[Dict]:
    """Runs in the case's own process: build the model once, then for each (clips, frames) variant
    `steps` training steps with the peak counted from the built model. Returns one dict per variant.

    Variants share the process: with freed memory released, the resident size falls back between
    them, and each starts a new peak; the first variant's first step creates the AdamW state, the
    second step of each runs with the previous gradients and that state alive (the steady state).
    """
    from side4video.allocator import release_freed_memory
    from side4video.config import load_config
    from side4video.engine.factory import model_from_config, run_precision
    from side4video.precision import dtype_name

    released = release_freed_memory() if release_freed else False
    cfg = load_config(config, list(overrides))
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base_rss = rss_bytes()
    precision = run_precision(cfg, cuda)
    model = model_from_config(cfg, device=device, precision=precision)
    counts = model.parameter_counts()
    S = cfg.data.size
    if layout:
        engine, backbone = _engines(cfg, model, precision, layout)
        step = lambda video, labels: _engine_step(engine, backbone, video, labels)  # noqa: E731
    else:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = lambda video, labels: _plain_step(model, optimizer, video, labels)  # noqa: E731
    built_rss, built_file_rss = rss_bytes(), file_rss_bytes()
    results = []
    for B, T in variants or [(cfg.train.batch_size, cfg.data.frames)]:
        video = torch.randn(B, T, 3, S, S, device=device)
        labels = torch.randint(0, cfg.data.num_classes, (B,), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(video, labels)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = peak_rss_bytes()
        result = {
            "batch": int(B),
            "frames": int(T),
            "trainable_params": counts["trainable_params"],
            "backbone_params": counts["backbone_params"],
            "model_bytes": built_rss - base_rss,
            "peak_rss_bytes": peak,
            # above the built model and the step's input clips
            "peak_above_model_bytes": peak - built_rss - video.numel() * video.element_size(),
            # Library code first run during the steps (clean file pages, not allocated memory): the
            # rest of the peak above the model is what the planner predicts.
            "library_code_bytes": max(file_rss_bytes() - built_file_rss, 0),
            "step_s": times[-1],
            "first_step_s": times[0],
            "storage_dtype": dtype_name(precision.storage),
            "compute_dtype": dtype_name(precision.compute),
            "freed_memory_released": released,
        }
        if cuda:
            result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        results.append(result)
        del video, labels
    return results


def _run_case(
    config: Optional[str],
    overrides: Sequence[str],
    layout: str,
    steps: int,
    release_freed: bool = True,
    variants: Optional[Sequence[Sequence[int]]] = None,
) -> List[Dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    if layout:  # a one-process DeepSpeed job
        env.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(29000 + os.getpid() % 1000),
        )
    case = {
        "config": config,
        "overrides": list(overrides),
        "layout": layout,
        "steps": steps,
        "release_freed": release_freed,
        "variants": [list(v) for v in variants] if variants else None,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "side4video.bench.memory", json.dumps(case)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {overrides} {layout} failed: {last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(config: Optional[str], overrides: Sequence[str]) -> Dict[str, int]:
    """The planner's figures for a plain step of this case on this host (meta device, no memory)."""
    from side4video.config import load_config
    from side4video.engine.plan import plain_step_peak

    return plain_step_peak(load_config(config, list(overrides)))


# ------------------------------------------------------------------------------------- report
def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config is not None and not Path(config).is_file():
        raise UserError(f"bench memory: config file not found: {config}")
    setup = list(QUICK_SETUP if quick else FULL_SETUP) + ["deepspeed.precision=fp32"] + list(overrides)
    frames = int(_describe(setup)["data.frames"])
    steps = 2  # the second step runs with the first's gradients and AdamW state alive: the steady state
    results = {
        "setup": _describe(setup),
        "host": _host(),
        "steps": steps,
        "batches": list(BATCHES),
        "long_frames": 2 * frames,
        "methods": [],
        "engine_layout": [],
    }
    variants = [(b, frames) for b in BATCHES] + [(1, 2 * frames)]
    for label, case in METHOD_CASES:
        runs = _run_case(config, [*setup, *case], "", steps, variants=variants)
        for run in runs:
            run["predicted"] = _predicted(
                config, [*setup, *case, f"train.batch_size={run['batch']}", f"data.frames={run['frames']}"]
            )
            print(
                f"{label:<26} {run['batch']} x {run['frames']:>2} frames  peak above model "
                f"{run['peak_above_model_bytes'] / 2**30:6.2f} GiB, allocated {allocated(run) / 2**30:6.2f} "
                f"(planner {run['predicted']['peak_above_model'] / 2**30:6.2f})  step {run['step_s']:6.2f} s",
                flush=True,
            )
        results["methods"].append({"method": label, "runs": runs, **_growth(runs, frames)})
    for label, layout, stage in ENGINE_CASES:
        ov = [
            *setup,
            "model.method=side4video",
            f"train.batch_size={PLAN_CHECK_BATCH}",
            f"deepspeed.zero_stage={stage}",
        ]
        row = _run_case(config, ov, layout, steps)[0]
        results["engine_layout"].append({"layout": label, **row})
        print(
            f"{label:<26} peak above model {row['peak_above_model_bytes'] / 2**30:6.2f} GiB   "
            f"step {row['step_s']:6.2f} s",
            flush=True,
        )
    ov = [*setup, "model.method=side4video", f"train.batch_size={PLAN_CHECK_BATCH}"]
    results["glibc_default"] = {"method": "Side4Video", **_run_case(config, ov, "", steps, release_freed=False)[0]}
    _ratios(results)
    (out_dir / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(results, out_dir / "memory.md")
    _write_plot(results, out_dir / "memory.png")
    return results


def allocated(row: Dict) -> int:
    """The peak above the model less the library code paged in meanwhile: memory the step allocated."""
    return row["peak_above_model_bytes"] - row.get("library_code_bytes", 0)


def _growth(runs: List[Dict], frames: int) -> Dict:
    """Per added clip (least-squares slope over the batches at `frames`), the fixed part (its
    intercept at 0 clips) and the growth from `frames` to twice as many frames at 1 clip."""
    pts = [(r["batch"], allocated(r)) for r in runs if r["frames"] == frames]
    n = len(pts)
    mean_b = sum(b for b, _ in pts) / n
    mean_m = sum(m for _, m in pts) / n
    slope = sum((b - mean_b) * (m - mean_m) for b, m in pts) / sum((b - mean_b) ** 2 for b, _ in pts)
    one = next(r for r in runs if r["batch"] == 1 and r["frames"] == frames)
    long = next(r for r in runs if r["frames"] == 2 * frames)
    check = next(r for r in runs if r["batch"] == PLAN_CHECK_BATCH and r["frames"] == frames)
    predicted = check["predicted"]["peak_above_model"]
    measured = allocated(check)
    return {
        "per_clip_bytes": int(slope),
        "fixed_bytes": int(mean_m - slope * mean_b),
        "per_frames_doubled_bytes": allocated(long) - allocated(one),
        "gradients_and_optimizer_bytes": check["predicted"]["gradients"] + check["predicted"]["optimizer_state"],
        "plan_check": {
            "batch": PLAN_CHECK_BATCH,
            "measured": measured,
            "predicted": predicted,
            "error": (predicted - measured) / measured if measured else None,
        },
    }


def _describe(setup: List[str]) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in setup)


def _host() -> Dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _ratios(results: Dict) -> None:
    """Side4Video against the others: growth per added clip (what the method changes) and the
    peak above the model at the check batch."""
    by = {r["method"]: r for r in results["methods"]}
    side, light = by["Side4Video"], by["Side4Video light (d=128)"]
    adapter, full = by["ST-Adapter"], by["full fine-tuning"]

    def peak(row):
        return row["plan_check"]["measured"]

    per_clip = {
        "side4video_vs_adapter": side["per_clip_bytes"] / adapter["per_clip_bytes"],
        "side4video_vs_full": side["per_clip_bytes"] / full["per_clip_bytes"],
        "light_vs_adapter": light["per_clip_bytes"] / adapter["per_clip_bytes"],
    }
    results["per_clip_ratios"] = per_clip
    results["goals"] = {k: {"ratio": per_clip[k], "at_most": v, "met": per_clip[k] <= v} for k, v in GOALS.items()}
    results["savings"] = {
        "side4video_vs_full": 1 - peak(side) / peak(full),
        "side4video_vs_adapter": 1 - peak(side) / peak(adapter),
        "light_vs_adapter": 1 - peak(light) / peak(adapter),
    }
    checked = ("Side4Video", "ST-Adapter", "full fine-tuning", "linear probe")
    results["plan_within_tolerance"] = {m: abs(by[m]["plan_check"]["error"]) <= PLAN_TOLERANCE for m in checked}


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _less(saving: float) -> str:
    return f"{100 * abs(saving):.0f}% {'less' if saving >= 0 else 'more'}"


def _write_markdown(r: Dict, path: Path) -> None:
    s = r["setup"]
    frames, long = int(s["data.frames"]), r["long_frames"]
    first = r["methods"][0]["runs"][0]
    lines = [
        f"# Memory per training step ({s.get('model.backbone.name')}, {s.get('data.size')} px, {frames} frames)",
        "",
        f"Host: {r['host']['cpu']}, {r['host']['cores']} cores, GPU: {r['host']['gpu'] or 'none'}, torch "
        f"{r['host']['torch']}. One process per method (its clip and frame variants one after the other, "
        f"{r['steps']} steps each, the step time of the last). Frozen weights stored in "
        f"{s.get('model.backbone.precision')}, computed in {first['compute_dtype']}; training in fp32 with AdamW. "
        f"Peak resident memory above the built model and the step's clips, freed memory returned to the system "
        f"(side4video/allocator.py). 'Allocated' leaves out the library code (MKL, oneDNN) paged in during the "
        f"steps; it is what the planner predicts, counted on the meta device (engine/plan.py).",
        "",
        "## What the method changes: growth per added clip",
        "",
        f"| method | trainable (M) | per added clip (MiB) | {frames} -> {long} frames, 1 clip (MiB) | "
        f"fixed: intercept (MiB) | gradients + AdamW (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["methods"]:
        lines.append(
            f"| {row['method']} | {row['runs'][0]['trainable_params'] / 1e6:.2f} | "
            f"{_mib(row['per_clip_bytes'])} | {_mib(row['per_frames_doubled_bytes'])} | "
            f"{_mib(row['fixed_bytes'])} | {_mib(row['gradients_and_optimizer_bytes'])} |"
        )
    lines += [
        "",
        "Goals per added clip: "
        + "; ".join(
            f"{k.replace('_vs_', ' / ')} = {g['ratio']:.2f} "
            f"(at most {g['at_most']}: {'met' if g['met'] else 'NOT met'})"
            for k, g in r["goals"].items()
        )
        + ".",
        "",
        "## Peak above the model: measured and planned",
        "",
        "| method | clips x frames | peak above model (GiB) | of it library code (MiB) | allocated (GiB) | "
        "planner (GiB) | planner error | peak RSS (GiB) | step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["methods"]:
        for run in row["runs"]:
            m, p = allocated(run), run["predicted"]["peak_above_model"]
            lines.append(
                f"| {row['method']} | {run['batch']} x {run['frames']} | "
                f"{_gib(run['peak_above_model_bytes'])} | {_mib(run['library_code_bytes'])} | {_gib(m)} | "
                f"{_gib(p)} | {100 * (p - m) / m:+.0f}% | {_gib(run['peak_rss_bytes'])} | "
                f"{run['step_s']:.2f} |"
            )
    sv = r["savings"]
    checked = ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in r["plan_within_tolerance"].items())
    g = r["glibc_default"]
    side = next(run for run in r["methods"][0]["runs"] if run["batch"] == PLAN_CHECK_BATCH)
    lines += [
        "",
        f"Planner within {100 * PLAN_TOLERANCE:.0f}% of the allocated peak at {PLAN_CHECK_BATCH} clips: {checked}.",
        "",
        f"At {PLAN_CHECK_BATCH} clips Side4Video allocates {_less(sv['side4video_vs_full'])} than full "
        f"fine-tuning and {_less(sv['side4video_vs_adapter'])} than ST-Adapter; the light variant "
        f"{_less(sv['light_vs_adapter'])} than ST-Adapter.",
        "",
        f"Freed memory kept by the process (glibc's default malloc behaviour), Side4Video at "
        f"{PLAN_CHECK_BATCH} x {frames} peaks {_gib(g['peak_above_model_bytes'])} GiB above the model "
        f"(step {g['step_s']:.2f} s), against {_gib(side['peak_above_model_bytes'])} GiB with it returned "
        f"(step {side['step_s']:.2f} s).",
        "",
        f"## Engine layout (Side4Video, DeepSpeed, one process, {PLAN_CHECK_BATCH} clips)",
        "",
        "| layout | peak above model (GiB) | peak RSS (GiB) | step (s) |",
        "|---|---|---|---|",
    ]
    for row in r["engine_layout"]:
        lines.append(
            f"| {row['layout']} | {_gib(row['peak_above_model_bytes'])} | {_gib(row['peak_rss_bytes'])} | "
            f"{row['step_s']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _write_plot(r: Dict, path: Path) -> None:
    from side4video.engine.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for row in r["methods"]:
        runs = [x for x in row["runs"] if x["frames"] == int(r["setup"]["data.frames"])]
        (line,) = axes[0].plot(
            [x["batch"] for x in runs], [allocated(x) / 2**30 for x in runs], "o-", label=row["method"]
        )
        axes[0].plot(
            [x["batch"] for x in runs],
            [x["predicted"]["peak_above_model"] / 2**30 for x in runs],
            "x--",
            color=line.get_color(),
        )
    axes[0].set_xlabel("clips per step")
    axes[0].set_ylabel("allocated above the model (GiB); x: planner")
    axes[0].legend(fontsize=8)
    names = [row["method"] for row in r["methods"]]
    axes[1].barh(names, [row["per_clip_bytes"] / 2**20 for row in r["methods"]], color="tab:blue")
    axes[1].set_xlabel("growth per added clip (MiB)")
    axes[1].invert_yaxis()
    s = r["setup"]
    fig.suptitle(f"{s.get('model.backbone.name')} {s.get('data.size')}px x{s.get('data.frames')} frames")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _main(argv: Sequence[str]) -> None:
    case = json.loads(argv[0])
    print(
        json.dumps(
            measure(
                case["config"],
                case["overrides"],
                case["layout"],
                case["steps"],
                case.get("release_freed", True),
                case.get("variants"),
            )
        )
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
