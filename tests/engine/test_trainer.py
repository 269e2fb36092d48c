"""The training loop's pieces in one process, with a fake DeepSpeed engine: the step, saves, stops,
failures, non-finite steps, the learning rate per group and the end-of-run statuses. (The same
loop under real DeepSpeed engines is tested end to end in test_train.py and test_resume.py.)"""

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import nn

from side4video.config import load_config
from side4video.engine.metrics import MemoryTimeline
from side4video.engine.schedule import RunLength, lr_at
from side4video.engine.state import TrainerState
from side4video.engine.status import RunStatus
from side4video.engine.tasks import Compute, RecognitionTask
from side4video.engine.train import SavePolicy, Trainer
from side4video.errors import RunFailed, UserError
from side4video.signals import StopRequested
from tests.support.engine import DEMO

CLASSES, FEATURES = 3, 4


class TinyModel(nn.Module):
    """A frozen 'backbone' and a trained head: the shape of the real models, in a few weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(FEATURES, FEATURES)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(FEATURES, CLASSES)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(video))


class FakeEngine:
    """What the loop asks of DeepSpeed's engine, with its rules: gradients accumulate over
    grad_accum micro-batches, the optimizer steps on the last one, and a non-finite gradient skips
    the step (counted) instead of applying it."""

    def __init__(self, model: nn.Module, grad_accum: int, lr_scales: List[float]):
        self.module, self.grad_accum = model, grad_accum
        groups = [{"params": [p], "lr_scale": s} for p, s in zip(model.head.parameters(), lr_scales)]
        self.optimizer = torch.optim.SGD(groups, lr=0.1)
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.weights_after: Dict[int, torch.Tensor] = {0: model.head.weight.detach().clone()}  # by step

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.module(video)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        grads = [p.grad for p in self.module.head.parameters()]
        if all(torch.isfinite(g).all() for g in grads):
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        self.weights_after[self.global_steps] = self.module.head.weight.detach().clone()


class FakeLoader:
    """Batches of one clip; `events` maps a batch index to what happens instead of / to it:
    'stop' (a stop request while waiting), 'fail' (a reader thread failed), 'nan' (a clip of NaN)."""

    def __init__(self, events: Dict[int, str]):
        self.events, self.position = events, 0
        self.last_wait_s, self.bad_samples, self.decoder_fallbacks = 0.0, [], 0

    def batches(self):
        while True:
            index, event = self.position, self.events.get(self.position)
            if event == "stop":
                self.events.pop(index)  # asked once: a resumed loop goes on
                raise StopRequested("stop requested (SIGTERM) while waiting for data")
            if event == "fail":
                raise OSError("s3://bucket/train-000003.tar: connection reset\nmore detail")
            self.position += 1
            video = torch.full((1, FEATURES), float("nan")) if event == "nan" else torch.randn(1, FEATURES)
            yield {"video": video, "label": torch.tensor([index % CLASSES]), "key": [f"clip-{index}"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: Dict[str, Any], every_rank=None) -> None:
        self.position = state["position"]


class FakeRun:
    """The Runner's face as the Trainer sees it, with its checkpoints recorded instead of written."""

    def __init__(self, tmp_path: Path, events: Dict[int, str], *overrides: str, evaluation: Optional[str] = None):
        quiet = ["logging.tensorboard=false", "logging.progress=false", "logging.plots=false", "train.export=false"]
        self.cfg = load_config(DEMO, [*quiet, "train.eval_every=1", *overrides])
        self.run_dir, self.is_main = tmp_path, True
        self.dist = SimpleNamespace(rank=0, world_size=1)
        self.model = TinyModel()
        self.engine = FakeEngine(self.model, int(self.cfg.train.grad_accum), [1.0, 0.5])
        self.task = RecognitionTask(self.cfg)
        self.train_loader = FakeLoader(events)
        self.val_loader = None if evaluation is None else object()
        self.evaluation, self.evaluations = evaluation, 0
        self.class_names, self.memory_after_build, self.memory = [], {}, MemoryTimeline()
        self.saved: List[int] = []
        self.reports: List[str] = []

    def compute(self) -> Compute:
        return Compute(model=self.model, call=self.engine, device=torch.device("cpu"), clip_dtype=torch.float32)

    def trainer_state(self) -> TrainerState:
        return TrainerState(loader=self.train_loader, fingerprint={})

    def resume(self, state: TrainerState) -> None:
        pass

    def save(self, state: TrainerState) -> None:
        self.saved.append(state.step)

    def evaluate(self) -> Dict[str, Any]:
        self.evaluations += 1
        if self.evaluation == "stop":
            raise StopRequested("stop requested (SIGTERM) during evaluation")
        return {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5, "samples": 2}

    def write_eval_report(self, report: Dict[str, Any], tag: str) -> None:
        self.reports.append(tag)

    def fingerprint(self) -> Dict[str, Any]:
        return {}


def run_trainer(run: FakeRun, total: int = 6, per_epoch: int = 3) -> Dict[str, Any]:
    length = RunLength(steps_per_epoch=per_epoch, total_steps=total, warmup_steps=0,
                       grad_accum=int(run.cfg.train.grad_accum))  # fmt: skip
    return Trainer(run, length).train()


def test_a_finished_run_saves_when_due_and_once_at_the_end(tmp_path):
    run = FakeRun(tmp_path, {}, "train.save_every=2", evaluation="report")
    summary = run_trainer(run)
    assert summary["status"] == RunStatus.FINISHED and summary["steps"] == 6
    assert run.saved == [2, 4, 6]  # periodic saves before the end, the final one once
    assert run.evaluations == 1 + 1  # epoch 1 (train.eval_every=1) and the final evaluation
    assert run.reports == ["final_eval"] and summary["top1"] == 0.5
    assert (tmp_path / "summary.json").is_file()


def test_a_stop_while_waiting_saves_the_last_completed_step_and_preempts(tmp_path):
    run = FakeRun(tmp_path, {5: "stop"}, "train.save_every=2")
    summary = run_trainer(run)
    assert summary["status"] == RunStatus.PREEMPTED and summary["steps"] == 5
    assert run.saved == [2, 4, 5]  # step 6 never happened; step 5 saved at the stop
    assert run.engine.global_steps == 5 and run.train_loader.position == 5
    assert not (tmp_path / "summary.json").exists()  # only a finished run writes it


def test_a_stop_already_saved_is_not_saved_twice(tmp_path):
    run = FakeRun(tmp_path, {2: "stop"}, "train.save_every=2")
    assert run_trainer(run)["status"] == RunStatus.PREEMPTED
    assert run.saved == [2]


def test_a_stop_during_the_final_evaluation_preempts_after_saving(tmp_path):
    run = FakeRun(tmp_path, {}, "train.save_every=100", "train.eval_every=0", evaluation="stop")
    summary = run_trainer(run)
    assert summary["status"] == RunStatus.PREEMPTED and run.saved == [6]
    assert run.reports == []  # a requeued run redoes the evaluation


def test_stop_at_step_saves_there_and_says_stopped(tmp_path):
    run = FakeRun(tmp_path, {}, "train.stop_at_step=5", "train.save_every=100")
    summary = run_trainer(run)
    assert summary["status"] == RunStatus.STOPPED and run.saved == [5] and summary["steps"] == 5


def test_a_loader_failure_ends_the_run_with_that_error_and_no_save(tmp_path):
    run = FakeRun(tmp_path, {3: "fail"}, "train.save_every=100")
    with pytest.raises(OSError, match="connection reset"):
        run_trainer(run)
    assert run.saved == []  # a failure is not a stop: nothing half-done is recorded as a checkpoint


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights(tmp_path):
    run = FakeRun(tmp_path, {2: "nan"}, "train.save_every=100", "train.max_bad_steps=2")
    summary = run_trainer(run)  # batch 2 is step 3's
    assert summary["status"] == RunStatus.FINISHED and summary["steps"] == 6
    assert (summary["bad_steps"], summary["skipped_steps"]) == (1, 1)
    weights = run.engine.weights_after
    assert torch.equal(weights[3], weights[2])  # the skipped step changed nothing
    assert not torch.equal(weights[2], weights[1]) and not torch.equal(weights[4], weights[3])  # the others train


def test_consecutive_non_finite_steps_end_the_run_in_one_line(tmp_path):
    run = FakeRun(tmp_path, {1: "nan", 2: "nan"}, "train.max_bad_steps=2")
    with pytest.raises(RunFailed, match="2 consecutive non-finite losses at step 3"):
        run_trainer(run)


def test_every_group_gets_the_schedule_times_its_lr_scale(tmp_path):
    run = FakeRun(tmp_path, {}, "train.lr=0.2", "train.min_lr=0.0", "train.grad_accum=2")
    summary = run_trainer(run, total=4, per_epoch=4)
    length = RunLength(steps_per_epoch=4, total_steps=4, warmup_steps=0, grad_accum=2)
    assert summary["steps"] == 4 and run.train_loader.position == 8  # 2 micro-batches per step
    assert [g["lr"] for g in run.engine.optimizer.param_groups] == pytest.approx(
        [lr_at(4, length, 0.2), 0.5 * lr_at(4, length, 0.2)]
    )


def test_save_policy_every_n_steps_or_each_epoch_never_twice():
    length = RunLength(steps_per_epoch=3, total_steps=9, warmup_steps=0, grad_accum=1)
    every_2 = SavePolicy(SimpleNamespace(save_every=2), length, resumed_at=0)
    assert [s for s in range(1, 10) if every_2.periodic_due(s)] == [2, 4, 6, 8]
    per_epoch = SavePolicy(SimpleNamespace(save_every=0), length, resumed_at=0)
    assert [s for s in range(1, 10) if per_epoch.periodic_due(s)] == [3, 6]  # the end saves itself

    saved = []
    run = SimpleNamespace(save=lambda state: saved.append(state.step))
    resumed = SavePolicy(SimpleNamespace(save_every=2), length, resumed_at=4)
    for step in (4, 5, 5):
        resumed.save(run, SimpleNamespace(step=step))
    assert saved == [5]  # the step it resumed from is saved already; a step is saved once


def test_run_status_reads_summaries_and_results():
    assert RunStatus.read("preempted") is RunStatus.PREEMPTED
    assert RunStatus.read(None) is RunStatus.FINISHED  # results written before statuses existed
    assert [s.complete for s in RunStatus] == [True, False, False]
    assert RunStatus.STOPPED == "stopped"  # summary.json holds the plain word
    with pytest.raises(ValueError):
        RunStatus.read("crashed")


def test_trainer_state_of_version_1_loads(tmp_path):
    loader = FakeLoader({})
    state = TrainerState(loader=loader, fingerprint={})
    saved = {**state.state_dict(), "version": 1, "bad_in_row": 2, "bad_total": 3, "data": {"position": 9}}
    for key in ("nonfinite_in_row", "nonfinite_total", "loader_position"):
        saved.pop(key)
    state.load_state_dict(saved)
    assert (state.nonfinite_in_row, state.nonfinite_total, state.loader_position) == (2, 3, {"position": 9})
    with pytest.raises(UserError, match="another frozen backbone"):
        TrainerState(loader=loader, fingerprint={"name": "other"}).load_state_dict(saved)


def test_each_rank_resumes_its_own_loader_position():
    """The checkpoint holds every rank's position (a rank that skipped bad samples has read further
    in its stream); at the same world size each rank takes its own, at another rank 0's."""
    saved = {**TrainerState(loader=FakeLoader({}), fingerprint={}).state_dict()}
    saved["loader_position"] = {"position": 3}  # rank 0's, as every version wrote it
    saved["loader_positions"] = [{"position": 3}, {"position": 5}]
    for rank, world, expected in ((0, 2, 3), (1, 2, 5), (0, 1, 3), (2, 3, 3)):
        loader = FakeLoader({})
        TrainerState(loader=loader, fingerprint={}, rank=rank, world_size=world).load_state_dict(saved)
        assert loader.position == expected, (rank, world)
