"""Engine pieces in one process, without DeepSpeed runs: config mapping, parameter groups, the
schedule, evaluation arithmetic, checkpoint directory rules, the trainer state."""

import numpy as np
import pytest
import torch

from side4video.config import load_config
from side4video.engine import checkpoint
from side4video.engine.deepspeed_engine import deepspeed_config, param_groups
from side4video.engine.evaluate import accuracy_report, view_probabilities
from side4video.engine.schedule import lr_at, run_length
from side4video.engine.state import TrainerState
from side4video.errors import UserError
from tests.support.engine import DEMO


def cfg_with(*overrides):
    return load_config(DEMO, list(overrides))


def test_deepspeed_config_maps_our_keys():
    cfg = cfg_with(
        "train.batch_size=4",
        "data.repeated_views=2",
        "train.grad_accum=3",
        "train.grad_clip=1.0",
        "deepspeed.zero_stage=3",
        "deepspeed.offload_param=cpu",
        "deepspeed.precision=fp16",
        "train.lr=1e-3",
        "train.min_lr=1e-5",
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8  # 4 clips x 2 views
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 8 * 3 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["gradient_clipping"] == 1.0
    assert "scheduler" not in ds  # the loop sets every step's learning rate itself
    bf16 = deepspeed_config(cfg_with("deepspeed.precision=bf16"), 1)
    assert bf16["bf16"] == {"enabled": True, "check_grad_overflow": True} and "fp16" not in bf16
    assert bf16["communication_data_type"] == "fp32"
    nvme = deepspeed_config(
        cfg_with("deepspeed.zero_stage=3", "deepspeed.offload_param=nvme"), 1, largest_frozen_unit=int(3e8)
    )
    assert nvme["zero_optimization"]["offload_param"]["buffer_size"] == int(3e8)  # a whole block per buffer


def test_zero3_prefetch_on_gpus_and_off_on_cpu_hosts():
    def zero(*overrides, cuda):
        return deepspeed_config(cfg_with("deepspeed.zero_stage=3", *overrides), 2, cuda=cuda)["zero_optimization"]

    gpu, cpu = zero(cuda=True), zero(cuda=False)  # deepspeed.prefetch=auto
    assert gpu["stage3_prefetch_bucket_size"] > 0 and "stage3_max_reuse_distance" not in gpu  # DeepSpeed's default
    # never: nothing gathered ahead, nothing kept for a later use (both, or the prefetcher keeps it)
    assert (cpu["stage3_prefetch_bucket_size"], cpu["stage3_max_reuse_distance"]) == (0, 0)
    assert zero("deepspeed.prefetch=always", cuda=False)["stage3_prefetch_bucket_size"] > 0
    assert zero("deepspeed.prefetch=never", cuda=True)["stage3_max_reuse_distance"] == 0


def test_schedule_warmup_then_cosine():
    cfg = cfg_with("train.epochs=2", "train.warmup_epochs=0.5", "train.lr=1e-3", "train.min_lr=1e-5")
    length = run_length(cfg.train, micro_batches_per_epoch=10)
    assert (length.steps_per_epoch, length.total_steps, length.warmup_steps) == (10, 20, 5)
    lrs = [lr_at(k, length, 1e-3, 1e-5) for k in range(1, 21)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)  # linear warmup, never 0
    assert lrs[5] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs[5:], lrs[6:]))
    assert 1e-5 < lrs[-1] < 5e-5  # the last step sits just above min_lr, not at it
    # no warmup: the first step uses the configured rate
    none = run_length(cfg_with("train.warmup_epochs=0").train, 10)
    assert lr_at(1, none, 1e-3) == pytest.approx(1e-3)
    # grad_accum: steps are optimizer steps; train.steps_per_epoch counts them too
    accum = run_length(cfg_with("train.grad_accum=4", "train.epochs=1").train, micro_batches_per_epoch=10)
    assert accum.steps_per_epoch == 2 and accum.total_steps == 2
    assert run_length(cfg_with("train.steps_per_epoch=7", "train.epochs=2").train, 10).total_steps == 14
    # a warmup longer than the run is clamped to it
    long = run_length(cfg_with("train.warmup_epochs=5", "train.max_steps=8").train, 10)
    assert long.warmup_steps == 8 and lr_at(8, long, 1.0) == pytest.approx(1.0)


def test_param_groups_hold_only_trainable_parameters():
    from side4video.engine.factory import model_from_config as build_model

    cfg = cfg_with("model.side.dim=64", "train.decay_norm_and_bias=false", "train.weight_decay=0.15")
    model = build_model(cfg)
    groups = param_groups(model, cfg)
    in_groups = {id(p) for g in groups for p in g["params"]}
    backbone = {id(p) for p in model.backbone.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable and not (in_groups & backbone)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.15 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    # the reference decays everything: one group
    assert len(param_groups(model, cfg_with("model.side.dim=64"))) == 1


def test_view_probabilities_softmax_per_view_then_mean():
    logits = torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0], [3.0, 0.0]])
    calls = []

    def forward(x):
        calls.append(x.shape)
        return logits

    video = torch.zeros(2, 2, 3, 3, 4, 4)  # 2 videos x 2 views
    probs = view_probabilities(forward, video)
    assert calls == [torch.Size([4, 3, 3, 4, 4])]
    expected = logits.softmax(-1).view(2, 2, 2).mean(1)
    assert torch.allclose(probs, expected)
    # averaging probabilities is not averaging logits
    assert not torch.allclose(probs, logits.view(2, 2, 2).mean(1).softmax(-1))


def test_accuracy_report():
    p = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731
    preds = {
        "a": (0, p(0.7, 0.1, 0.1, 0.1)),  # right
        "b": (1, p(0.5, 0.3, 0.1, 0.1)),  # wrong, top-2
        "c": (1, p(0.1, 0.6, 0.2, 0.1)),  # right
        "d": (2, p(0.4, 0.3, 0.2, 0.1)),  # wrong
    }
    report = accuracy_report(preds, num_classes=4, class_names=["w", "x", "y", "z"])
    assert report["samples"] == 4
    assert report["top1"] == pytest.approx(0.5)
    assert report["top5"] == pytest.approx(1.0)  # 4 classes: top-5 covers all
    assert report["per_class"] == {"w": 1.0, "x": 0.5, "y": 0.0}
    assert report["mean_class_accuracy"] == pytest.approx(0.5)
    assert np.array(report["confusion"]).sum() == 4 and report["confusion"][1][0] == 1


def test_checkpoint_resolution_and_latest(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    assert checkpoint.resolve("auto", str(tmp_path)) is None
    assert checkpoint.resolve("none", str(tmp_path)) is None
    for step in (2, 4, 6, 8):
        (root / f"step_{step:07d}").mkdir(parents=True)
    (root / ".tmp-step_0000010").mkdir()  # a save that never finished
    checkpoint._write_latest(root, "step_0000008")
    assert checkpoint.resolve("auto", str(tmp_path)) == (root, "step_0000008")
    assert checkpoint.resolve(str(root / "step_0000004"), "") == (root, "step_0000004")
    assert checkpoint.resolve(str(tmp_path), "") == (root, "step_0000008")
    checkpoint._prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_0000006", "step_0000008"]
    # latest naming a folder that is gone is not a checkpoint
    checkpoint._write_latest(root, "step_0000099")
    assert checkpoint.latest_tag(root) is None
    with pytest.raises(UserError, match="train.resume"):
        checkpoint.resolve(str(tmp_path / "nowhere"), "")


class _Loader:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"batches": self.position}

    def load_state_dict(self, state, every_rank=None):
        self.position = state["batches"]


def test_trainer_state_round_trip_is_weights_only_loadable(tmp_path):
    """What save writes is what resume reads: step, data position, RNG, evaluations, counters."""
    loader = _Loader()
    state = TrainerState(loader=loader, fingerprint={"name": "ViT-T-8", "weights": "random", "seed": 0})
    loader.position = 5
    state.end_step(7)
    state.nonfinite_total, state.skipped_total, state.evals = 1, 2, [{"step": 6, "top1": 0.5}]
    torch.save(state.state_dict(), tmp_path / "state.pt")
    expected = (np.random.rand(), torch.rand(1).item())

    fresh = TrainerState(loader=_Loader(), fingerprint={"name": "ViT-T-8", "weights": "random", "seed": 0})
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (fresh.step, fresh.loader.position, fresh.nonfinite_total, fresh.skipped_total) == (7, 5, 1, 2)
    assert fresh.evals == [{"step": 6, "top1": 0.5}]
    assert (np.random.rand(), torch.rand(1).item()) == expected  # the RNG streams continue where they were

    other = TrainerState(loader=_Loader(), fingerprint={"name": "ViT-T-8", "weights": "random", "seed": 1})
    with pytest.raises(UserError, match="another frozen backbone"):
        other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
