"""The launch scripts for real (launch/local.sh, launch/multinode.sh: training processes that meet
and train together) and the refusal of a GPU run on a host without one."""

import json
import os
import subprocess
import sys

import pytest

from side4video.distributed import free_port
from tests.support import REPO
from tests.test_distributed import LAUNCHER_VARS

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


def tiny_run(data, run_dir):
    return [
        "configs/demo.yaml",
        f"data.train.shards={data['train'] / 'manifest.json'}",
        f"data.val.shards={data['val'] / 'manifest.json'}",
        "data.num_classes=4",
        "data.frames=4",
        "data.size=32",
        "data.resize=[36]",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.eval_every=0",
        f"train.output_dir={run_dir}",
        "logging.progress=false",
        "logging.plots=false",
        "logging.tensorboard=false",
    ]


def launcher_env(port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    return dict(env, SIDE4VIDEO_PYTHON=sys.executable, MASTER_PORT=str(port))


@pytest.mark.timeout(600)
def test_local_launcher_two_processes(synthetic_data, tmp_path):
    """launch/local.sh through the deepspeed launcher: two ranks train together."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        ["launch/local.sh", "2", *tiny_run(synthetic_data, run_dir)],
        cwd=REPO,
        env=launcher_env(free_port()),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


@pytest.mark.timeout(600)
def test_multinode_by_hand_two_nodes_on_one_host(synthetic_data, tmp_path):
    """launch/multinode.sh twice (node ranks 0 and 1, one process each) meeting at 127.0.0.1."""
    run_dir = tmp_path / "run"
    env = launcher_env(free_port())
    args = ["127.0.0.1", "1", *tiny_run(synthetic_data, run_dir)]
    other = subprocess.Popen(
        ["launch/multinode.sh", "2", "1", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done = subprocess.run(
            ["launch/multinode.sh", "2", "0", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert other.wait(timeout=120) == 0, other.stderr.read()[-3000:]
    finally:
        if other.poll() is None:
            other.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


def test_launch_scripts_refuse_bad_arguments():
    for cmd in (["launch/local.sh", "two", "configs/demo.yaml"], ["launch/multinode.sh", "2", "2", "h", "1", "c.yaml"]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and done.stderr.strip()


@pytest.mark.timeout(120)
def test_train_device_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    """GPU expected, GPU required: train.device=cuda (or GPUs given by SLURM) on a host where torch
    cannot use one stops with the reason instead of training on CPUs (the GPU recipes in
    configs/experiments ask for it); `make test-gpu` is refused the same way."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # on a GPU host too: torch then sees none
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "side4video.cli",
            "train",
            "configs/demo.yaml",
            "train.device=cuda",
            f"train.output_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train.device=cuda, but torch cannot use a GPU here" in out.stderr.strip().splitlines()[-1]
    slurm_gpus = subprocess.run(
        [sys.executable, "-m", "side4video.cli", "train", "configs/demo.yaml", f"train.output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "SLURM_JOB_GPUS": "0,1"},
    )
    assert slurm_gpus.returncode == 2 and "SLURM gave this job GPUs (SLURM_JOB_GPUS=0,1)" in slurm_gpus.stderr
    make = subprocess.run(["make", "test-gpu"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert make.returncode == 2 and "make test-gpu: no GPU torch can use here" in make.stdout
