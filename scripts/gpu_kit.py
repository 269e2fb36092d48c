"""Build the portable GPU check kit (`make gpu-kit`): wheels of side4video and its dependencies for
a GPU machine that has Python, torch (with torchvision) and no network, plus the GPU checks.

    python scripts/gpu_kit.py OUT [--python-version 3.12]

The dependency closure is read from this environment's installed distributions (their exact
versions), starting at side4video's requirements and pytest. Left out: torch, torchvision and
everything they need (the GPU machine has its own build), and what 60 MiB cannot hold and the
checks do not need (LEFT_OUT_ROOTS, LEFT_OUT: DALI, matplotlib, boto3, each with what only it
takes along). Each package is fetched as a wheel for the target Python and manylinux x86_64
(`pip download --no-deps --only-binary=:all:`, from pip's configured indexes and its cache);
DeepSpeed, an sdist, is built here into a wheel (`pip wheel --no-build-isolation`), and so is
side4video. Beside the wheels: the GPU check (scripts/gpu_check.sh, scripts/gpu_check.py), the
test files it runs (tests/gpu, tests/support) and the configs. OUT/kit.json lists every file and
its size; the kit must stay under 60 MiB.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Set

REPO = Path(__file__).resolve().parents[1]
LIMIT = 60 * 2**20
PROVIDED = ("torch", "torchvision")  # preinstalled on the GPU machine, with everything they need
# Left out with everything only they need (60 MiB would not hold them); the checks run without them.
LEFT_OUT_ROOTS = {
    "nvidia-dali-cuda130": "1 GB of CUDA libraries; the loader decodes with PyAV without it (one log line)",
    "matplotlib": "20 MiB with fonttools; without it no plots are drawn (one log line)",
    "boto3": "17 MiB (botocore); S3 shards only, the checks read local files",
}
LEFT_OUT = {
    "hf-xet": "huggingface_hub's download backend; nothing is downloaded",
    "grpcio": "tensorboard's server; torch's SummaryWriter writes event files without it",
}
BUILT_HERE = {"deepspeed"}  # an sdist on the index: built into a wheel here
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
CHECK_ROOTS = ("pytest",)  # what the checks run with, beside side4video's own requirements
SOURCES = (
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/gpu",
    "tests/support",
    "configs",
    "scripts/gpu_check.sh",
    "scripts/gpu_check.py",
    "pyproject.toml",
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: str, python_version: str) -> Iterable[str]:
    """Names of `dist`'s requirements that apply on the target Python (no extras)."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": ""}
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            yield canonical(req.name)


def closure(roots: Iterable[str], python_version: str) -> Set[str]:
    """Every installed distribution the roots need, the roots included."""
    seen: Set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu-kit: {name} is not installed here (run make setup first)") from None
        seen.add(name)
        todo.extend(requirements(name, python_version))
    return seen


def kit_packages(python_version: str) -> Dict[str, str]:
    """name -> installed version of what the kit carries (side4video itself excluded)."""
    provided = closure(PROVIDED, python_version)
    roots = [r for r in requirements("side4video", python_version) if r not in LEFT_OUT_ROOTS]
    roots += CHECK_ROOTS
    needed = closure(roots, python_version)
    return {n: metadata.version(n) for n in sorted(needed - provided) if n not in LEFT_OUT}


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING: Location" not in line][-3:]
        raise SystemExit("gpu-kit: pip failed: " + " | ".join(tail))


def build(out: Path, python_version: str) -> Dict:
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    packages = kit_packages(python_version)
    fetched = [f"{n}=={v}" for n, v in packages.items() if n not in BUILT_HERE]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    major, minor = python_version.split(".")[:2]
    pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none",
        *platforms, "--dest", str(wheels), *fetched,
    )  # fmt: skip
    for name in sorted(BUILT_HERE & set(packages)):
        pip("wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(wheels), f"{name}=={packages[name]}")
    pip("wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(wheels), str(REPO))
    project = out / "project"
    for rel in SOURCES:
        src, dst = REPO / rel, project / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in packages.items()))
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    total = sum(files.values())
    report = {
        "python_version": python_version,
        "platforms": list(PLATFORMS),
        "provided_by_the_gpu_machine": list(PROVIDED) + ["(and what they need)"],
        "left_out": {**LEFT_OUT_ROOTS, **LEFT_OUT},
        "packages": packages,
        "bytes": total,
        "limit_bytes": LIMIT,
        "seconds": round(time.perf_counter() - t0, 1),
        "files": files,
    }
    (out / "kit.json").write_text(json.dumps(report, indent=2) + "\n")
    if total > LIMIT:
        raise SystemExit(
            f"gpu-kit: {total / 2**20:.1f} MiB is over the {LIMIT // 2**20} MiB limit (see {out}/kit.json)"
        )
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (replaced)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = parser.parse_args(argv)
    report = build(Path(args.out), args.python_version)
    wheels = sum(1 for f in report["files"] if f.startswith("wheels/"))
    print(f"gpu-kit: {args.out}: {wheels} wheels for Python {args.python_version}, {report['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
