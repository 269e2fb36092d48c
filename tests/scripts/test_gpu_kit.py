"""`make gpu-kit` and scripts/gpu_check.sh, as far as a CPU host can take them: the kit builds
under 60 MiB, installs into an empty folder for a Python that has only torch and torchvision (a
stand-in for a GPU machine's preinstalled torch: no DALI, no matplotlib, nothing else), imports
there, and the check stops in one line where torch sees no GPU."""

import importlib.util
import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow  # pip, venvs and side4video in subprocesses

HOST = f"{sys.version_info.major}.{sys.version_info.minor}"


def gpu_kit_module():
    spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "scripts" / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    """The kit for this host's Python (the same builder as `make gpu-kit`, which targets 3.12):
    its wheels come from pip's configured indexes and cache."""
    out = tmp_path_factory.mktemp("kit") / "gpu-kit"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_kit.py"), str(out), "--python-version", HOST],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MiB" in proc.stdout
    return out


@pytest.fixture(scope="module")
def torch_only_python(tmp_path_factory) -> Path:
    """A Python with torch and torchvision (and what they need) and nothing else: a venv of the base
    interpreter whose .pth names a folder of links to this environment's copies."""
    root = tmp_path_factory.mktemp("torch-only")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    provided = root / "provided"
    provided.mkdir()
    for name in gpu_kit_module().closure(("torch", "torchvision"), HOST):
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = provided / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)
    site_packages = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site_packages / "torch_only.pth").write_text(str(provided) + "\n")
    return root / "venv" / "bin" / "python"


def test_the_kit_builds_under_60_mib_without_torch_dali_or_matplotlib(kit):
    report = json.loads((kit / "kit.json").read_text())
    assert report["bytes"] == sum(report["files"].values()) < 60 * 2**20
    wheels = {f.split("/")[1].split("-")[0].lower() for f in report["files"] if f.startswith("wheels/")}
    for needed in ("side4video", "deepspeed", "av", "open_clip_torch", "webdataset", "omegaconf", "submitit", "timm"):
        assert needed in wheels, needed
    assert "pytest" in wheels  # the checks run under pytest
    for absent in ("torch", "torchvision", "nvidia_dali_cuda130", "matplotlib", "botocore", "numpy", "pillow"):
        assert absent not in wheels, absent
    assert set(report["left_out"]) >= {"nvidia-dali-cuda130", "matplotlib", "boto3"}
    for rel in ("project/scripts/gpu_check.sh", "project/scripts/gpu_check.py", "project/tests/gpu/test_gpu.py"):
        assert (kit / rel).is_file(), rel
    assert (kit / "project/configs/experiments/ssv2_eva02e14.yaml").is_file()


def test_the_check_installs_the_kit_imports_without_dali_and_stops_without_a_gpu(kit, torch_only_python, tmp_path):
    env = {**os.environ, "PYTHON": str(torch_only_python), "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)

    def python(code):
        return subprocess.run([str(torch_only_python), "-c", code], cwd=tmp_path, env=env, capture_output=True)

    assert python("import torch, torchvision").returncode == 0
    for name in ("side4video", "deepspeed", "av", "nvidia.dali", "matplotlib"):
        assert python(f"import {name}").returncode != 0, name  # nothing but torch before the kit
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(kit / "project/scripts/gpu_check.sh"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: no GPU torch can use here:")
    report = json.loads(out.read_text())
    work = next(tmp_path.glob("side4video-gpu-check.*"))
    imports = report["imports"]
    assert imports["dali"] is False and imports["cuda"] is False
    assert imports["modules"]["side4video"]["file"].startswith(str(work / "site"))
    assert imports["modules"]["deepspeed"]["version"] == "0.19.8"
    assert report["kit"]["bytes"] < 60 * 2**20

    # the GPU tests import in the kit's environment (their conftest then stops: no GPU)
    collect = subprocess.run(
        [str(torch_only_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
        cwd=work / "project",
        env={**env, "PYTHONPATH": f"{work / 'site'}:{work / 'project'}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collect.returncode == 2 and "tests/gpu needs a GPU" in collect.stdout + collect.stderr, collect.stdout
