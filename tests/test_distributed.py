"""side4video/distributed.py: rank, world size, master address and port from each launcher's
environment, host lists, ports, interfaces, GPU indices (launch scripts run for real: tests/launch)."""

import os

import pytest

from side4video import distributed
from side4video.distributed import (
    DistEnv,
    detect,
    expand_first_host,
    expand_hostlist,
    port_for_job,
    tasks_on_node,
)

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


def test_gpu_index_for_both_bindings():
    from side4video.distributed import gpu_index

    assert [gpu_index(r, 8, 8) for r in range(8)] == list(range(8))  # every task sees the node's 8 GPUs
    assert [gpu_index(r, 8, 1) for r in range(8)] == [0] * 8  # --gpus-per-task=1: each sees its own
    assert [gpu_index(r, 4, 2) for r in range(4)] == [0] * 4  # --gpus-per-task=2: the first of its own
