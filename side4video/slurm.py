"""SLURM jobs: training (or evaluation) submitted through submitit, and what every task of such a
job does (also under plain sbatch + srun).

The job: `nodes` x (one task per GPU, or `tasks_per_node` on CPU hosts), each task running
`run_task`, which finds its rank from SLURM (side4video.distributed) and calls the engine.

Preemption and time limits. SLURM warns a job with a signal: USR2 `signal_delay_s` before the
time limit (`--signal`), SIGTERM on preemption or `scancel --signal=TERM`, whatever a user sends
with `scancel --signal=...`. The signal only sets a flag (side4video.engine.signals); at the next
step boundary all ranks agree, save a complete checkpoint together and `train` returns
"preempted"; then rank 0 asks SLURM to requeue the job (at most `slurm.max_requeues` times), and
the requeued job resumes from OUTPUT_DIR/checkpoints/latest.

Why not submitit's own checkpointing: on USR2 submitit's handler calls `checkpoint()` and then
requeues and exits the process from inside the signal handler, on rank 0 only, so the other ranks
would be mid-step and no collective save could happen. Our task replaces that handler with the
flag-only one as its first act. `checkpoint()` is still defined (it only sets the flag) for the
moments before that, and for tools that call it.

The same `run_task` serves the sbatch route: `srun side4video train|eval ...` (slurm/*.sbatch) runs
it when the command finds itself in a SLURM step.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.helpers import Checkpointable, DelayedSubmission

from side4video import distributed, signals
from side4video.engine.status import RunStatus
from side4video.errors import UserError
from side4video.logs import get_logger, setup_logging

log = get_logger(__name__)

COMMANDS = ("train", "eval")
# States a job leaves for good; COMPLETING, PENDING (incl. after a requeue) and the like are not.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}


# ------------------------------------------------------------------------------------ job plan
def tasks_per_node(cfg: DictConfig) -> int:
    """One task per GPU; on CPU hosts `slurm.tasks_per_node`."""
    return cfg.slurm.gpus_per_node if cfg.slurm.gpus_per_node > 0 else cfg.slurm.tasks_per_node


def log_folder(cfg: DictConfig) -> Path:
    return Path(cfg.slurm.log_folder or Path(cfg.train.output_dir) / "slurm").absolute()


def slurm_parameters(cfg: DictConfig) -> Dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch options) from the `slurm` config section."""
    s = cfg.slurm
    if s.nodes < 1 or tasks_per_node(cfg) < 1 or s.cpus_per_task < 1:
        raise UserError("slurm.nodes, slurm.tasks_per_node and slurm.cpus_per_task must be at least 1")
    if s.time_minutes < 1:
        raise UserError(f"config key 'slurm.time_minutes' must be at least 1, got {s.time_minutes}")
    if s.signal_delay_s < 0 or s.signal_delay_s >= s.time_minutes * 60:
        raise UserError(f"slurm.signal_delay_s ({s.signal_delay_s}) must be between 0 and the time limit in seconds")
    params: Dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_minutes,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_delay_s,
        # A crashed rank ends the step instead of leaving the others blocked in a collective.
        # srun of SLURM 22.05-23.02 does not pass the allocation's --cpus-per-task on to the
        # tasks: without it a rank's decode and reader threads could share one core.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={s.cpus_per_task}"],
        "setup": list(s.setup)
        + [f"export PYTHONPATH={shlex.quote(str(_package_root()))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # --requeue: SLURM may requeue the job itself too (node failure, PreemptMode=REQUEUE).
        "additional_parameters": {"requeue": True, **OmegaConf.to_container(s.additional, resolve=True)},
    }
    if s.gpus_per_node > 0:
        params["gres"] = f"gpu:{s.gpus_per_node}"
    if s.mem_gb > 0:
        params["mem"] = f"{s.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if s[key]:
            params[key] = s[key]
    return params


def _package_root() -> Path:
    """The folder holding the side4video package, so tasks import this very code."""
    return Path(__file__).resolve().parent.parent


def _job_config(cfg: DictConfig) -> DictConfig:
    """The config the job runs: the run directory made absolute (the job may start in another
    folder), and a job given GPUs requires them (train.device=cuda), so that a driver or
    module problem stops it in one line instead of training on CPUs for days."""
    cfg = cfg.copy()
    cfg.train.output_dir = str(Path(cfg.train.output_dir).absolute())
    if cfg.slurm.gpus_per_node > 0 and cfg.train.device == "auto":
        cfg.train.device = "cuda"
    if cfg.slurm.gpus_per_node > 0 and cfg.train.device == "cpu":
        raise UserError("slurm.gpus_per_node asks for GPUs but train.device=cpu would leave them idle")
    return cfg


# ---------------------------------------------------------------------------------- in the job
def _command_function(command: str) -> Callable[[DictConfig], Dict[str, Any]]:
    if command == "eval":
        from side4video.engine.runner import evaluate_checkpoint

        return lambda cfg: {"status": RunStatus.FINISHED.value, "report": evaluate_checkpoint(cfg)}
    from side4video.engine.train import train

    return train


def run_task(cfg: DictConfig, command: str = "train", work: Optional[Callable] = None) -> Dict[str, Any]:
    """One task of the job: find its place, run the command, requeue after a preemption.

    `work(cfg) -> dict` is the engine's function for the command (train: its summary, whose
    "status" is "preempted" after a stop). Returns that result. When the job was requeued, rank 0
    exits instead (SystemExit), so submitit writes no result for a run that is not over.
    """
    signals.install_handlers()  # first: replaces submitit's handler (see the module docstring)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)  # submitit only logs it; SLURM sends it with every stop
    setup_logging(cfg.logging.level, cfg.logging.all_ranks)
    distributed.hide_gpus_for_cpu_runs(cfg.train.device)
    env = distributed.detect()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts:
        # A requeued run always continues its own run directory, whatever `resume` said at first.
        cfg.train.resume = "auto"
        log.info(
            "job %s restart %d (of at most %d): resuming from the latest checkpoint",
            os.environ.get("SLURM_JOB_ID", "?"),
            restarts,
            cfg.slurm.max_requeues,
        )
    log.info(
        "task %d/%d (local %d/%d) on %s; master %s:%d",
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        os.uname().nodename,
        env.master_addr,
        env.master_port,
    )
    result = (work or _command_function(command))(cfg)
    preempted = RunStatus.read(result.get("status")) is RunStatus.PREEMPTED
    if preempted and env.is_main and requeue(restarts, cfg.slurm.max_requeues):
        raise SystemExit(0)
    return result


def job_state(job_id: str) -> Optional[str]:
    """The job's state from slurmctld ('RUNNING', 'PENDING', ...); None once it is forgotten.

    Read with scontrol, not sacct: sacct needs SLURM accounting, which many small clusters (and
    the local test cluster) do not run.
    """
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bJobState=(\S+)", out.stdout)
    return match.group(1) if match else None


def requeue(restarts: int, max_requeues: int) -> bool:
    """Rank 0 after a collective save: requeue the job if that is allowed. True when the job will
    run again (requeued here or by SLURM itself)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if restarts >= max_requeues:
        log.warning(
            "job %s stopped and saved; not requeued: it already ran %d times more (slurm.max_requeues=%d)",
            job_id,
            restarts,
            max_requeues,
        )
        return False
    state = job_state(job_id)
    if state in ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):
        log.info("job %s stopped and saved; SLURM has requeued it already", job_id)
        return True
    if state != "RUNNING":
        # COMPLETING right after a stop signal means `scancel` without --signal: the user ended it.
        log.warning("job %s stopped and saved; not requeued: it is %s (cancelled?)", job_id, state)
        return False
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as e:
        log.warning("job %s stopped and saved; scontrol requeue failed: %s", job_id, (e.stderr or "").strip())
        return False
    log.warning("job %s stopped and saved; requeued (restart %d of at most %d)", job_id, restarts + 1, max_requeues)
    return True


class SlurmTask(Checkpointable):
    """What submitit pickles and every task runs: the config (as a plain container) and the command."""

    def __init__(self, cfg: DictConfig, command: str):
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.command = command

    def load_config(self) -> DictConfig:
        from side4video.config import load_config

        return OmegaConf.merge(load_config(None, []), self.config)

    def work(self, cfg: DictConfig) -> Dict[str, Any]:
        return _command_function(self.command)(cfg)

    def __call__(self) -> Dict[str, Any]:
        return run_task(self.load_config(), self.command, self.work)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's preemption hook: only set the flag; the loop saves at its next step boundary.
        Returns the same task for submitit to requeue (it calls this before our handler is in)."""
        signals.request_stop("submitit checkpoint")
        return DelayedSubmission(self)


# ------------------------------------------------------------------------------ submitting side
def submit_job(cfg: DictConfig, command: str = "train", task_class: type = None):
    """Submit the job; return submitit's Job (job_id, paths) without waiting.

    `task_class`: a SlurmTask subclass to run instead (its `work` replaces the engine call)."""
    if command not in COMMANDS:
        raise UserError(f"submit --command must be one of {', '.join(COMMANDS)}, got {command!r}")
    cfg = _job_config(cfg)
    params = slurm_parameters(cfg)
    try:
        executor = submitit.SlurmExecutor(folder=log_folder(cfg), max_num_timeout=cfg.slurm.max_requeues)
    except RuntimeError as e:  # no srun on PATH
        raise UserError(f"SLURM not found ({e}); run submit on a SLURM login node") from None
    executor.update_parameters(**params)
    try:
        return executor.submit((task_class or SlurmTask)(cfg, command))
    except submitit.core.utils.FailedJobError as e:
        raise UserError(f"sbatch refused the job: {str(e).strip().splitlines()[-1]}") from None


class _Tail:
    """New bytes of a growing file, from where the last read stopped."""

    def __init__(self, path: Path, sink):
        self.path, self.sink, self.offset = path, sink, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.sink.write(data.decode("utf-8", "replace"))
            self.sink.flush()


def follow(job_id: str, folder: Path | str, poll_s: float = 2.0, timeout_s: float = 0) -> int:
    """Stream rank 0's stdout/stderr until the job ends for good (through requeues); return 0
    when it finished its work, 1 otherwise (failed, cancelled, or stopped with no requeue left)."""
    folder = Path(folder)
    tails = [_Tail(folder / f"{job_id}_0_log.out", sys.stdout), _Tail(folder / f"{job_id}_0_log.err", sys.stderr)]
    started, last = time.monotonic(), None
    try:
        while True:
            for tail in tails:
                tail.pump()
            state = job_state(job_id)
            if state != last and state is not None:
                print(f"[submit] job {job_id}: {state}", file=sys.stderr, flush=True)
                last = state
            if state is None or state.split("+")[0] in FINAL_STATES:
                break
            if timeout_s and time.monotonic() - started > timeout_s:
                print(
                    f"[submit] stopped following job {job_id} after {timeout_s:.0f} s; it is {state}", file=sys.stderr
                )
                return 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"[submit] stopped following; job {job_id} goes on (scancel {job_id} ends it)", file=sys.stderr)
        raise
    for tail in tails:
        tail.pump()
    return _outcome(job_id, folder, last)


def _outcome(job_id: str, folder: Path, state: Optional[str]) -> int:
    result_file = folder / f"{job_id}_0_result.pkl"
    for _ in range(20):  # on shared file systems the file may show up a little after the job ends
        if result_file.exists():
            break
        time.sleep(0.5)
    if not result_file.exists():
        print(f"[submit] job {job_id} ended {state or 'without a state'} and rank 0 left no result", file=sys.stderr)
        for other in sorted(folder.glob(f"{job_id}_*_result.pkl")):  # maybe another rank said why
            with open(other, "rb") as f:
                outcome, value = pickle.load(f)
            if outcome != "success":
                print(f"[submit] {other.name}: {_last_line(value)}", file=sys.stderr)
                break
        return 1
    with open(result_file, "rb") as f:
        outcome, value = pickle.load(f)
    if outcome != "success":  # the traceback is in the log streamed above; its last line says what
        print(f"[submit] job {job_id} failed: {_last_line(value)}", file=sys.stderr)
        return 1
    status = RunStatus.read(value.get("status") if isinstance(value, dict) else None)
    print(f"[submit] job {job_id} {state or 'ended'}: {status.value}", file=sys.stderr)
    return 0 if status.complete else 1


def _last_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
