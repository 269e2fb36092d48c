"""Who am I in the job: rank, local rank, world size, master address and port, and which device.

One place reads every launcher's variables: torchrun and the deepspeed launcher (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and SLURM tasks started by srun or submitit
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURM_JOB_ID). A single process
with none of them is rank 0 of 1.

Under SLURM every task computes the same master (the first host of the step's node list, at the
address SLURM reaches that node by) and the same port (from the job id and restart count), so no
task has to talk to another before the process group exists.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import List

from side4video.errors import UserError, first_line
from side4video.logs import get_logger
from side4video.patterns import split_outside_brackets

log = get_logger(__name__)


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
        """Write the torch.distributed env:// variables, so DeepSpeed and torch read the same.

        Also names gloo's network interface when several hosts take part and the user has not:
        gloo otherwise binds to the address its host name resolves to, which on many clusters
        (and in network namespaces) is loopback or an interface the other nodes cannot reach.
        """
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )
        if self.world_size > self.local_world_size and "GLOO_SOCKET_IFNAME" not in os.environ:
            iface = interface_towards(self.master_addr)
            if iface:
                os.environ["GLOO_SOCKET_IFNAME"] = iface


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


# ------------------------------------------------------------------------------ SLURM node lists
def expand_hostlist(nodelist: str) -> list[str]:
    """All hosts of a SLURM node list: 'gpu[003-004,9]-ib,cpu1' -> gpu003-ib, gpu004-ib, gpu009-ib, cpu1.

    Written by hand (rather than `scontrol show hostnames`) because it must also work where the
    SLURM client tools are not on PATH, e.g. inside a container started by srun.
    """
    hosts: list[str] = []
    for group in split_outside_brackets(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            names = [n + literal for n in names]
            if ranges:
                values = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    values += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
                names = [n + v for n in names for v in values]
        hosts += names
    return hosts


def expand_first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    hosts = expand_hostlist(nodelist)
    return hosts[0] if hosts else nodelist


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed count list, e.g. '2(x3),1' and node 3 -> 1."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not counts:
        return 1
    return counts[min(node_id, len(counts) - 1)]


def _node_address(host: str) -> str:
    """The address other nodes reach `host` at: SLURM's NodeAddr when it differs from the name
    (nodes registered by address), else the host name itself."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "-o", "show", "node", host], capture_output=True, text=True, timeout=10
            ).stdout
            match = re.search(r"\bNodeAddr=(\S+)", out)
            if match:
                return match.group(1)
        except (OSError, subprocess.SubprocessError):
            pass
    return host


def port_for_job(job_id: int, restart: int = 0) -> int:
    """A rendezvous port from the job id: the same on every task, different across jobs, and
    different after each requeue (the previous run's port may still be in TIME_WAIT)."""
    return 20000 + (job_id % 4000) * 10 + restart % 10


# ---------------------------------------------------------------------------- network interfaces
def _interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface (name -> address), via the SIOCGIFADDR ioctl."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                found[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                continue  # no IPv4 address on this interface
    return found


def interface_towards(host: str) -> str | None:
    """The local interface whose address this host uses to reach `host` (None if unknown).

    A UDP connect sends nothing; it only asks the kernel which source address it would use. On
    the master itself that is the master's own address, whose interface is still the right one
    (the route would say 'lo').
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, address in _interface_addresses().items():
        if address == local:
            return name
    return None


# ------------------------------------------------------------------------------------ detection
def in_slurm_step() -> bool:
    """True in a task started by srun (or submitit): the batch script itself is not a task."""
    return _int("SLURM_PROCID") is not None and _int("SLURM_NTASKS") is not None and "SLURM_STEP_ID" in os.environ


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
    if in_slurm_step():
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
        per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
        world = _int("SLURM_STEP_NUM_TASKS") or _int("SLURM_NTASKS")
        return DistEnv(
            rank=_int("SLURM_PROCID"),
            local_rank=_int("SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=tasks_on_node(per_node, _int("SLURM_NODEID", 0)),
            master_addr=os.environ.get("MASTER_ADDR") or _node_address(expand_first_host(nodelist)),
            master_port=_int("MASTER_PORT") or port_for_job(_int("SLURM_JOB_ID", 0), _int("SLURM_RESTART_COUNT", 0)),
            launcher="slurm",
        )
    return DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")


# ----------------------------------------------------------------------------------------- devices
def gpus_from_slurm() -> str:
    """The GPUs SLURM gave this job or step ('' when none): it expects them to be used."""
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        value = os.environ.get(var, "").strip()
        if value and value != "0":
            return f"{var}={value}"
    return ""


def gpu_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """Which visible GPU this rank takes. Every task of a node seeing all its GPUs (plain srun,
    torchrun): the local rank's. Tasks given their own GPUs (`--gpus-per-task`, `--gpu-bind`):
    fewer are visible than tasks run here, and each takes its first."""
    return local_rank if visible >= local_world_size else 0


def cuda_failure() -> str:
    """Why torch sees no GPU, in one line (driver too old for this CUDA build, no device, ...)."""
    import torch

    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError/AssertionError with the driver's reason
        reason = first_line(e)
    else:
        reason = "no CUDA device is visible"
    return f"{reason} (torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'})"


def hide_gpus_for_cpu_runs(requested: str) -> None:
    """`train.device=cpu` on a GPU host: hide the GPUs from this process before torch, DALI and
    DeepSpeed first look (DeepSpeed picks its accelerator once, at import)."""
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def select_device(requested: str, local_rank: int, local_world_size: int):
    """`train.device` -> this rank's torch.device. A GPU expected (train.device=cuda, or GPUs given
    by SLURM) but not usable is refused in one line instead of silently training on CPUs."""
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        given = gpus_from_slurm()
        if requested == "cuda" or given:
            why = f"train.device={requested}" + (f" and SLURM gave this job GPUs ({given})" if given else "")
            raise UserError(
                f"{why}, but torch cannot use a GPU here: {cuda_failure()}; check the driver and the "
                f"loaded CUDA modules, or set train.device=cpu"
            )
        return torch.device("cpu")
    return torch.device("cuda", gpu_index(local_rank, local_world_size, torch.cuda.device_count()))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(nproc: int, args: List[str]) -> List[str]:
    """`side4video ARGS` on NPROC local processes (torchrun), or in this interpreter for one."""
    if nproc <= 1:
        return [sys.executable, "-m", "side4video.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "side4video.cli",
        *args,
    ]
