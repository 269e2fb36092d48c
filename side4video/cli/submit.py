"""`side4video submit`: a training (or evaluation) config as a SLURM job (side4video/slurm.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from side4video.cli.common import load_run_config


def cmd_submit(args) -> int:
    """Print job id, log folder and run directory; with --wait, follow the job to its end
    (streaming rank 0's log) and return its exit status."""
    from side4video.slurm import follow, submit_job, tasks_per_node

    cfg = load_run_config(args)
    job = submit_job(cfg, args.command)
    print(f"submitted job {job.job_id}: {args.command} on {cfg.slurm.nodes} node(s) x {tasks_per_node(cfg)} task(s)")
    print(f"  logs:          {job.paths.folder} (rank 0: {job.paths.stdout.name}, {job.paths.stderr.name})")
    print(f"  run directory: {Path(cfg.train.output_dir).absolute()}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return follow(job.job_id, job.paths.folder)
