"""`side4video train`: the step loop, owned by `Trainer`.

    while step < total_steps:
        step += 1
        train_step(batches, step)    # grad_accum micro-batches, one optimizer step
        record it; evaluate at epoch ends; save when due; stop when asked
    final evaluation -> RunStatus.FINISHED (or STOPPED / PREEMPTED, saved) -> _finish

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
from side4video.config import Config, TrainConfig
from side4video.engine import export
from side4video.engine.collectives import all_gather_objects, any_rank
from side4video.engine.metrics import MetricsLogger, Throughput, peak_memory, write_json
from side4video.engine.plots import plot_curves
from side4video.engine.runner import Runner
from side4video.engine.schedule import RunLength, lr_at
from side4video.engine.state import TrainerState
from side4video.engine.status import RunStatus
from side4video.errors import RunFailed, UserError, first_line
from side4video.logs import get_logger
from side4video.signals import StopRequested

log = get_logger(__name__)


PHASES = {1: "first", 2: "second"}  # steps in the memory timeline: the first, and the steady state


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


@dataclass
class Pulled:
    """One wait for the next batch ends with exactly one of: a batch, a stop request (signals.py),
    or a failure of a loader or reader thread."""

    batch: Optional[Dict[str, Any]] = None
    stop: Optional[StopRequested] = None
    failure: Optional[BaseException] = None


def pull(batches: Iterator[Dict[str, Any]]) -> Pulled:
    try:
        return Pulled(batch=next(batches))
    except StopRequested as stop:
        return Pulled(stop=stop)
    except Exception as failure:  # every rank must hear of it before anyone raises
        return Pulled(failure=failure)


def raise_failure(failure: Optional[BaseException]) -> None:
    """Collective, once some rank failed: the failing rank raises its own error, the others a
    one-line error naming it (UserError when the cause is bad input), so no rank waits forever."""
    report = None if failure is None else (type(failure).__name__, isinstance(failure, UserError), first_line(failure))
    reports = all_gather_objects(report)
    if failure is not None:
        raise failure
    rank, (kind, bad_input, line) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    error = UserError if bad_input else RunFailed
    raise error(f"rank {rank} stopped the run: {kind}: {line}")


class SavePolicy:
    """The one place that decides when to save: every `train.save_every` steps (or at each epoch
    end when 0), at the end of the run, and on a stop; never twice for one step."""

    def __init__(self, train_cfg: TrainConfig, length: RunLength, resumed_at: int):
        self.every = int(train_cfg.save_every) or length.steps_per_epoch
        self.total = length.total_steps
        self.last_saved = resumed_at

    def periodic_due(self, step: int) -> bool:
        return step % self.every == 0 and step < self.total

    def save(self, run: Runner, state: TrainerState) -> None:
        if state.step > self.last_saved:
            run.save(state)
            self.last_saved = state.step


def train(cfg: Config) -> Dict[str, Any]:
    """Train until the step budget is spent or a stop is requested; return summary.json's content."""
    signals.install_handlers()
    with Runner(cfg) as run:
        length = run.build_training()
        run.prepare_run_dir()
        return Trainer(run, length).train()


class Trainer:
    """The training run's state, on one owner: the Runner's pieces (engine, loaders, task), the
    step budget, the trainer state (what a checkpoint holds besides DeepSpeed's files), metrics,
    the save policy and the throughput meter."""

    def __init__(self, run: Runner, length: RunLength):
        self.run, self.cfg, self.length = run, run.cfg, length
        self.state = run.trainer_state()
        run.resume(self.state)
        logging_cfg = self.cfg.logging
        self.metrics = MetricsLogger(
            run.run_dir,
            run.is_main,
            length.total_steps,
            self.state.step,
            progress=logging_cfg.progress,
            tensorboard=logging_cfg.tensorboard,
        )
        self.saves = SavePolicy(self.cfg.train, length, resumed_at=self.state.step)
        self.speed = Throughput()
        self.final_report: Optional[Dict[str, Any]] = None
        self.training_peak: Optional[Dict[str, int]] = None  # before the final evaluation, save and export
        self.started = time.perf_counter()

    def train(self) -> Dict[str, Any]:
        try:
            return self._finish(self._loop())
        finally:
            self.metrics.close()

    # ------------------------------------------------------------------------------ the loop
    def _loop(self) -> RunStatus:
        batches = self.run.train_loader.batches()
        self.run.engine.train()
        while self.state.step < self.length.total_steps:
            step = self.state.step + 1
            result = self.train_step(batches, step)
            if result.stopped:
                return self._stop()
            self._record(step, result)
            if self._epoch_ended(step) and self._evaluation_due(step):
                if self._evaluate() is None:  # a stop was agreed during it
                    return self._stop()
            if self.saves.periodic_due(step):
                self.saves.save(self.run, self.state)
            if step == self.cfg.train.stop_at_step and step < self.length.total_steps:
                self.metrics.write(f"train.stop_at_step={step}: saving and stopping")
                self.saves.save(self.run, self.state)
                return RunStatus.STOPPED
            self.speed.mark()  # evaluations and saves are not training time
        self.training_peak = peak_memory()
        if self.run.val_loader is not None:
            self.final_report = self._evaluate()
            if self.final_report is None:  # stopped during the final evaluation: a requeued run redoes it
                return self._stop()
        return RunStatus.FINISHED

    def train_step(self, batches: Iterator[Dict[str, Any]], step: int) -> StepResult:
        """grad_accum micro-batches and one optimizer step (or none, when a stop is agreed first)."""
        engine, train_cfg = self.run.engine, self.cfg.train
        started = time.perf_counter()
        result = StepResult(lr=lr_at(step, self.length, train_cfg.lr, train_cfg.min_lr))
        for group in engine.optimizer.param_groups:  # the schedule is ours (engine/schedule.py)
            group["lr"] = result.lr * group["lr_scale"]
        skipped_before = engine.skipped_steps
        compute, losses = self.run.compute(), []
        phase = PHASES.get(step)  # the memory timeline's name of this step, for the first two
        for _ in range(self.length.grad_accum):
            pulled = pull(batches)
            stop, failed = any_rank(signals.stop_requested() or pulled.batch is None, pulled.failure is not None)
            if failed:
                raise_failure(pulled.failure)
            if stop:
                result.stopped = True
                return result
            loss = self.run.task.loss(compute, pulled.batch)  # recognition or retrieval (engine/tasks.py)
            self._mark(phase, "forward")
            (nonfinite,) = any_rank(not torch.isfinite(loss).item())
            result.nonfinite |= nonfinite
            # Backward even a non-finite loss: its gradients make DeepSpeed skip the optimizer step
            # on every rank, with its counters (micro-steps, steps, skipped steps) kept consistent.
            engine.backward(loss)
            self._mark(phase, "backward")
            engine.step()
            losses.append(loss.item())
            result.clips += len(pulled.batch["key"])
            result.keys.extend(pulled.batch["key"])
            result.wait_s += self.run.train_loader.last_wait_s
        self._mark(phase, "optimizer step")
        result.loss = sum(losses) / len(losses)
        result.seconds = time.perf_counter() - started
        result.applied = engine.skipped_steps == skipped_before
        _check_counters(engine, step, result)
        if result.applied:
            self.run.task.after_step(self.run.model)
        return result

    def _mark(self, phase: Optional[str], what: str) -> None:
        if phase is not None:
            self.run.memory.mark(f"{phase} {what}")

    def _record(self, step: int, result: StepResult) -> None:
        """Step `step` is done: the state moves on, counters, the first step's check, the log."""
        self.state.end_step(step)
        self.speed.add(result.clips, result.wait_s)
        self._count_nonfinite(result)
        if step == 1:
            _check_backbone_received_no_gradient(self.run)
        self._log_step(result)

    def _stop(self) -> RunStatus:
        """A stop all ranks agreed on: save the last completed step (unless saved already)."""
        reason = signals.stop_reason() or "another rank"
        self.metrics.write(f"stop requested ({reason}): saving at step {self.state.step}")
        self.saves.save(self.run, self.state)
        return RunStatus.PREEMPTED

    def _count_nonfinite(self, result: StepResult) -> None:
        state = self.state
        if not result.applied:
            state.skipped_total += 1
        if not result.nonfinite:
            state.nonfinite_in_row = 0
            return
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        self.metrics.write(f"step {state.step}: non-finite loss, step skipped ({state.nonfinite_in_row} in a row)")
        if state.nonfinite_in_row >= self.cfg.train.max_bad_steps:
            raise RunFailed(
                f"stopping: {state.nonfinite_in_row} consecutive non-finite losses at step {state.step} "
                f"(lower train.lr, check the data, or use bf16/fp32)"
            )

    def _log_step(self, result: StepResult) -> None:
        step, figures = self.state.step, self.speed.read()
        wait = f"{100 * figures['data_wait_fraction']:.0f}%"
        self.metrics.step(step, {"loss": result.loss, "lr": result.lr, "clips/s": figures["clips_per_s"], "wait": wait})
        if step % self.cfg.train.log_every == 0 or step == 1 or not result.applied:
            row = {
                "loss": result.loss,
                "lr": result.lr,
                "skipped": not result.applied,
                "step_s": result.seconds,
                **figures,
                "epoch": round(step / self.length.steps_per_epoch, 4),
            }
            if self.cfg.logging.sample_keys:  # every rank's, in rank order (collective: all ranks log this step)
                row["keys"] = [key for keys in all_gather_objects(result.keys) for key in keys]
            self.metrics.log("train", step, row)

    # ------------------------------------------------------------------------------ evaluation
    def _epoch_ended(self, step: int) -> bool:
        return step % self.length.steps_per_epoch == 0 and step < self.length.total_steps

    def _evaluation_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        epoch = step // self.length.steps_per_epoch
        return bool(every) and epoch % every == 0 and self.run.val_loader is not None

    def _evaluate(self) -> Optional[Dict[str, Any]]:
        """The validation report, logged and kept in the state; None when a stop was requested
        during it (every rank together)."""
        try:
            report = self.run.evaluate()
        except StopRequested:
            return None
        task, step = self.run.task, self.state.step
        row = task.scalars(report)
        self.state.evals.append({"step": step, **row})
        self.metrics.log("eval", step, row)
        self.metrics.write(f"eval @ step {step}: {task.headline(report)}")
        return report

    # ------------------------------------------------------------------------------ the end
    def _finish(self, status: RunStatus) -> Dict[str, Any]:
        """Summary of every run; a finished one also saves, writes its final report, exports and
        writes summary.json and the plots (a stopped one has saved already)."""
        run, state = self.run, self.state
        summary: Dict[str, Any] = {
            "status": status.value,
            "task": run.task.name,
            "steps": state.step,
            "total_steps": self.length.total_steps,
            "epochs": round(state.step / self.length.steps_per_epoch, 3),
        }
        if status is RunStatus.FINISHED:
            summary.update(self._complete())
        summary.update(_run_figures(self))
        summary.update(bad_steps=state.nonfinite_total, skipped_steps=state.skipped_total)
        if run.is_main and status is RunStatus.FINISHED:
            write_json(run.run_dir / "summary.json", summary)
            if self.cfg.logging.plots:
                plot_curves(run.run_dir)
        log.info("%s at step %d", status.value, state.step)
        return summary

    def _complete(self) -> Dict[str, Any]:
        """The finished run's last checkpoint, final report and export; the report's summary."""
        run = self.run
        self.saves.save(run, self.state)
        if self.cfg.train.export:
            export.export_model(
                run.model,
                self.cfg,
                run.run_dir / "export",
                run.class_names,
                self.cfg.deepspeed.zero_stage,
                run.is_main,
                run.fingerprint(),
            )
        if self.final_report is None:
            return {}
        run.write_eval_report(self.final_report, tag="final_eval")
        return run.task.summary(self.final_report)


def _check_counters(engine, step: int, result: StepResult) -> None:
    if engine.global_steps != step:
        raise RuntimeError(f"step counters disagree: the loop is at step {step}, DeepSpeed at {engine.global_steps}")
    if result.nonfinite and result.applied:
        raise RuntimeError(f"step {step}: a loss was not finite but DeepSpeed applied the step")


def _check_backbone_received_no_gradient(run: Runner) -> None:
    """The point of the method: backpropagation never enters the frozen backbone."""
    if run.cfg.model.method not in ("side4video", "linear_probe"):
        return
    leaked = [n for n, p in run.model.backbone.named_parameters() if p.requires_grad or p.grad is not None]
    if leaked:
        raise RuntimeError(f"frozen backbone received gradients: {leaked[:3]}")


def _run_figures(trainer: Trainer) -> Dict[str, Any]:
    """Throughput (all ranks together), peak memory (the largest rank, and each rank's; training
    alone and the whole run), bad samples and decoder fallbacks (all ranks)."""
    run, training_peak = trainer.run, trainer.training_peak or peak_memory()
    memory = {
        "rank": run.dist.rank,
        "timeline": run.memory.as_list(),
        **run.memory_after_build,
        **{f"{k[:-6]}_training_bytes": v for k, v in training_peak.items()},
        **peak_memory(),
    }
    per_rank = all_gather_objects(
        {"memory": memory, "bad": list(run.train_loader.bad_samples), "fallbacks": run.train_loader.decoder_fallbacks}
    )
    peaks = {key: max(r["memory"][key] for r in per_rank) for key in peak_memory()}
    figures = trainer.speed.read()
    return {
        "clips_per_s": figures["clips_per_s"] * run.dist.world_size,
        "data_wait_fraction": figures["data_wait_fraction"],
        **peaks,
        "bad_samples": sorted({key for r in per_rank for key in r["bad"]}),
        "decoder_fallbacks": sum(r["fallbacks"] for r in per_rank),  # DALI refused, PyAV decoded
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in run.model.parameters() if p.requires_grad),
        "world_size": run.dist.world_size,
        "memory_per_rank": [r["memory"] for r in per_rank],
        "wall_s": time.perf_counter() - trainer.started,
    }
