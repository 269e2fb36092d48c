"""`side4video train`: the step loop.

    while step < total_steps:
        step += 1
        train_step(...)          # grad_accum micro-batches, one optimizer step
        log, evaluate at epoch ends, save when due, stop when asked

One training step, top to bottom: each group's learning rate for this step -> for each of its
micro-batches: the next batch (a stop request or a loader failure ends the wait) -> all ranks
agree nobody stops or failed -> the task's forward and loss (engine/tasks.py: recognition's
label-smoothed cross-entropy, retrieval's contrastive loss over the gathered batch) -> all ranks
learn whether any loss is non-finite -> backward + DeepSpeed step (DeepSpeed accumulates, and
steps the optimizer on the last micro-batch; a non-finite loss makes non-finite gradients, and
DeepSpeed skips the whole optimizer step on every rank) -> the task's after-step (retrieval's
logit-scale bound). Epochs only set the evaluation cadence and the data epoch; one place
(`SavePolicy`) decides when to save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch

from side4video import signals
from side4video.engine import export
from side4video.engine.collectives import all_gather_objects, any_rank
from side4video.engine.metrics import MetricsLogger, Throughput, peak_memory, write_json
from side4video.engine.plots import plot_curves
from side4video.engine.runner import Runner
from side4video.engine.schedule import RunLength, lr_at
from side4video.engine.state import TrainerState
from side4video.errors import RunFailed, UserError
from side4video.logs import get_logger
from side4video.signals import StopRequested

log = get_logger(__name__)


@dataclass
class StepResult:
    loss: float = float("nan")  # mean over this rank's micro-batches
    lr: float = 0.0
    clips: int = 0
    keys: list = field(default_factory=list)  # this rank's clips, in order
    wait_s: float = 0.0
    seconds: float = 0.0  # wall time of the step, data waits included
    nonfinite: bool = False  # a micro-batch's loss was not finite on some rank
    applied: bool = True  # DeepSpeed applied the optimizer step
    stopped: bool = False  # a stop was agreed before the step completed: it did not happen


def _next_batch(batches: Iterator) -> tuple:
    """(batch, None) or (None, the exception that ended the wait: a stop request or a failure)."""
    try:
        return next(batches), None
    except StopRequested as stop:
        return None, stop
    except Exception as failure:  # a loader or reader thread failed; every rank must hear of it
        return None, failure


def _raise_failure(failure: Optional[BaseException]) -> None:
    """Collective, once some rank failed: the failing rank raises its own error, the others a
    one-line error naming it (UserError when the cause is bad input), so no rank waits forever."""
    line = str(failure).strip().splitlines()[0] if failure is not None and str(failure).strip() else ""
    reports = all_gather_objects(
        None if failure is None else (type(failure).__name__, isinstance(failure, UserError), line)
    )
    if failure is not None:
        raise failure
    rank, (kind, bad_input, line) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    error = UserError if bad_input else RunFailed
    raise error(f"rank {rank} stopped the run: {kind}: {line}")


def train_step(run: Runner, batches: Iterator, step: int, length: RunLength) -> StepResult:
    engine, cfg = run.engine, run.cfg
    started = time.perf_counter()
    result = StepResult(lr=lr_at(step, length, cfg.train.lr, cfg.train.min_lr))
    for group, scale in zip(engine.optimizer.param_groups, run.lr_scales):  # the schedule is ours
        group["lr"] = result.lr * scale
    skipped_before = engine.skipped_steps
    losses = []
    for _ in range(length.grad_accum):
        batch, interruption = _next_batch(batches)
        failure = interruption if not isinstance(interruption, StopRequested) else None
        stop, failed = any_rank(signals.stop_requested() or batch is None, failure is not None)
        if failed:
            _raise_failure(failure)
        if stop:
            result.stopped = True
            return result
        loss = run.task.loss(run, batch)  # forward: recognition or retrieval (engine/tasks.py)
        (nonfinite,) = any_rank(not torch.isfinite(loss).item())
        result.nonfinite |= nonfinite
        # Backward even a non-finite loss: its gradients make DeepSpeed skip the optimizer step
        # on every rank, with its counters (micro-steps, steps, skipped steps) kept consistent.
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        result.clips += len(batch["key"])
        result.keys.extend(batch["key"])
        result.wait_s += run.train_loader.last_wait_s
    result.loss = sum(losses) / len(losses)
    result.seconds = time.perf_counter() - started
    result.applied = engine.skipped_steps == skipped_before
    if engine.global_steps != step:
        raise RuntimeError(f"step counters disagree: the loop is at step {step}, DeepSpeed at {engine.global_steps}")
    if result.nonfinite and result.applied:
        raise RuntimeError(f"step {step}: a loss was not finite but DeepSpeed applied the step")
    if result.applied:
        run.task.after_step(run.module)
    return result


class SavePolicy:
    """The one place that decides when to save: every `train.save_every` steps (or at each epoch
    end when 0), at the end of the run, and on a stop; never twice for one step."""

    def __init__(self, cfg, length: RunLength, resumed_at: int):
        self.every = int(cfg.train.save_every) or length.steps_per_epoch
        self.total = length.total_steps
        self.last_saved = resumed_at

    def periodic_due(self, step: int) -> bool:
        return step % self.every == 0 and step < self.total

    def save(self, run: Runner, state: TrainerState) -> None:
        if state.step > self.last_saved:
            run.save(state)
            self.last_saved = state.step


def train(cfg) -> Dict[str, Any]:
    """Train until the step budget is spent or a stop is requested; return summary.json's content."""
    signals.install_handlers()
    with Runner(cfg) as run:
        length = run.build_training()
        run.prepare_run_dir()
        state = run.trainer_state()
        run.resume(state)
        metrics = MetricsLogger(
            run.run_dir,
            run.is_main,
            length.total_steps,
            state.step,
            progress=cfg.logging.progress,
            tensorboard=cfg.logging.tensorboard,
        )
        started = time.perf_counter()
        saves, speed = SavePolicy(cfg, length, resumed_at=state.step), Throughput()
        try:
            status = _loop(run, cfg, length, state, metrics, saves, speed)
            training_peak = peak_memory()  # before the final evaluation, save and export
            return _finish(run, cfg, length, state, metrics, saves, status, speed, started, training_peak)
        finally:
            metrics.close()


def _loop(
    run: Runner,
    cfg,
    length: RunLength,
    state: TrainerState,
    metrics: MetricsLogger,
    saves: SavePolicy,
    speed: Throughput,
) -> str:
    batches = run.train_loader.batches()
    run.engine.train()
    while state.step < length.total_steps:
        step = state.step + 1
        result = train_step(run, batches, step, length)
        if result.stopped:
            return _stop(run, state, metrics, saves)
        state.end_step(step)
        speed.add(result.clips, result.wait_s)
        _count_skips(cfg, state, result, metrics)
        if step == 1:
            _check_backbone_received_no_gradient(run, cfg)
        _log_step(cfg, length, state, metrics, result, speed)
        if step % length.steps_per_epoch == 0 and step < length.total_steps:
            try:
                _end_of_epoch(run, cfg, state, metrics, step // length.steps_per_epoch)
            except StopRequested:
                return _stop(run, state, metrics, saves)
        if saves.periodic_due(step):
            saves.save(run, state)
        if cfg.train.stop_at_step and step == cfg.train.stop_at_step and step < length.total_steps:
            metrics.write(f"train.stop_at_step={cfg.train.stop_at_step}: saving and stopping")
            saves.save(run, state)
            return "stopped"
        speed.mark()  # evaluations and saves are not training time
    return "finished"


def _stop(run: Runner, state: TrainerState, metrics: MetricsLogger, saves: SavePolicy) -> str:
    """A stop all ranks agreed on: save the last completed step (unless saved already)."""
    metrics.write(f"stop requested ({signals.stop_reason() or 'another rank'}): saving at step {state.step}")
    saves.save(run, state)
    return "preempted"


def _count_skips(cfg, state: TrainerState, result: StepResult, metrics: MetricsLogger) -> None:
    if not result.applied:
        state.skipped_total += 1
    if not result.nonfinite:
        state.bad_in_row = 0
        return
    state.bad_in_row += 1
    state.bad_total += 1
    metrics.write(f"step {state.step}: non-finite loss, step skipped ({state.bad_in_row} in a row)")
    if state.bad_in_row >= cfg.train.max_bad_steps:
        raise RunFailed(
            f"stopping: {state.bad_in_row} consecutive non-finite losses at step {state.step} "
            f"(lower train.lr, check the data, or use bf16/fp32)"
        )


def _check_backbone_received_no_gradient(run: Runner, cfg) -> None:
    """The point of the method: backpropagation never enters the frozen backbone."""
    if cfg.model.method not in ("side4video", "linear_probe"):
        return
    leaked = [n for n, p in run.engine.module.backbone.named_parameters() if p.requires_grad or p.grad is not None]
    if leaked:
        raise RuntimeError(f"frozen backbone received gradients: {leaked[:3]}")


def _log_step(
    cfg, length: RunLength, state: TrainerState, metrics: MetricsLogger, result: StepResult, speed: Throughput
) -> None:
    figures = speed.read()
    metrics.step(
        state.step,
        {
            "loss": result.loss,
            "lr": result.lr,
            "clips/s": figures["clips_per_s"],
            "wait": f"{100 * figures['data_wait_fraction']:.0f}%",
        },
    )
    if state.step % cfg.train.log_every == 0 or state.step == 1 or not result.applied:
        row = {
            "loss": result.loss,
            "lr": result.lr,
            "skipped": not result.applied,
            "step_s": result.seconds,
            **figures,
            "epoch": round(state.step / length.steps_per_epoch, 4),
        }
        if cfg.logging.sample_keys:
            row["keys"] = result.keys
        metrics.log("train", state.step, row)


def _end_of_epoch(run: Runner, cfg, state: TrainerState, metrics: MetricsLogger, epoch: int) -> None:
    if cfg.train.eval_every and epoch % cfg.train.eval_every == 0 and run.val_loader is not None:
        _evaluate(run, state, metrics)


def _evaluate(run: Runner, state: TrainerState, metrics: MetricsLogger) -> Dict[str, Any]:
    report = run.evaluate()
    row = run.task.scalars(report)
    state.evals.append({"step": state.step, **row})
    metrics.log("eval", state.step, row)
    metrics.write(f"eval @ step {state.step}: {run.task.headline(report)}")
    return report


def _finish(
    run: Runner,
    cfg,
    length: RunLength,
    state: TrainerState,
    metrics: MetricsLogger,
    saves: SavePolicy,
    status: str,
    speed: Throughput,
    started: float,
    training_peak: Dict[str, int],
) -> Dict[str, Any]:
    """Final eval, checkpoint, export, summary.json and plots (stopped runs only checkpoint)."""
    summary: Dict[str, Any] = {
        "status": status,
        "task": run.task.name,
        "steps": state.step,
        "total_steps": length.total_steps,
        "epochs": round(state.step / length.steps_per_epoch, 3),
    }
    if status == "finished":
        try:
            report = _evaluate(run, state, metrics) if run.val_loader is not None else None
        except StopRequested:  # stopped during the final evaluation: a requeued run redoes it
            status = summary["status"] = _stop(run, state, metrics, saves)
    if status == "finished":
        saves.save(run, state)
        if report is not None:
            run.write_eval_report(report, tag="final_eval")
            summary.update(run.task.scalars(report))
            if run.task.name == "retrieval":  # the recall dicts too, as the demo and README read them
                summary.update(t2v=report["t2v"], v2t=report["v2t"])
        if cfg.train.export:
            export.export_model(
                run.engine.module,
                cfg,
                run.run_dir / "export",
                run.class_names,
                cfg.deepspeed.zero_stage,
                run.is_main,
                run.fingerprint(),
            )
    summary.update(_run_figures(run, speed, started, training_peak))
    summary.update(bad_steps=state.bad_total, skipped_steps=state.skipped_total)
    if run.is_main:
        if status == "finished":
            write_json(run.run_dir / "summary.json", summary)
            if cfg.logging.plots:
                plot_curves(run.run_dir)
        log.info("%s at step %d", status, state.step)
    return summary


def _run_figures(run: Runner, speed: Throughput, started: float, training_peak: Dict[str, int]) -> Dict[str, Any]:
    """Throughput (all ranks together), peak memory (the largest rank, and each rank's), bad
    samples and decoder fallbacks (all ranks)."""
    memory = {
        "rank": run.dist.rank,
        **run.built,
        **{f"{k[:-6]}_training_bytes": v for k, v in training_peak.items()},
        **peak_memory(),
    }
    per_rank = all_gather_objects(
        {"memory": memory, "bad": list(run.train_loader.bad_samples), "fallbacks": run.train_loader.decoder_fallbacks}
    )
    peaks = {key: max(r["memory"][key] for r in per_rank) for key in peak_memory()}
    figures = speed.read()
    return {
        "clips_per_s": figures["clips_per_s"] * run.dist.world_size,
        "data_wait_fraction": figures["data_wait_fraction"],
        **peaks,
        "bad_samples": sorted({key for r in per_rank for key in r["bad"]}),
        "decoder_fallbacks": sum(r["fallbacks"] for r in per_rank),  # DALI refused, PyAV decoded
        "trainable_params": sum(
            getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters() if p.requires_grad
        ),
        "world_size": run.dist.world_size,
        "memory_per_rank": [r["memory"] for r in per_rank],
        "wall_s": time.perf_counter() - started,
    }
