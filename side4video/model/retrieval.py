"""The text-video retrieval model (docs/model.md "Retrieval variant").

Video: the frozen backbone with every block (CLIP) or every other block (EVA) tapped -> side
network -> per-frame side features (post BN, spatial mean) -> `side_proj` (d -> D, zero at init),
added to each frame's final class token -> the backbone's final norm and projection: frame
embeddings (B, T, E). At initialisation this is the frozen CLIP embedding of every frame; method
`linear_probe` is that frozen baseline with no side network at all.
Text: open_clip's text tower (model/text.py), frozen or trained at `lr * coef_lr`.
Similarity (WTI or meanP): model/similarity.py; loss and the cross-rank gather: model/contrastive.py.

The model has no parameter of its own outside submodules, so every part (encode_text,
encode_video, the similarity) can be called on its own under ZeRO-3, which gathers a module's
weights only while that module is called.

`build_retrieval_model(RetrievalArgs(...))` takes plain arguments (engine/factory.py turns a
config into them); `retrieval_from_official(state_dict, config)` loads a reference model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from side4video.errors import UserError
from side4video.model.backbone import build_backbone
from side4video.model.contrastive import gather_text, gather_video, symmetric_cross_entropy, world_size
from side4video.model.side import SideNetwork
from side4video.model.similarity import (
    SIMILARITIES,
    SIMILARITY_FUNCTIONS,
    TextEmbedding,
    TokenWeights,
    VideoEmbedding,
    text_embedding,
    video_embedding,
)
from side4video.model.spec import BackboneSpec, embed_dim, resolve_spec, resolve_taps, side_variant
from side4video.model.text import TextTower, build_text_tower, resolve_text_spec
from side4video.model.tower import FrozenBackbone
from side4video.model.trainable import TrainableState
from side4video.precision import Precision

RETRIEVAL_METHODS = ("side4video", "linear_probe")
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial value, used when the weights bring none
MAX_LOGIT_SCALE = math.log(100)


class SideProjection(nn.Module):
    """side features (..., d) -> (..., D): the zero-initialised map into the backbone's width."""

    def __init__(self, side_dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(side_dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


class LogitScale(nn.Module):
    """exp(logit scale), the temperature of the contrastive loss, bounded by `max_value`.

    The bound is applied in forward too: under mixed precision the optimizer's master copy, not
    this parameter, is what the step updates, so a clamp of the parameter alone would not hold.
    The value is a 1-element tensor, not a 0-dim one: DeepSpeed broadcasts parameters as bytes.
    """

    def __init__(self, value: float = CLIP_LOGIT_SCALE, max_value: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.value = nn.Parameter(torch.tensor([float(value)]))
        self.max_value = float(max_value)

    def forward(self) -> torch.Tensor:
        return self.value.float().clamp(max=self.max_value).exp().reshape(())

    @torch.no_grad()
    def clamp_(self) -> None:
        if self.value.numel():  # a ZeRO-3 partition of another rank is empty
            self.value.clamp_(max=self.max_value)


def frame_embeddings(
    backbone: FrozenBackbone, side: Optional[SideNetwork], side_proj: Optional[SideProjection], video: torch.Tensor
) -> torch.Tensor:
    """video (B, T, 3, H, W) -> frame embeddings (B, T, E)."""
    B, T = video.shape[:2]
    taps = backbone(video.flatten(0, 1), num_frames=T)
    x = taps[-1][:, 0].view(B, T, -1)  # each frame's final class token
    if side is not None:
        features = side(video, taps)  # (B, T, d)
        x = x.to(features.dtype) + side_proj(features)
    x = x.to(backbone.compute_dtype)
    return backbone.proj(backbone.final_norm(x))


class RetrievalVideoEncoder(nn.Module):
    """The retrieval video encoder alone: backbone + side network + side projection."""

    def __init__(self, backbone: FrozenBackbone, side: SideNetwork):
        super().__init__()
        _check_backbone(backbone)
        self.backbone = backbone
        self.side = side
        self.side_proj = SideProjection(side.dim, backbone.width)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> frame embeddings (B, T, E)."""
        return frame_embeddings(self.backbone, self.side, self.side_proj, video)


def _check_backbone(backbone: FrozenBackbone) -> None:
    if backbone.final_norm is None or backbone.proj is None or backbone.taps[-1] != backbone.num_layers - 1:
        raise ValueError("retrieval encoder needs the last block tapped, the final norm and the projection")


class RetrievalModel(TrainableState, nn.Module):
    """Captions + videos -> embeddings -> similarity matrix -> symmetric contrastive loss."""

    def __init__(
        self,
        method: str,
        backbone: FrozenBackbone,
        side: Optional[SideNetwork],
        text: TextTower,
        similarity: str = "wti",
        logit_scale: float = CLIP_LOGIT_SCALE,
        logit_scale_max: float = MAX_LOGIT_SCALE,
    ):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise UserError(
                f"config key 'model.retrieval.similarity' is {similarity!r}; allowed: {', '.join(SIMILARITIES)}"
            )
        _check_backbone(backbone)
        self.method = method
        self.similarity_kind = similarity
        self.backbone = backbone
        self.side = side
        self.side_proj = SideProjection(side.dim, backbone.width) if side is not None else None
        self.text = text
        dim = text.output_dim
        self.text_weight_fc = TokenWeights(dim) if similarity == "wti" else None
        self.video_weight_fc = TokenWeights(dim) if similarity == "wti" else None
        self.logit_scale = LogitScale(logit_scale, logit_scale_max)

    # -- the two sides
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, E) token features (fp32, not normalised)."""
        return self.text(input_ids).float()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, E) frame features (fp32, not normalised)."""
        return frame_embeddings(self.backbone, self.side, self.side_proj, video).float()

    def text_embedding(self, features: torch.Tensor, text_mask: torch.Tensor) -> TextEmbedding:
        logits = self.text_weight_fc(features) if self.text_weight_fc is not None else None
        return text_embedding(self.similarity_kind, features, text_mask, logits)

    def video_embedding(self, features: torch.Tensor) -> VideoEmbedding:
        logits = self.video_weight_fc(features) if self.video_weight_fc is not None else None
        return video_embedding(self.similarity_kind, features, logits)

    def embed_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> TextEmbedding:
        """Token ids + mask -> what the similarity needs (evaluation encodes each caption once)."""
        return self.text_embedding(self.encode_text(input_ids), text_mask)

    def embed_video(self, video: torch.Tensor) -> VideoEmbedding:
        return self.video_embedding(self.encode_video(video))

    def similarity(self, text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
        """(texts, videos) similarity, not scaled: what evaluation ranks."""
        return SIMILARITY_FUNCTIONS[self.similarity_kind](text, video)

    # -- training
    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: Optional[torch.Tensor] = None,
        gather: Optional[bool] = None,
    ) -> Dict[str, Any]:
        """One batch of (caption, video) pairs, pair i matching.

        `video_mask` is accepted for the reference's signature and ignored, as WTI ignores it.
        `gather` (default: in training with several ranks): score the batch gathered from all
        ranks; the loss is then the same on every rank.
        """
        text_features = self.encode_text(input_ids)
        video_features = self.encode_video(video)
        out: Dict[str, Any] = {"text_features": text_features, "video_features": video_features}
        if self.text_weight_fc is not None:
            out["text_weight_logits"] = self.text_weight_fc(text_features)
            out["video_weight_logits"] = self.video_weight_fc(video_features)
        text = text_embedding(self.similarity_kind, text_features, text_mask, out.get("text_weight_logits"))
        videos = video_embedding(self.similarity_kind, video_features, out.get("video_weight_logits"))
        if gather is None:
            gather = self.training and world_size() > 1
        if gather:
            text, videos = gather_text(text), gather_video(videos)
        sim = self.similarity(text, videos)
        logits = self.logit_scale() * sim
        out.update(logits_unscaled=sim, logits=logits, loss=symmetric_cross_entropy(logits))
        return out

    def clamp_logit_scale(self) -> None:
        """Call after every optimizer step (the reference clamps to ln(100))."""
        self.logit_scale.clamp_()

    def frozen_towers(self) -> Dict[str, nn.Module]:
        """Frozen modules by attribute name (the engine keeps them in their storage precision)."""
        return {prefix[:-1]: getattr(self, prefix[:-1]) for prefix in self._frozen_prefixes()}

    # -- what is trained, and what a checkpoint holds
    def _frozen_prefixes(self) -> List[str]:
        frozen = [] if self.backbone.trainable else ["backbone."]
        if not any(p.requires_grad for p in self.text.parameters()):
            frozen.append("text.")
        return frozen

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Trained parameters + buffers outside the frozen towers (e.g. BN statistics)."""
        frozen = tuple(self._frozen_prefixes())
        out = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            trained = tensor.requires_grad if isinstance(tensor, nn.Parameter) else not name.startswith(frozen)
            if trained:
                out[name] = tensor.detach()
        return out

    def parameter_counts(self) -> Dict[str, int]:
        def count(params) -> int:
            return sum(p.numel() for p in params)

        heads = [m for m in (self.text_weight_fc, self.video_weight_fc, self.logit_scale) if m is not None]
        side = [m for m in (self.side, self.side_proj) if m is not None]
        return {
            "backbone_params": count(self.backbone.frozen_parameters()),
            "side_params": sum(count(m.parameters()) for m in side),
            "adapter_params": 0,
            "text_params": count(self.text.parameters()),
            "head_params": sum(count(m.parameters()) for m in heads),
            "trainable_params": count(p for p in self.parameters() if p.requires_grad),
        }


def retrieval_param_groups(model: RetrievalModel, lr: float, coef_lr: float, weight_decay: float) -> List[Dict]:
    """Optimizer groups as the reference: the CLIP towers and the logit scale at `lr * coef_lr`,
    the side network and the WTI weights at `lr`; weight decay except on biases and norms
    (1-D tensors). Empty groups are left out; frozen parameters never enter."""
    slow_prefixes = ("backbone.", "text.", "logit_scale.")
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        slow = name.startswith(slow_prefixes)
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault((slow, decay), []).append(param)
    return [
        {"params": params, "lr": lr * coef_lr if slow else lr, "weight_decay": weight_decay if decay else 0.0}
        for (slow, decay), params in sorted(groups.items())
    ]


# ------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class RetrievalArgs:
    """Everything that decides a retrieval model's modules and weights."""

    precision: Precision
    method: str = "side4video"  # or linear_probe: the frozen CLIP baseline, no side network
    backbone: str = "ViT-B-16"  # open_clip model name (or ViT-T-16 / ViT-T-8)
    weights: str = ""  # local CLIP checkpoint (both towers); empty: random init
    image_size: int = 224
    quick_gelu: bool = False
    arch_overrides: Dict[str, int] = field(default_factory=dict)  # width/layers/heads/patch_size, 0 = named
    embed_dim: int = 0  # width of both towers' outputs (0: the model config's)
    side_dim: int = 320
    side_layers: Union[str, Sequence[int]] = "auto"
    side_variant: str = "auto"
    side_heads: int = 0
    side_checkpointing: bool = False
    side_drop_path: float = 0.0
    text_trainable: bool = True
    text_overrides: Dict[str, int] = field(default_factory=dict)  # width/layers/heads/vocab_size, 0 = named
    max_words: int = 32
    similarity: str = "wti"
    logit_scale_max: float = MAX_LOGIT_SCALE
    seed: int = 0

    def spec(self) -> BackboneSpec:
        spec = resolve_spec(self.backbone, int(self.image_size), quick_gelu=self.quick_gelu, **self.arch_overrides)
        return dataclasses.replace(spec, embed_dim=int(self.embed_dim)) if self.embed_dim else spec


def _build(args: RetrievalArgs, device, place_unit=None) -> RetrievalModel:
    if args.method not in RETRIEVAL_METHODS:
        raise UserError(
            f"config key 'model.method' is {args.method!r}; retrieval allows "
            f"{', '.join(RETRIEVAL_METHODS)} (linear_probe: the frozen CLIP baseline)"
        )
    spec = args.spec()
    variant = side_variant(args.side_variant, spec)
    taps = resolve_taps(args.side_layers, spec.layers, variant) if args.method == "side4video" else [spec.layers - 1]
    if taps[-1] != spec.layers - 1:
        raise UserError(
            f"config key 'model.side.layers': retrieval needs the last block ({spec.layers - 1}) tapped, "
            f"its class token is the frame embedding"
        )
    p = args.precision
    backbone = build_backbone(
        spec,
        taps,
        storage_dtype=p.storage,
        compute_dtype=p.compute,
        weights=args.weights,
        seed=args.seed,
        device=device,
        keep_final_norm=True,
        keep_proj=True,
        tap_dtype=p.storage,
        place_unit=place_unit,
    )
    text_spec = resolve_text_spec(
        args.backbone, int(args.max_words), embed_dim(spec), quick_gelu=spec.quick_gelu, **args.text_overrides
    )
    # A frozen text tower computes in the backbone's compute precision; a trained one is fp32
    # (DeepSpeed casts it to its training precision).
    text, scale = build_text_tower(
        text_spec,
        dtype=torch.float32 if args.text_trainable else p.compute,
        device=device,
        weights=args.weights,
        seed=args.seed + 2,
        trainable=args.text_trainable,
    )
    # Trained modules: fp32, deterministic from the seed.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(args.seed + 1)
        side = None
        if args.method == "side4video":
            side = SideNetwork(
                spec.width,
                args.side_dim,
                len(taps),
                spec.patch_size,
                spec.num_patches,
                heads=args.side_heads,
                variant=variant,
                retrieval=True,
                checkpointing=args.side_checkpointing,
                drop_path=args.side_drop_path,
            )
        model = RetrievalModel(
            args.method,
            backbone,
            side,
            text,
            args.similarity,
            logit_scale=CLIP_LOGIT_SCALE if scale is None else scale,
            logit_scale_max=args.logit_scale_max,
        )
    model.train(False)
    return model


def build_retrieval_model(args: RetrievalArgs, device="cpu", place_unit=None) -> RetrievalModel:
    """The model: frozen parts materialised in their precision and loaded, the trained parts fp32.
    `place_unit(unit)` is called on each frozen backbone unit once it is loaded (ZeRO-3)."""
    return _build(args, device, place_unit)


def build_retrieval_model_on_meta(args: RetrievalArgs) -> RetrievalModel:
    """Same structure with every tensor on `meta`: parameter counting, planning; no memory."""
    return _build(args, "meta")


# ------------------------------------------------------------------------ reference checkpoints
def retrieval_encoder_from_official(state_dict: Dict[str, torch.Tensor], config: Dict) -> RetrievalVideoEncoder:
    """The reference retrieval video encoder (fixture config keys) as ours: fp32, eval mode."""
    from side4video.model.convert import convert_official_state_dict

    width, layers, heads, patch = (int(config[k]) for k in ("width", "layers", "heads", "patch_size"))
    spec = dataclasses.replace(
        resolve_spec(
            "ViT-B-16",
            int(config["image_size"]),
            quick_gelu=True,
            width=width,
            layers=layers,
            heads=heads,
            patch_size=patch,
        ),
        embed_dim=int(config["output_dim"]),
    )
    backbone = build_backbone(
        spec,
        range(layers),
        storage_dtype=torch.float32,
        compute_dtype=torch.float32,
        keep_final_norm=True,
        keep_proj=True,
    )
    side = SideNetwork(
        width,
        int(config["side_dim"]),
        layers,
        patch,
        spec.num_patches,
        heads=int(config.get("side_heads", 0)),
        variant="clip",
        retrieval=True,
    )
    model = RetrievalVideoEncoder(backbone, side)
    model.load_state_dict(convert_official_state_dict(state_dict), strict=True)
    return model.float().eval()


def official_retrieval_args(config: Dict) -> RetrievalArgs:
    """Our arguments for a reference retrieval model of `config` (the WTI fixture's keys): fp32."""
    from side4video.model.convert import OFFICIAL_NAMES

    width, layers, heads, patch = (
        int(config[k]) for k in ("vision_width", "vision_layers", "vision_heads", "patch_size")
    )
    name = OFFICIAL_NAMES.get((width, layers, patch))
    named = name is not None and heads == width // 64
    text = {
        "width": int(config["text_width"]),
        "layers": int(config["text_layers"]),
        "heads": int(config["text_heads"]),
        "vocab_size": int(config["vocab_size"]),
    }
    fp32 = torch.float32
    interaction = str(config.get("interaction", "wti")).lower()
    return RetrievalArgs(
        precision=Precision(fp32, fp32, fp32, fp32),
        method="side4video",
        backbone=name if named else "ViT-B-16",
        quick_gelu=True,
        arch_overrides={} if named else {"width": width, "layers": layers, "heads": heads, "patch_size": patch},
        image_size=int(config["image_size"]),
        embed_dim=int(config["embed_dim"]),
        side_dim=int(config["side_dim"]),
        side_layers="all",
        side_variant="clip",
        side_heads=int(config.get("side_heads", 0)),
        text_trainable=False,
        text_overrides=text,
        max_words=int(config.get("max_words", config["context_length"])),
        similarity="wti" if interaction == "wti" else "meanp",
    )


def retrieval_from_official(state_dict: Dict[str, torch.Tensor], config: Dict) -> RetrievalModel:
    """The reference text-video retrieval model as ours: fp32, eval mode.

    `config` has the WTI fixture's keys (text_width, text_layers, text_heads, context_length,
    max_words, vocab_size, vision_width, vision_layers, vision_heads, patch_size, image_size,
    side_dim, side_heads, embed_dim, interaction). `forward(input_ids, text_mask, video, video_mask)`
    returns text_features, video_features, text/video_weight_logits, logits_unscaled, logits, loss.
    """
    from side4video.model.convert import convert_official_retrieval_state_dict

    model = build_retrieval_model(official_retrieval_args(config))
    ours = convert_official_retrieval_state_dict(state_dict)
    if "text.positional_embedding" in ours:  # the reference keeps 77 rows and feeds max_words
        ours["text.positional_embedding"] = ours["text.positional_embedding"][: model.text.context_length]
    expected = model.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"reference retrieval state dict does not match the model built from its config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise UserError(
                f"reference tensor for {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(ours, strict=True)
    return model.float().eval()
