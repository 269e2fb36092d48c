"""Rank, world size, master address and port from each launcher's environment."""

import json
import os
import subprocess
import sys

import pytest

from side4video import distributed
from side4video.distributed import (
    DistEnv,
    detect,
    expand_first_host,
    expand_hostlist,
    free_port,
    port_for_job,
    tasks_on_node,
)
from tests.support import REPO

LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOO_SOCKET_IFNAME",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No launcher variables, and no SLURM tools on PATH (so no real cluster is asked)."""
    for name in set(LAUNCHER_VARS) | {n for n in os.environ if n.startswith("SLURM_")}:
        monkeypatch.setenv(name, "")  # recorded, so what detect()/export() write is undone too
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", str(tmp_path))
    return monkeypatch


def slurm_task(mp, **extra):
    env = dict(
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_NTASKS="6",
        SLURM_STEP_NUM_TASKS="6",
        SLURM_NODEID="2",
        SLURM_STEP_ID="0",
        SLURM_JOB_ID="4321",
        SLURM_STEP_NODELIST="gpu[07-09]",
        SLURM_STEP_TASKS_PER_NODE="2(x3)",
    )
    env.update(extra)
    for key, value in env.items():
        mp.setenv(key, value)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[003-005,9]", ["gpu003", "gpu004", "gpu005", "gpu9"]),
        ("gpu[003-004]-ib,cpu1", ["gpu003-ib", "gpu004-ib", "cpu1"]),
        ("a[1-2]b[7,8]", ["a1b7", "a1b8", "a2b7", "a2b8"]),
        ("n[1-2],m[10-11]", ["n1", "n2", "m10", "m11"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert expand_first_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    "spec, node, expected",
    [("2(x3)", 0, 2), ("2(x3)", 2, 2), ("4,2(x2),1", 0, 4), ("4,2(x2),1", 2, 2), ("4,2(x2),1", 3, 1), ("8", 0, 8)],
)
def test_tasks_on_node(spec, node, expected):
    assert tasks_on_node(spec, node) == expected


def test_single_process(clean_env):
    env = detect()
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")
    assert 0 < env.master_port < 65536


def test_torchrun_variables_win(clean_env):
    slurm_task(clean_env)  # torchrun started inside a SLURM allocation: its variables decide
    for key, value in dict(
        RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.0.0.5", MASTER_PORT="29999"
    ).items():
        clean_env.setenv(key, value)
    assert detect() == DistEnv(3, 1, 4, 2, "10.0.0.5", 29999, "torchrun")


def test_slurm_task(clean_env):
    slurm_task(clean_env)
    env = detect()
    assert env == DistEnv(5, 1, 6, 2, "gpu07", port_for_job(4321), "slurm")
    assert not env.is_main


def test_slurm_batch_shell_is_not_a_task(clean_env):
    """The batch script has SLURM_PROCID/SLURM_NTASKS but is no srun task: it runs alone."""
    slurm_task(clean_env)
    clean_env.delenv("SLURM_STEP_ID")
    assert detect().launcher == "single"


def test_slurm_master_is_the_node_address(clean_env, tmp_path):
    """Nodes registered by address (NodeAddr) are reached there, not by their name."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "NodeName=$4 Arch=x86_64 NodeAddr=10.201.0.17 NodeHostName=$4"\n')
    scontrol.chmod(0o755)
    slurm_task(clean_env)
    assert detect().master_addr == "10.201.0.17"


def test_port_same_for_all_tasks_and_new_after_requeue(clean_env):
    ports = set()
    for rank in range(3):
        slurm_task(clean_env, SLURM_PROCID=str(rank))
        ports.add(detect().master_port)
    assert len(ports) == 1
    slurm_task(clean_env, SLURM_RESTART_COUNT="1")
    assert detect().master_port not in ports
    assert port_for_job(4321) != port_for_job(4322)


def test_export_names_the_gloo_interface_for_multi_node(clean_env):
    DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "slurm").export()
    assert os.environ["WORLD_SIZE"] == "1" and "GLOO_SOCKET_IFNAME" not in os.environ
    DistEnv(0, 0, 2, 1, "127.0.0.1", 29500, "slurm").export()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"  # the interface holding the route's source address
    assert os.environ["MASTER_PORT"] == "29500" and os.environ["LOCAL_WORLD_SIZE"] == "1"


def test_interface_towards():
    assert distributed.interface_towards("127.0.0.1") == "lo"
    assert distributed.interface_towards("no-such-host.invalid") is None


# ------------------------------------------------------------------------ launch scripts, for real


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_gpu_index_for_both_bindings():
    from side4video.distributed import gpu_index

    assert [gpu_index(r, 8, 8) for r in range(8)] == list(range(8))  # every task sees the node's 8 GPUs
    assert [gpu_index(r, 8, 1) for r in range(8)] == [0] * 8  # --gpus-per-task=1: each sees its own
    assert [gpu_index(r, 4, 2) for r in range(4)] == [0] * 4  # --gpus-per-task=2: the first of its own
