"""Engine pieces in one process, without DeepSpeed runs: config mapping, parameter groups,
evaluation arithmetic, checkpoint directory rules."""

import numpy as np
import pytest
import torch

from side4video.config import load_config
from side4video.engine import checkpoint
from side4video.engine.deepspeed_engine import deepspeed_config, param_groups
from side4video.engine.evaluate import accuracy_report, view_probabilities
from side4video.errors import UserError
from tests.support.engine import DEMO


def cfg_with(*overrides):
    return load_config(DEMO, list(overrides))


def test_deepspeed_config_maps_our_keys():
    cfg = cfg_with("train.batch_size=4", "data.repeated_views=2", "train.grad_accum=3", "train.grad_clip=1.0",
                   "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu", "deepspeed.precision=fp16",
                   "train.lr=1e-3", "train.min_lr=1e-5")
    ds = deepspeed_config(cfg, total_steps=100, warmup_steps=10, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8  # 4 clips x 2 views
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["gradient_clipping"] == 1.0
    sched = ds["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["warmup_type"]) == (100, 10, "linear")
    assert sched["cos_min_ratio"] == pytest.approx(1e-2)
    bf16 = deepspeed_config(cfg_with("deepspeed.precision=bf16"), 10, 0, 1)
    assert bf16["bf16"]["enabled"] and "fp16" not in bf16
    assert bf16["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed refuses 0


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
        "a": (0, p(0.7, 0.1, 0.1, 0.1)),   # right
        "b": (1, p(0.5, 0.3, 0.1, 0.1)),   # wrong, top-2
        "c": (1, p(0.1, 0.6, 0.2, 0.1)),   # right
        "d": (2, p(0.4, 0.3, 0.2, 0.1)),   # wrong
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


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (np.random.rand(), torch.rand(1).item()) == expected
