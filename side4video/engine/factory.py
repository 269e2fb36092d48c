"""The one adapter from a config to the libraries' plain arguments: model arguments, the
precision policy and the loaders. Everything that turns `cfg.model.*` into a model goes through
here (train, eval, predict, plan, bench)."""

from __future__ import annotations

from typing import List

import torch

from side4video.model.build import ModelArgs, VideoModel, build_model, build_model_on_meta
from side4video.model.retrieval import (
    RetrievalArgs,
    RetrievalModel,
    build_retrieval_model,
    build_retrieval_model_on_meta,
)
from side4video.precision import Precision, dtype_name, precision_from_config

ARCH_KEYS = ("width", "layers", "heads", "patch_size")
TEXT_ARCH_KEYS = ("width", "layers", "heads", "vocab_size")


def run_precision(cfg, cuda: bool = None) -> Precision:
    """The precision policy of this config on GPUs (`cuda`) or CPUs; by default on the device
    `train.device` asks for (auto: what this host has)."""
    if cuda is None:
        cuda = {"cuda": True, "cpu": False}.get(cfg.train.device, torch.cuda.is_available())
    return precision_from_config(cfg, cuda)


def model_args(cfg, precision: Precision = None) -> ModelArgs:
    m = cfg.model
    layers = m.side.layers
    return ModelArgs(
        num_classes=int(cfg.data.num_classes),
        precision=precision or run_precision(cfg),
        method=m.method,
        backbone=str(m.backbone.name),
        weights=str(m.backbone.weights or ""),
        image_size=int(cfg.data.size),
        quick_gelu=bool(m.backbone.quick_gelu),
        arch_overrides={k: int(m.backbone[k]) for k in ARCH_KEYS},
        side_dim=int(m.side.dim),
        side_layers=layers if isinstance(layers, str) else tuple(int(i) for i in layers),
        side_variant=m.side.variant,
        side_heads=int(m.side.heads),
        side_checkpointing=bool(m.side.checkpointing),
        side_drop_path=float(m.side.drop_path),
        adapter_dim=int(m.adapter.dim),
        adapter_kernel=int(m.adapter.kernel),
        head_dropout=float(m.head.dropout),
        seed=int(cfg.train.seed),
    )


def config_overrides(args: ModelArgs) -> List[str]:
    """The inverse of `model_args`: `key=value` overrides that build the same model from a config."""
    layers = args.side_layers if isinstance(args.side_layers, str) else "[" + ",".join(map(str, args.side_layers)) + "]"
    arch = [f"model.backbone.{k}={int(args.arch_overrides.get(k, 0))}" for k in ARCH_KEYS]
    return [
        f"model.method={args.method}",
        f"model.backbone.name={args.backbone}",
        *arch,
        f"model.backbone.quick_gelu={str(args.quick_gelu).lower()}",
        f"model.backbone.weights='{args.weights}'",
        f"model.backbone.precision={dtype_name(args.precision.storage)}",
        f"model.backbone.compute_precision={dtype_name(args.precision.compute)}",
        f"model.side.dim={args.side_dim}",
        f"model.side.heads={args.side_heads}",
        f"model.side.layers={layers}",
        f"model.side.variant={args.side_variant}",
        f"data.size={args.image_size}",
        f"data.num_classes={args.num_classes}",
    ]


def model_from_config(cfg, device="cpu", precision: Precision = None, place_unit=None) -> VideoModel:
    """The config's model, materialised on `device` (the backbone loaded or randomly initialised;
    `place_unit`: see model/backbone.py `build_backbone`)."""
    return build_model(model_args(cfg, precision), device, place_unit)


def model_on_meta(cfg, precision: Precision = None) -> VideoModel:
    """The config's model with every tensor on `meta` (counting, planning)."""
    return build_model_on_meta(model_args(cfg, precision))


# ------------------------------------------------------------------------------------ retrieval
def retrieval_args(cfg, precision: Precision = None) -> RetrievalArgs:
    """The retrieval model's arguments (task: retrieval): backbone and side keys as recognition's,
    plus model.text.* and model.retrieval.*."""
    m = cfg.model
    layers = m.side.layers
    return RetrievalArgs(
        precision=precision or run_precision(cfg),
        method=m.method,
        backbone=str(m.backbone.name),
        weights=str(m.backbone.weights or ""),
        image_size=int(cfg.data.size),
        quick_gelu=bool(m.backbone.quick_gelu),
        arch_overrides={k: int(m.backbone[k]) for k in ARCH_KEYS},
        embed_dim=int(m.backbone.embed_dim),
        side_dim=int(m.side.dim),
        side_layers=layers if isinstance(layers, str) else tuple(int(i) for i in layers),
        side_variant=m.side.variant,
        side_heads=int(m.side.heads),
        side_checkpointing=bool(m.side.checkpointing),
        side_drop_path=float(m.side.drop_path),
        text_trainable=bool(m.text.trainable),
        text_overrides={k: int(m.text[k]) for k in TEXT_ARCH_KEYS},
        max_words=int(m.text.max_words),
        similarity=str(m.retrieval.similarity),
        logit_scale_max=float(m.retrieval.logit_scale_max),
        seed=int(cfg.train.seed),
    )


def retrieval_config_overrides(args: RetrievalArgs) -> List[str]:
    """The inverse of `retrieval_args` for what decides the modules: `key=value` overrides."""
    layers = args.side_layers if isinstance(args.side_layers, str) else "[" + ",".join(map(str, args.side_layers)) + "]"
    arch = [f"model.backbone.{k}={int(args.arch_overrides.get(k, 0))}" for k in ARCH_KEYS]
    text = [f"model.text.{k}={int(args.text_overrides.get(k, 0))}" for k in TEXT_ARCH_KEYS]
    return [
        "task=retrieval",
        f"model.method={args.method}",
        f"model.backbone.name={args.backbone}",
        *arch,
        f"model.backbone.embed_dim={int(args.embed_dim)}",
        f"model.backbone.quick_gelu={str(args.quick_gelu).lower()}",
        f"model.backbone.weights='{args.weights}'",
        f"model.backbone.precision={dtype_name(args.precision.storage)}",
        f"model.backbone.compute_precision={dtype_name(args.precision.compute)}",
        f"model.side.dim={args.side_dim}",
        f"model.side.heads={args.side_heads}",
        f"model.side.layers={layers}",
        f"model.side.variant={args.side_variant}",
        f"data.size={args.image_size}",
        *text,
        f"model.text.max_words={args.max_words}",
        f"model.text.trainable={str(args.text_trainable).lower()}",
        f"model.retrieval.similarity={args.similarity}",
    ]


def retrieval_model_from_config(cfg, device="cpu", precision: Precision = None, place_unit=None) -> RetrievalModel:
    """The config's retrieval model, materialised on `device` (towers loaded or randomly initialised;
    `place_unit`: see model/backbone.py `build_backbone`)."""
    return build_retrieval_model(retrieval_args(cfg, precision), device, place_unit)


def retrieval_model_on_meta(cfg, precision: Precision = None) -> RetrievalModel:
    """The config's retrieval model with every tensor on `meta` (counting, planning)."""
    return build_retrieval_model_on_meta(retrieval_args(cfg, precision))


def loader_from_config(
    cfg, split: str, rank: int = 0, world_size: int = 1, dtype: torch.dtype = None, device: torch.device = None
):
    """The train or val loader of this rank; `dtype`: the clip dtype (default: the precision
    policy's); `device`: where DALI decodes (a GPU: 'mixed'; default: the CPU)."""
    from side4video.data.loader import VideoLoader

    train = split == "train"
    return VideoLoader(
        cfg.data,
        split,
        batch_size=cfg.train.batch_size if train else (cfg.eval.batch_size or cfg.train.batch_size),
        views=cfg.data.repeated_views if train else cfg.eval.crops,
        clips=1 if train else cfg.eval.clips,
        rank=rank,
        world_size=world_size,
        dtype=dtype or run_precision(cfg).clips,
        device=device or torch.device("cpu"),
        check_labels=cfg.task == "recognition",
    )
