"""The one precision policy (side4video/precision.py), over every method x device kind x precision,
and what the built model and loader actually use."""

import itertools

import pytest
import torch

from side4video.config import load_config
from side4video.engine.factory import loader_from_config, model_on_meta, run_precision
from side4video.errors import UserError
from side4video.precision import DTYPES, resolve_precision
from tests.support import DEMO

METHODS = ("side4video", "linear_probe", "adapter", "full")
NAMES = ("fp32", "bf16", "fp16")


@pytest.mark.parametrize("method, cuda, storage, train", list(itertools.product(METHODS, (False, True), NAMES, NAMES)))
def test_policy(method, cuda, storage, train):
    p = resolve_precision(method, backbone=storage, train=train, cuda=cuda)
    assert p.train == DTYPES[train]
    if method in ("adapter", "full"):
        # gradients flow through the backbone: DeepSpeed's precision everywhere, no upcast hooks
        assert p.storage == p.compute == p.clips == DTYPES[train]
    else:
        assert p.storage == DTYPES[storage]
        # GPUs compute in the storage precision; CPU hosts in fp32 (half matmuls are slow there)
        assert p.compute == (DTYPES[storage] if cuda else torch.float32)
        assert p.clips == p.compute  # clips arrive in what the backbone's first layer computes in


def test_explicit_settings_win_where_they_can():
    p = resolve_precision("side4video", backbone="bf16", backbone_compute="fp16", clips="fp32", train="bf16", cuda=True)
    assert (p.storage, p.compute, p.clips) == (torch.bfloat16, torch.float16, torch.float32)
    with pytest.raises(UserError, match="compute_precision"):
        resolve_precision("full", backbone="fp16", backbone_compute="fp16", train="bf16", cuda=True)


@pytest.mark.parametrize("method", METHODS)
def test_model_and_loader_follow_the_policy(method, synthetic_data):
    overrides = [
        "model.backbone.precision=fp16",
        "deepspeed.precision=bf16",
        f"model.method={method}",
        "model.backbone.name=ViT-T-16",
        "data.size=32",
        "data.num_classes=4",
        f"data.train.shards={synthetic_data['train']}",
        f"data.val.shards={synthetic_data['val']}",
    ]
    cfg = load_config(DEMO, overrides)
    policy = run_precision(cfg, cuda=False)
    model = model_on_meta(cfg, policy)
    assert model.backbone.storage_dtype == policy.storage and model.backbone.compute_dtype == policy.compute
    assert {p.dtype for p in model.backbone.frozen_parameters()} == {policy.storage}
    loader = loader_from_config(cfg, "val")
    try:
        assert loader.dtype == policy.clips
    finally:
        loader.close()
