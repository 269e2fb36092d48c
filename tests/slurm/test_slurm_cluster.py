"""slurm/local-cluster.sh on its own: the one-node layout users start on a laptop, idempotent
start/stop, sized to this machine, and kept apart from any system SLURM."""

from __future__ import annotations

import os
import socket

import pytest

from tests.support.slurm import LocalCluster, missing_slurm, require_slurm

pytestmark = [pytest.mark.slurm]


@pytest.fixture
def one_node(tmp_path):
    reason = missing_slurm()
    if reason:
        require_slurm(reason)
    cluster = LocalCluster(tmp_path / "cluster", nodes=1, cpus=None, port=6947, prefix="s4vu", subnet="10.203.0")
    yield cluster
    cluster.stop()


def meminfo_mb() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) // 1024


@pytest.mark.timeout(180)
def test_start_is_idempotent_and_sized_to_this_machine(one_node):
    first = one_node.script("start")
    again = one_node.script("start")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert f"export SLURM_CONF={one_node.conf}" in first.stdout
    status = one_node.script("status", check=False)
    assert status.returncode == 0 and "slurmctld running" in status.stderr

    host = socket.gethostname().split(".")[0]
    nodes = one_node.run("sinfo", "-h", "-N", "-o", "%N %c %m %t").stdout.split()
    assert nodes[:2] == [host, str(os.cpu_count())] and nodes[3] == "idle"
    assert 0.8 * meminfo_mb() <= int(nodes[2]) <= meminfo_mb()
    # a 2-task step fits on this machine's cores
    ran = one_node.run("srun", "-N1", "-n2", "hostname")
    assert ran.returncode == 0 and ran.stdout.split() == [socket.gethostname()] * 2, ran.stderr

    # its own config, key, ports: nothing under /etc
    conf = one_node.conf.read_text()
    assert "SlurmctldPort=6947" in conf and "SlurmdPort=6948" in conf and "/etc/" not in conf
    assert (one_node.folder / "munge" / "munge.key").stat().st_mode & 0o777 == 0o400

    refused = one_node.script("start", "--nodes", "2", check=False)
    assert refused.returncode != 0 and "stop it first" in refused.stderr


@pytest.mark.timeout(180)
def test_stop_is_idempotent(one_node):
    one_node.script("start")
    pids = {p.name: int(p.read_text()) for p in (one_node.folder / "run").glob("*.pid")}
    assert set(pids) == {"slurmctld.pid", f"slurmd-{socket.gethostname().split('.')[0]}.pid"}
    assert one_node.script("stop").returncode == 0
    assert one_node.script("stop").returncode == 0
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), "daemon still running after stop"
    assert one_node.script("status", check=False).returncode == 3
