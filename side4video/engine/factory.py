"""The one adapter from a config to the libraries' plain arguments: model arguments, the
precision policy and the loaders. Everything that turns `cfg.model.*` into a model goes through
here (train, eval, predict, plan, bench)."""

from __future__ import annotations

from typing import List, Optional

import torch

from side4video.config import Config
from side4video.model.args import BackboneArgs, SideArgs
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


def run_precision(cfg: Config, cuda: bool = None) -> Precision:
    """The precision policy of this config on GPUs (`cuda`) or CPUs; by default on the device
    `train.device` asks for (auto: what this host has)."""
    if cuda is None:
        cuda = {"cuda": True, "cpu": False}.get(cfg.train.device, torch.cuda.is_available())
    return precision_from_config(cfg, cuda)


def backbone_args(cfg: Config) -> BackboneArgs:
    """The backbone part both model kinds share: `model.backbone.*` and `data.size`."""
    b = cfg.model.backbone
    return BackboneArgs(
        name=str(b.name),
        weights=str(b.weights or ""),
        image_size=int(cfg.data.size),
        quick_gelu=bool(b.quick_gelu),
        convert_weights=bool(b.convert_weights),
        fp32_blocks=tuple(int(i) for i in b.fp32_blocks),
        arch_overrides={k: int(getattr(b, k)) for k in ARCH_KEYS},
    )


def side_args(cfg: Config) -> SideArgs:
    """The side-network part both model kinds share: `model.side.*`."""
    s = cfg.model.side
    return SideArgs(
        dim=int(s.dim),
        layers=s.layers if isinstance(s.layers, str) else tuple(int(i) for i in s.layers),
        variant=str(s.variant),
        heads=int(s.heads),
        checkpointing=bool(s.checkpointing),
        drop_path=float(s.drop_path),
    )


def _shared_overrides(args: ModelArgs | RetrievalArgs) -> List[str]:
    """`key=value` overrides for what both model kinds share: method, backbone, side, input size."""
    b, s = args.backbone, args.side
    layers = s.layers if isinstance(s.layers, str) else "[" + ",".join(map(str, s.layers)) + "]"
    return [
        f"model.method={args.method}",
        f"model.backbone.name={b.name}",
        *[f"model.backbone.{k}={int(b.arch_overrides.get(k, 0))}" for k in ARCH_KEYS],
        f"model.backbone.quick_gelu={str(b.quick_gelu).lower()}",
        f"model.backbone.weights='{b.weights}'",
        f"model.backbone.precision={dtype_name(args.precision.storage)}",
        f"model.backbone.compute_precision={dtype_name(args.precision.compute)}",
        f"model.side.dim={s.dim}",
        f"model.side.heads={s.heads}",
        f"model.side.layers={layers}",
        f"model.side.variant={s.variant}",
        f"data.size={b.image_size}",
    ]


def model_args(cfg: Config, precision: Optional[Precision] = None) -> ModelArgs:
    m = cfg.model
    return ModelArgs(
        num_classes=int(cfg.data.num_classes),
        precision=precision or run_precision(cfg),
        method=m.method,
        backbone=backbone_args(cfg),
        side=side_args(cfg),
        adapter_dim=int(m.adapter.dim),
        adapter_kernel=int(m.adapter.kernel),
        head_dropout=float(m.head.dropout),
        seed=int(cfg.train.seed),
    )


def config_overrides(args: ModelArgs) -> List[str]:
    """The inverse of `model_args`: `key=value` overrides that build the same model from a config."""
    return [*_shared_overrides(args), f"data.num_classes={args.num_classes}"]


def model_from_config(cfg: Config, device="cpu", precision: Optional[Precision] = None, place_unit=None) -> VideoModel:
    """The config's model, materialised on `device` (the backbone loaded or randomly initialised;
    `place_unit`: see model/backbone.py `build_backbone`)."""
    return build_model(model_args(cfg, precision), device, place_unit)


def model_on_meta(cfg: Config, precision: Optional[Precision] = None) -> VideoModel:
    """The config's model with every tensor on `meta` (counting, planning)."""
    return build_model_on_meta(model_args(cfg, precision))


# ------------------------------------------------------------------------------------ retrieval
def retrieval_args(cfg: Config, precision: Optional[Precision] = None) -> RetrievalArgs:
    """The retrieval model's arguments (task: retrieval): backbone and side keys as recognition's,
    plus model.backbone.embed_dim, model.text.* and model.retrieval.*."""
    m = cfg.model
    return RetrievalArgs(
        precision=precision or run_precision(cfg),
        method=m.method,
        backbone=backbone_args(cfg),
        side=side_args(cfg),
        embed_dim=int(m.backbone.embed_dim),
        text_trainable=bool(m.text.trainable),
        text_overrides={k: int(getattr(m.text, k)) for k in TEXT_ARCH_KEYS},
        max_words=int(m.text.max_words),
        similarity=str(m.retrieval.similarity),
        logit_scale_max=float(m.retrieval.logit_scale_max),
        seed=int(cfg.train.seed),
    )


def retrieval_config_overrides(args: RetrievalArgs) -> List[str]:
    """The inverse of `retrieval_args` for what decides the modules: `key=value` overrides."""
    return [
        "task=retrieval",
        *_shared_overrides(args),
        f"model.backbone.embed_dim={int(args.embed_dim)}",
        *[f"model.text.{k}={int(args.text_overrides.get(k, 0))}" for k in TEXT_ARCH_KEYS],
        f"model.text.max_words={args.max_words}",
        f"model.text.trainable={str(args.text_trainable).lower()}",
        f"model.retrieval.similarity={args.similarity}",
    ]


def retrieval_model_from_config(
    cfg: Config, device="cpu", precision: Optional[Precision] = None, place_unit=None
) -> RetrievalModel:
    """The config's retrieval model, materialised on `device` (towers loaded or randomly initialised;
    `place_unit`: see model/backbone.py `build_backbone`)."""
    return build_retrieval_model(retrieval_args(cfg, precision), device, place_unit)


def retrieval_model_on_meta(cfg: Config, precision: Optional[Precision] = None) -> RetrievalModel:
    """The config's retrieval model with every tensor on `meta` (counting, planning)."""
    return build_retrieval_model_on_meta(retrieval_args(cfg, precision))


def eval_batch_size(cfg: Config) -> int:
    """Clips per evaluation batch: eval.batch_size, or train.batch_size when it is 0."""
    return int(cfg.eval.batch_size) or int(cfg.train.batch_size)


def loader_from_config(
    cfg: Config,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    labelled: bool = True,
):
    """The train or val loader of this rank; `dtype`: the clip dtype (default: the precision
    policy's); `device`: where DALI decodes (a GPU: 'mixed'; default: the CPU); `labelled`: the
    task's samples carry class labels to check (engine/tasks.py)."""
    from side4video.data.loader import VideoLoader

    train = split == "train"
    return VideoLoader(
        cfg.data,
        split,
        batch_size=cfg.train.batch_size if train else eval_batch_size(cfg),
        views=cfg.data.repeated_views if train else cfg.eval.crops,
        clips=1 if train else cfg.eval.clips,
        rank=rank,
        world_size=world_size,
        dtype=dtype or run_precision(cfg).clips,
        device=device or torch.device("cpu"),
        check_labels=labelled,
    )
