"""Run commands: `train`, `eval`, `predict`.

`train` and `eval` started inside a SLURM step (srun in slurm/*.sbatch) run as a task of that job:
preemption handling and requeue (side4video/slurm.py).
"""

from __future__ import annotations

from typing import Any, Dict

from side4video import distributed
from side4video.cli.common import load_run_config, print_json
from side4video.config import Config
from side4video.engine.status import RunStatus


def _in_slurm_job(cfg: Config, command: str) -> int:
    """A task of a SLURM job: rank 0 exits 1 when the run stopped without being requeued, so the
    job's state says it did not finish; other ranks exit 0 (srun --kill-on-bad-exit would
    otherwise kill rank 0 while it decides about the requeue)."""
    from side4video.slurm import run_task

    result = run_task(cfg, command)
    return 0 if RunStatus.read(result.get("status")).complete or not distributed.detect().is_main else 1


def cmd_train(args) -> int:
    cfg = load_run_config(args)
    distributed.hide_gpus_for_cpu_runs(cfg.train.device)
    if distributed.in_slurm_step():
        return _in_slurm_job(cfg, "train")
    from side4video.engine.train import train

    train(cfg)  # every status is a clean end, its last step saved (engine/status.py); failures raise
    return 0


def cmd_eval(args) -> int:
    cfg = load_run_config(args)
    distributed.hide_gpus_for_cpu_runs(cfg.train.device)
    if distributed.in_slurm_step():
        return _in_slurm_job(cfg, "eval")
    from side4video.engine.runner import evaluate_checkpoint

    report = evaluate_checkpoint(cfg)
    # every rank holds the gathered report; one prints it
    if args.json and distributed.detect().is_main:
        print_json({k: v for k, v in report.items() if k != "confusion"})
    return 0


def cmd_predict(args) -> int:
    from side4video.engine.predict import predict_video

    preds = predict_video(
        args.export, args.video, top_k=args.top_k, overrides=args.overrides, captions=args.caption or ()
    )
    if args.json:
        print_json(preds)
    else:
        print(format_predictions(preds))
    return 0


def format_predictions(preds: Dict[str, Any]) -> str:
    lines = [f"{preds['video']} ({preds['views']} views)"]
    for rank, row in enumerate(preds.get("top", []), 1):
        lines.append(f"  {rank}. {row['class']:<28} {100 * row['probability']:6.2f}%")
    for rank, row in enumerate(preds.get("captions", []), 1):
        lines.append(f"  {rank}. {row['similarity']:+.4f}  {row['caption']}")
    return "\n".join(lines)
