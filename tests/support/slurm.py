"""A real SLURM cluster for tests, started with slurm/local-cluster.sh.

Two nodes (n1, n2), each a slurmd in its own network namespace with its own address, so one
machine gives both the 1-node jobs and a 2-node job whose ranks meet over those addresses. The
test cluster has its own folder, ports, namespace names and subnet: it never meets a user's
`local-cluster.sh start` or a system SLURM.

Without slurmctld (or root, or `ip`), SLURM tests fail with the reason (`.ci/run` installs
slurm-wlm and munge first): they never skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.support import REPO

SCRIPT = REPO / "slurm" / "local-cluster.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "ip", "nsenter", "unshare")


def missing_slurm() -> Optional[str]:
    """Why a real SLURM cluster cannot be started here (None if it can)."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"no {', '.join(absent)} on PATH (apt-get install slurm-wlm munge iproute2)"
    if os.geteuid() != 0:
        return "starting slurmd and network namespaces needs root"
    return None


def require_slurm(reason: str) -> None:
    """A missing prerequisite fails the SLURM tests with its reason: they never skip."""
    pytest.fail(f"SLURM tests cannot run: {reason}")


class LocalCluster:
    """slurm/local-cluster.sh with its own folder, port, names and subnet."""

    def __init__(self, folder: Path, nodes: int, cpus: Optional[int], port: int, prefix: str, subnet: str):
        self.folder, self.nodes, self.cpus = Path(folder), nodes, cpus
        self.conf = self.folder / "slurm.conf"
        self.subnet = subnet
        self.script_env = dict(
            os.environ,
            SIDE4VIDEO_SLURM_DIR=str(folder),
            SIDE4VIDEO_SLURM_PORT=str(port),
            SIDE4VIDEO_SLURM_PREFIX=prefix,
            SIDE4VIDEO_SLURM_SUBNET=subnet,
        )
        # What submitters and jobs see: this cluster's SLURM_CONF; no launcher variables of ours.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.script_env, capture_output=True, text=True, timeout=180, check=check
        )

    def start(self) -> None:
        args = ["start", "--nodes", str(self.nodes)] + (["--cpus", str(self.cpus)] if self.cpus else [])
        done = self.script(*args, check=False)
        if done.returncode != 0:
            logs = self.folder / "log"
            tails = (
                "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(logs.glob("*.log")))
                if logs.is_dir()
                else ""
            )
            raise RuntimeError(f"local-cluster.sh start failed:\n{done.stderr}{tails}")

    def stop(self) -> None:
        self.script("stop", check=False)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw
        )

    def job_info(self, job_id: str) -> Dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The two-node test cluster (each node offers 2 CPUs, so a 1-node job can run 2 tasks)."""
    reason = missing_slurm()
    if reason:
        require_slurm(reason)
    cluster = LocalCluster(
        tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2, port=6937, prefix="s4vt", subnet="10.202.0"
    )
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        require_slurm(str(e))
    yield cluster
    cluster.stop()


# ------------------------------------------------------------------------------------ training jobs
@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory) -> Path:
    """32 training and 8 validation synthetic clips (4 classes, 4 frames, 32 px) in 4+1 shards."""
    from side4video.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("slurm-data")
    make_synthetic(str(out), videos=32, classes=4, val_videos=8, frames=4, size=32, fps=8, seed=0, shard_samples=8)
    return out


def train_overrides(data: Path, output_dir: Path, *extra: str) -> List[str]:
    """A run of a few dozen steps of the demo model on the tiny data (every step's loss logged)."""
    return [
        f"data.train.shards={data / 'train' / 'manifest.json'}",
        f"data.val.shards={data / 'val' / 'manifest.json'}",
        "data.num_classes=4",
        "data.frames=4",
        "data.size=32",
        "data.resize=[36]",
        "data.workers=1",
        "train.batch_size=2",
        "train.epochs=3",
        "train.eval_every=0",
        "train.save_every=3",
        "train.log_every=1",
        f"train.output_dir={output_dir}",
        "logging.progress=false",
        "logging.plots=false",
        "logging.tensorboard=false",
        "logging.sample_keys=true",
        "slurm.time_minutes=15",
        "slurm.cpus_per_task=1",
        *extra,
    ]


def side4video(cluster: LocalCluster, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the `side4video` CLI as a user would, against the test cluster."""
    return subprocess.run(
        [sys.executable, "-m", "side4video.cli", *args],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------ requeue bookkeeping
from side4video.slurm import SlurmTask  # noqa: E402


class WaitForStop(SlurmTask):
    """Stands in for the engine where only submit.py's requeue bookkeeping is under test: marks
    each start of each rank (OUTPUT_DIR/started-RESTART-RANK; a signal sent before every rank has
    its handler would find default actions), waits for a stop request like the training loop,
    and reports "preempted" as train() does after one (else "finished" after 120 s).

    Pickled by value (see `register_by_value`): the job cannot import this tests-only module."""

    def work(self, cfg):
        from side4video import signals

        run_dir = Path(cfg.train.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"started-{os.environ.get('SLURM_RESTART_COUNT', '0')}-{os.environ['SLURM_PROCID']}").touch()
        deadline = time.monotonic() + 120
        while not signals.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"status": "preempted" if signals.stop_requested() else "finished"}


def register_by_value() -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
