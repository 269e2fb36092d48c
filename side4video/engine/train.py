"""`side4video train`: the epoch/step loop.

One training step, top to bottom: clips to the device -> forward (frozen backbone under no_grad,
side network, head) -> label-smoothed cross-entropy -> all ranks agree the loss is finite and
whether a stop was requested -> backward + optimizer step (DeepSpeed: ZeRO, clipping, loss
scaling, LR schedule) -> metrics -> checkpoint/eval when due -> stop if asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from side4video import signals
from side4video.engine import export
from side4video.engine.collectives import all_gather_objects, any_rank
from side4video.engine.metrics import MetricsLogger, Throughput, peak_memory, write_json
from side4video.engine.plots import plot_curves
from side4video.engine.runner import Runner
from side4video.errors import RunFailed
from side4video.logs import get_logger

log = get_logger(__name__)


@dataclass
class TrainState:
    step: int = 0          # optimizer steps done
    epoch: int = 0         # epoch in progress
    bad_in_row: int = 0    # consecutive non-finite losses
    bad_total: int = 0
    evals: List[Dict[str, Any]] = field(default_factory=list)
    speed: Throughput = field(default_factory=Throughput)  # this process's steps
    started: float = field(default_factory=time.perf_counter)


@dataclass
class StepResult:
    loss: float
    finite: bool
    stop: bool


def train_step(run: Runner, batch: Dict[str, Any], label_smoothing: float) -> StepResult:
    video = batch["video"].to(run.device, run.dtype, non_blocking=True)
    labels = batch["label"].to(run.device, non_blocking=True)
    logits = run.engine(video)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    # One collective answers both questions, so every rank skips or stops together.
    nonfinite, stop = any_rank(not torch.isfinite(loss).item(), signals.stop_requested())
    if not nonfinite:
        run.engine.backward(loss)
        run.engine.step()
    return StepResult(loss=loss.item(), finite=not nonfinite, stop=stop)


def train(cfg) -> Dict[str, Any]:
    """Train until the step budget is spent or a stop is requested; return summary.json's content."""
    signals.install_handlers()
    with Runner(cfg) as run:
        plan = run.build_training()
        run.prepare_run_dir()
        state = TrainState()
        client = run.resume()
        if client is not None:
            state.step, state.epoch = client["step"], client["epoch"]
            state.evals = list(client.get("evals", []))
            state.bad_total = client.get("bad_total", 0)
        metrics = MetricsLogger(run.run_dir, run.is_main, plan["total_steps"], state.step,
                                progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
        try:
            status = _loop(run, cfg, plan, state, metrics, resumed=client is not None)
            return _finish(run, cfg, plan, state, metrics, status)
        finally:
            metrics.close()


def _loop(run: Runner, cfg, plan: Dict[str, int], state: TrainState, metrics: MetricsLogger, resumed: bool) -> str:
    total = plan["total_steps"]
    accum = cfg.train.grad_accum
    speed = state.speed
    run.engine.train()
    while state.step < total:
        if not resumed:  # a restored loader already sits mid-epoch
            run.train_loader.set_epoch(state.epoch)
        resumed = False
        for micro, batch in enumerate(run.train_loader):
            result = train_step(run, batch, cfg.train.label_smoothing)
            speed.add(len(batch["key"]), run.train_loader.last_wait_s)
            if not result.finite:
                state.bad_in_row += 1
                state.bad_total += 1
                metrics.write(f"step {state.step}: non-finite loss, step skipped ({state.bad_in_row} in a row)")
                if state.bad_in_row >= cfg.train.max_bad_steps:
                    raise RunFailed(f"stopping: {state.bad_in_row} consecutive non-finite losses at step "
                                       f"{state.step} (lower train.lr, check the data, or use bf16/fp32)")
            else:
                state.bad_in_row = 0
            if (micro + 1) % accum == 0:
                state.step += 1
                if state.step == 1:
                    _check_backbone_received_no_gradient(run, cfg)
                _log_step(run, cfg, state, metrics, result, speed)
                if _periodic_save_due(cfg, state):
                    run.save(state.step, state.epoch, _extra(state))
                    speed.mark()
            if result.stop:
                metrics.write(f"stop requested ({signals.stop_reason() or 'another rank'}): saving at step {state.step}")
                run.save(state.step, state.epoch, _extra(state))
                return "preempted"
            if cfg.train.stop_at_step and state.step == cfg.train.stop_at_step and (micro + 1) % accum == 0:
                metrics.write(f"train.stop_at_step={cfg.train.stop_at_step}: saving and stopping")
                run.save(state.step, state.epoch, _extra(state))
                return "stopped"
            if state.step >= total:
                break
        else:
            state.epoch += 1
            _end_of_epoch(run, cfg, state, metrics, plan)
            speed.mark()
            continue
        break
    return "finished"


def _check_backbone_received_no_gradient(run: Runner, cfg) -> None:
    """The point of the method: backpropagation never enters the frozen backbone."""
    if cfg.model.method not in ("side4video", "linear_probe"):
        return
    leaked = [n for n, p in run.engine.module.backbone.named_parameters() if p.requires_grad or p.grad is not None]
    if leaked:
        raise RuntimeError(f"frozen backbone received gradients: {leaked[:3]}")


def _log_step(run: Runner, cfg, state: TrainState, metrics: MetricsLogger, result: StepResult, speed: Throughput):
    lr = run.scheduler.get_last_lr()[0] if run.scheduler is not None else cfg.train.lr
    scalars = {"loss": result.loss, "lr": lr, **speed.read()}
    metrics.step(state.step, {"loss": result.loss, "lr": lr, "clips/s": scalars["clips_per_s"],
                              "wait": f"{100 * scalars['data_wait_fraction']:.0f}%"})
    if state.step % cfg.train.log_every == 0 or state.step == 1:
        metrics.log("train", state.step, {**scalars, "epoch": state.epoch})


def _periodic_save_due(cfg, state: TrainState) -> bool:
    return cfg.train.save_every > 0 and state.step % cfg.train.save_every == 0


def _end_of_epoch(run: Runner, cfg, state: TrainState, metrics: MetricsLogger, plan: Dict[str, int]) -> None:
    last = state.step >= plan["total_steps"]
    if cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0 and run.val_loader is not None and not last:
        _evaluate(run, state, metrics)
    if cfg.train.save_every == 0 and not last:
        run.save(state.step, state.epoch, _extra(state))


def _evaluate(run: Runner, state: TrainState, metrics: MetricsLogger) -> Dict[str, Any]:
    report = run.evaluate()
    row = {"top1": report["top1"], "top5": report["top5"], "mean_class_accuracy": report["mean_class_accuracy"],
           "samples": report["samples"], "epoch": state.epoch}
    state.evals.append({"step": state.step, **row})
    metrics.log("eval", state.step, row)
    metrics.write(f"eval @ step {state.step}: top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%")
    return report


def _extra(state: TrainState) -> Dict[str, Any]:
    return {"evals": state.evals, "bad_total": state.bad_total}


def _finish(run: Runner, cfg, plan: Dict[str, int], state: TrainState, metrics: MetricsLogger, status: str):
    """Final eval, checkpoint, export, summary.json and plots (preempted runs only checkpoint)."""
    summary: Dict[str, Any] = {"status": status, "steps": state.step, "total_steps": plan["total_steps"],
                               "epochs": round(state.step / plan["steps_per_epoch"], 3)}
    if status == "finished":
        report = _evaluate(run, state, metrics) if run.val_loader is not None else None
        run.save(state.step, state.epoch, _extra(state))
        if report is not None:
            run.write_eval_report(report, tag="final_eval")
            summary.update(top1=report["top1"], top5=report["top5"], mean_class_accuracy=report["mean_class_accuracy"],
                           eval_samples=report["samples"])
        if cfg.train.export:
            export.export_model(run.engine.module, cfg, run.run_dir / "export", run.class_names,
                                cfg.deepspeed.zero_stage, run.is_main, run.fingerprint())
    summary.update(_run_figures(run, state))
    summary["bad_steps"] = state.bad_total
    if run.is_main:
        if status == "finished":
            write_json(run.run_dir / "summary.json", summary)
            if cfg.logging.plots:
                plot_curves(run.run_dir)
        log.info("%s at step %d", status, state.step)
    return summary


def _run_figures(run: Runner, state: TrainState) -> Dict[str, Any]:
    """Throughput (all ranks together), peak memory (the largest rank) and bad samples (all ranks)."""
    per_rank = all_gather_objects({"peak": peak_memory(), "bad": list(run.train_loader.bad_samples)})
    peaks = {key: max(r["peak"][key] for r in per_rank) for key in per_rank[0]["peak"]}
    speed = state.speed.read()
    return {
        "clips_per_s": speed["clips_per_s"] * run.dist.world_size,
        "data_wait_fraction": speed["data_wait_fraction"],
        **peaks,
        "bad_samples": sorted({key for r in per_rank for key in r["bad"]}),
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters() if p.requires_grad),
        "world_size": run.dist.world_size,
        "wall_s": time.perf_counter() - state.started,
    }
