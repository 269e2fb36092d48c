"""Who am I in the job: rank, local rank, world size, master address and port.

One place reads every launcher's variables: torchrun and the deepspeed launcher (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and SLURM tasks started by srun or submitit
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST, SLURM_JOB_ID). A single process
with none of them is rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the torch.distributed env:// variables, so DeepSpeed and torch read the same."""
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def expand_first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,9],cpu1' -> 'gpu003'.

    Written by hand because `scontrol show hostnames` is not always on PATH inside containers.
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _node_address(host: str) -> str:
    """The address other nodes reach `host` at: SLURM's NodeAddr when it differs from the name
    (nodes registered by address), else the host name itself."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "-o", "show", "node", host], capture_output=True, text=True, timeout=10).stdout
            match = re.search(r"\bNodeAddr=(\S+)", out)
            if match:
                return match.group(1)
        except (OSError, subprocess.SubprocessError):
            pass
    return host


def port_for_job(job_id: int) -> int:
    """A rendezvous port derived from the job id: the same on every task, different across jobs."""
    return 20000 + job_id % 20000


def detect() -> DistEnv:
    """Read this process's place in the job from the launcher's environment."""
    if _int("WORLD_SIZE") is not None and _int("RANK") is not None:
        world = _int("WORLD_SIZE")
        return DistEnv(
            rank=_int("RANK"),
            local_rank=_int("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=_int("LOCAL_WORLD_SIZE", world),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int("MASTER_PORT", 29500),
            launcher="torchrun",
        )
    if _int("SLURM_PROCID") is not None and _int("SLURM_NTASKS") is not None and "SLURM_STEP_ID" in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
        tasks_per_node = os.environ.get("SLURM_TASKS_PER_NODE", "1")  # e.g. "2(x3)" or "2,1"
        local_world = int(re.match(r"\d+", tasks_per_node).group(0)) if re.match(r"\d+", tasks_per_node) else 1
        return DistEnv(
            rank=_int("SLURM_PROCID"),
            local_rank=_int("SLURM_LOCALID", 0),
            world_size=_int("SLURM_NTASKS"),
            local_world_size=local_world,
            master_addr=os.environ.get("MASTER_ADDR") or _node_address(expand_first_host(nodelist)),
            master_port=_int("MASTER_PORT") or port_for_job(_int("SLURM_JOB_ID", 0)),
            launcher="slurm",
        )
    return DistEnv(0, 0, 1, 1, "127.0.0.1", _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
