"""`side4video bench memory`: what one training step costs per method, measured.

Methods side by side on one backbone and input (default: ViT-B/16, 224 px, 8 frames, 2 clips, as
docs/model.md's memory table at a CPU-sized batch): Side4Video, its light variant (d=128), the
ST-Adapter baseline, full fine-tuning and the linear probe. Then the engine layout question of
the training engine: the frozen backbone inside the DeepSpeed engine ("shared") or outside it,
in an inference-only engine of its own ("separate"), under ZeRO-2 and ZeRO-3.

Every case runs in a fresh process (peak memory is per process): build the model, run
`--steps` forward/backward/AdamW steps, report the peak resident memory above the built model
(activations, gradients, optimizer state) and the step time; on a GPU, the allocator's peak.
Writes OUT/memory.json, OUT/memory.md and OUT/memory.png.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from side4video.errors import UserError

FULL_SETUP = ["model.backbone.name=ViT-B-16", "model.backbone.patch_size=0", "model.side.dim=320", "data.size=224",
              "data.frames=8", "train.batch_size=2", "model.backbone.precision=fp16"]
QUICK_SETUP = ["model.backbone.name=ViT-T-16", "model.backbone.patch_size=0", "model.side.dim=128", "data.size=32",
               "data.frames=4", "train.batch_size=2", "model.backbone.precision=fp16"]

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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def _engines(cfg, model, precision, layout: str):
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


def measure(config: Optional[str], overrides: Sequence[str], layout: str = "", steps: int = 2) -> Dict:
    """Runs in the case's own process; returns its figures."""
    from side4video.config import load_config
    from side4video.engine.factory import model_from_config, run_precision
    from side4video.precision import dtype_name

    cfg = load_config(config, list(overrides))
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base_rss = rss_bytes()
    precision = run_precision(cfg, cuda)
    model = model_from_config(cfg, device=device, precision=precision)
    counts = model.parameter_counts()
    B, T, S = cfg.train.batch_size, cfg.data.frames, cfg.data.size
    video = torch.randn(B, T, 3, S, S, device=device)
    labels = torch.randint(0, cfg.data.num_classes, (B,), device=device)
    if layout:
        engine, backbone = _engines(cfg, model, precision, layout)
        step = lambda: _engine_step(engine, backbone, video, labels)  # noqa: E731
    else:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = lambda: _plain_step(model, optimizer, video, labels)  # noqa: E731
    built_rss = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "trainable_params": counts["trainable_params"],
        "backbone_params": counts["backbone_params"],
        "model_bytes": built_rss - base_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_above_model_bytes": peak_rss_bytes() - built_rss,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "first_step_s": times[0],
        "storage_dtype": dtype_name(precision.storage),
        "compute_dtype": dtype_name(precision.compute),
    }
    if cuda:
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def _run_case(config: Optional[str], overrides: Sequence[str], layout: str, steps: int) -> Dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    if layout:  # a one-process DeepSpeed job
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29000 + os.getpid() % 1000))
    cmd = [sys.executable, "-m", "side4video.bench.memory", json.dumps({"config": config, "overrides": list(overrides),
                                                                         "layout": layout, "steps": steps})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"memory case {overrides} {layout} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- report
def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config is not None and not Path(config).is_file():
        raise UserError(f"bench memory: config file not found: {config}")
    setup = list(QUICK_SETUP if quick else FULL_SETUP) + ["deepspeed.precision=fp32"] + list(overrides)
    steps = 2 if quick else 3
    results = {"setup": _describe(setup), "host": _host(), "steps": steps, "methods": [], "engine_layout": []}
    for label, case in METHOD_CASES:
        row = _run_case(config, [*setup, *case], "", steps)
        results["methods"].append({"method": label, **row})
        print(f"{label:<26} peak above model {row['peak_above_model_bytes'] / 2**30:6.2f} GiB   "
              f"step {row['step_s']:6.2f} s", flush=True)
    for label, layout, stage in ENGINE_CASES:
        row = _run_case(config, [*setup, "model.method=side4video", f"deepspeed.zero_stage={stage}"], layout, steps)
        results["engine_layout"].append({"layout": label, **row})
        print(f"{label:<26} peak above model {row['peak_above_model_bytes'] / 2**30:6.2f} GiB   "
              f"step {row['step_s']:6.2f} s", flush=True)
    _ratios(results)
    (out_dir / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(results, out_dir / "memory.md")
    _write_plot(results, out_dir / "memory.png")
    return results


def _describe(setup: List[str]) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in setup)


def _host() -> Dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def _ratios(results: Dict) -> None:
    """Side4Video's saving against the others, on the measured peak above the model."""
    by = {r["method"]: r["peak_above_model_bytes"] for r in results["methods"]}
    side = by["Side4Video"]
    light = by["Side4Video light (d=128)"]
    results["savings"] = {
        "side4video_vs_full": 1 - side / by["full fine-tuning"],
        "side4video_vs_adapter": 1 - side / by["ST-Adapter"],
        "light_vs_adapter": 1 - light / by["ST-Adapter"],
    }


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _less(saving: float) -> str:
    return f"{100 * abs(saving):.0f}% {'less' if saving >= 0 else 'more'}"


def _write_markdown(r: Dict, path: Path) -> None:
    s = r["setup"]
    lines = [
        f"# Memory per training step ({s.get('model.backbone.name')}, {s.get('data.size')} px, "
        f"{s.get('data.frames')} frames, batch {s.get('train.batch_size')})",
        "",
        f"Host: {r['host']['cpu']}, {r['host']['cores']} cores, GPU: {r['host']['gpu'] or 'none'}, torch {r['host']['torch']}. "
        f"{r['steps']} steps per case, the median of all but the first. Frozen weights stored in {s.get('model.backbone.precision')}, "
        f"computed in {r['methods'][0]['compute_dtype']}.",
        "",
        "| method | trainable (M) | peak above model (GiB) | peak RSS (GiB) | step (s) |",
        "|---|---|---|---|---|",
    ]
    for row in r["methods"]:
        lines.append(f"| {row['method']} | {row['trainable_params'] / 1e6:.2f} | {_gib(row['peak_above_model_bytes'])} | "
                     f"{_gib(row['peak_rss_bytes'])} | {row['step_s']:.2f} |")
    sv = r["savings"]
    lines += ["", f"Side4Video needs {_less(sv['side4video_vs_full'])} than full fine-tuning and "
                  f"{_less(sv['side4video_vs_adapter'])} than ST-Adapter; the light variant "
                  f"{_less(sv['light_vs_adapter'])} than ST-Adapter (peak above the model).", "",
              "## Engine layout (Side4Video, DeepSpeed, one process)", "",
              "| layout | peak above model (GiB) | peak RSS (GiB) | step (s) |", "|---|---|---|---|"]
    for row in r["engine_layout"]:
        lines.append(f"| {row['layout']} | {_gib(row['peak_above_model_bytes'])} | {_gib(row['peak_rss_bytes'])} | "
                     f"{row['step_s']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def _write_plot(r: Dict, path: Path) -> None:
    from side4video.engine.plots import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [row["method"] for row in r["methods"]]
    axes[0].barh(names, [row["peak_above_model_bytes"] / 2**30 for row in r["methods"]], color="tab:blue")
    axes[0].set_xlabel("peak memory above the model (GiB)")
    axes[0].invert_yaxis()
    axes[1].barh(names, [row["step_s"] for row in r["methods"]], color="tab:orange")
    axes[1].set_xlabel("training step (s)")
    axes[1].invert_yaxis()
    s = r["setup"]
    fig.suptitle(f"{s.get('model.backbone.name')} {s.get('data.size')}px x{s.get('data.frames')} frames, "
                 f"batch {s.get('train.batch_size')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _main(argv: Sequence[str]) -> None:
    case = json.loads(argv[0])
    print(json.dumps(measure(case["config"], case["overrides"], case["layout"], case["steps"])))


if __name__ == "__main__":
    _main(sys.argv[1:])
