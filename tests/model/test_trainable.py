"""The one no-weight-decay rule (model/trainable.py) and the optimizer groups it gives each model
kind: which parameters decay, at which learning rate (`lr_scale`)."""

import pytest
import torch

from side4video.config import load_config
from side4video.engine.deepspeed_engine import param_groups
from side4video.engine.factory import model_from_config
from side4video.model.args import BackboneArgs, SideArgs
from side4video.model.retrieval import RetrievalArgs, build_retrieval_model, retrieval_param_groups
from side4video.model.trainable import skips_weight_decay
from side4video.precision import Precision
from tests.support import REPO

FP32 = Precision(torch.float32, torch.float32, torch.float32, torch.float32)


def _by_name(model, groups):
    """name -> (decayed, lr_scale, lr) of every parameter in the groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"] > 0, g["lr_scale"], g["lr"]) for g in groups for p in g["params"]}


def test_the_rule_skips_biases_and_1d_tensors_and_position_embeddings_unless_asked():
    matrix, vector, one = torch.zeros(4, 3), torch.zeros(4), torch.zeros(1)
    assert not skips_weight_decay("side.blocks.0.mlp.fc1.weight", matrix)
    assert not skips_weight_decay("side.patch_embed.weight", torch.zeros(4, 3, 3, 2, 2))
    assert skips_weight_decay("side.blocks.0.mlp.fc1.bias", vector)
    assert skips_weight_decay("side.blocks.0.attn_norm.weight", vector)  # a norm weight: 1-D
    assert skips_weight_decay("logit_scale.value", one)
    assert skips_weight_decay("head.proj.bias", matrix)  # a bias by name, whatever its shape
    for name in ("side.pos_embed.weight", "text.positional_embedding"):
        assert skips_weight_decay(name, matrix)
        assert not skips_weight_decay(name, matrix, decay_position_embeddings=True)
    assert skips_weight_decay("side.blocks.0.attn_norm.weight", vector, decay_position_embeddings=True)


def test_recognition_groups():
    demo = REPO / "configs" / "demo.yaml"
    cfg = load_config(demo, ["model.side.dim=64", "train.decay_norm_and_bias=false", "train.lr=0.01"])
    model = model_from_config(cfg)
    groups = param_groups(model, cfg)
    got = _by_name(model, groups)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(scale == 1.0 and lr == 0.01 for _, scale, lr in got.values())
    decayed = {n for n, (decay, _, _) in got.items() if decay}
    for name in ("side.patch_embed.weight", "side.blocks.0.mlp.fc1.weight", "side.blocks.0.conv.dw.weight"):
        assert name in decayed, name
    assert "head.fc.weight" in decayed
    for name in (
        "side.pos_embed.weight",  # a position embedding: 2-D, not decayed
        "side.blocks.0.attn_norm.weight",
        "side.blocks.0.conv_norm.weight",
        "side.post_norm.weight",
        "side.blocks.0.mlp.fc1.bias",
        "head.fc.bias",
    ):
        assert name not in decayed, name
    assert [g["weight_decay"] > 0 for g in groups] == [True, False]  # the order checkpoints hold
    # the default, as the reference: one group, everything decays
    everything = param_groups(model, load_config(demo, ["model.side.dim=64"]))
    assert len(everything) == 1 and everything[0]["weight_decay"] > 0 and everything[0]["lr_scale"] == 1.0


def test_retrieval_groups():
    model = build_retrieval_model(
        RetrievalArgs(
            precision=FP32, backbone=BackboneArgs(name="ViT-T-8", image_size=32), side=SideArgs(dim=64), max_words=12
        )
    )
    groups = retrieval_param_groups(model, lr=1e-4, coef_lr=1e-3, weight_decay=0.2)
    got = _by_name(model, groups)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {  # name: (decayed, lr_scale)
        "side.pos_embed.weight": (True, 1.0),  # position embeddings decay here, as in the reference
        "side.blocks.0.mlp.fc1.weight": (True, 1.0),
        "side_proj.weight": (True, 1.0),
        "text_weight_fc.0.weight": (True, 1.0),
        "side.blocks.0.attn_norm.weight": (False, 1.0),
        "side.blocks.0.mlp.fc1.bias": (False, 1.0),
        "text.positional_embedding": (True, 1e-3),
        "text.token_embedding.weight": (True, 1e-3),
        "text.transformer.resblocks.0.attn.in_proj_weight": (True, 1e-3),
        "text.transformer.resblocks.0.attn.in_proj_bias": (False, 1e-3),
        "text.ln_final.weight": (False, 1e-3),
        "logit_scale.value": (False, 1e-3),
    }
    for name, (decay, scale) in expected.items():
        assert got[name][:2] == (decay, scale), name
        assert got[name][2] == pytest.approx(1e-4 * scale), name
    # the reference's order: (lr, no decay), (lr, decay), (coef_lr, no decay), (coef_lr, decay)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.0), (1.0, 0.2), (1e-3, 0.0), (1e-3, 0.2)]
