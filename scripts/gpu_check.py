"""The GPU checks of the portable kit, run by scripts/gpu_check.sh once the kit is installed:

1. what imports (side4video from the kit's folder, its dependencies; NVIDIA DALI may be absent:
   the loader then decodes with PyAV, in one log line);
2. the GPU tests that need no DALI (tests/gpu: fp16 storage + compute with loss scaling, ZeRO-3
   on NCCL with one GPU, predict on cuda:0), under pytest;
3. `bench vite` case c on the GPU (EVA ViT-E/14, 224 px, 8 frames, fp16 storage, 1 rank) with
   `offload_param: cpu` and with `none`: max_memory_allocated, step time and clips/s beside the
   planner's figure.

Everything goes into one JSON (--out), written after each part. Exit 2 where torch sees no GPU
(after part 1), 1 when a part failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = "fp16_storage or nccl_zero3_steps or predict_puts_model"  # the tests/gpu checks that need no DALI
MODULES = ("side4video", "deepspeed", "av", "open_clip", "timm", "webdataset", "omegaconf", "submitit", "pytest")
BUDGET_S = 480  # the kit's promise: under 8 minutes on one GPU


def imports() -> dict:
    found = {}
    for name in MODULES:
        module = importlib.import_module(name)
        found[name] = {"version": getattr(module, "__version__", ""), "file": getattr(module, "__file__", "")}
    import torch

    try:
        importlib.import_module("nvidia.dali")
        dali = True
    except ImportError:
        dali = False
    import side4video.cli.main  # noqa: F401 - the whole command line imports
    import side4video.engine.train  # noqa: F401

    return {"modules": found, "dali": dali, "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def gpu_tests(work: Path, timeout: float) -> list:
    xml = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", "-k", TESTS]
    proc = subprocess.run([*cmd, f"--junitxml={xml}"], capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-3000:], end="", flush=True)
    results = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            outcome = "failed" if failed else "skipped" if skipped else "passed"
            results.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    if not results:
        results.append({"test": "tests/gpu", "outcome": "failed", "output": (proc.stdout + proc.stderr)[-2000:]})
    return results


def bench_case(offload: str, work: Path) -> dict:
    from side4video.bench import vite

    name = f"c: 1 rank, 224 px x 8 frames, offload_param {offload}"
    extra = [f"deepspeed.offload_param={offload}"]
    row = vite._run_case(vite.find_config(None), name, 1, 224, 8, 3, work, cuda=True, quick=False, extra=extra)
    memory = row["per_rank"][0]
    step_s = row["steady_step_s"]
    return {
        "case": name,
        "storage": "fp16",
        "steps": row["steps"],
        "step_s": row["step_s"],
        "steady_step_s": step_s,
        "clips_per_s": 1.0 / step_s if step_s else None,  # 1 clip per step
        "max_memory_allocated_bytes": memory.get("peak_gpu_training_bytes"),
        "planned_peak_bytes": row["planned_peak_per_rank"],
        "planned_over_measured": (
            row["planned_peak_per_rank"] / memory["peak_gpu_training_bytes"]
            if memory.get("peak_gpu_training_bytes")
            else None
        ),
        "host_rss_peak_bytes": memory.get("peak_rss_training_bytes"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kit", default="")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    report = {"kit": {}, "imports": imports(), "tests": [], "bench_vite_c": [], "failures": []}
    kit_json = Path(args.kit, "kit.json") if args.kit else None
    if kit_json and kit_json.is_file():
        kit = json.loads(kit_json.read_text())
        report["kit"] = {k: kit[k] for k in ("python_version", "bytes", "packages") if k in kit}

    def write() -> None:
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["within_budget"] = report["seconds"] <= BUDGET_S  # the kit's promise: under 8 minutes
        out.write_text(json.dumps(report, indent=2) + "\n")

    write()
    if not report["imports"]["cuda"]:
        from side4video.distributed import cuda_failure

        print(f"gpu_check: no GPU torch can use here: {cuda_failure()} (imports checked: {out})")
        return 2
    import torch

    report["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="side4video-gpu-check-") as tmp:
        work = Path(tmp)
        report["tests"] = gpu_tests(work, timeout=max(60.0, BUDGET_S / 2))
        write()
        for offload in ("cpu", "none"):
            try:
                report["bench_vite_c"].append(bench_case(offload, work))
            except Exception as e:  # one failed case still leaves the other's figures
                report["failures"].append(f"bench vite c, offload_param {offload}: {e}")
            write()
    report["failures"] += [f"{t['test']}: {t['outcome']}" for t in report["tests"] if t["outcome"] == "failed"]
    write()
    print(f"gpu_check: {out} ({report['seconds']:.0f} s; {len(report['failures'])} failures)")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
