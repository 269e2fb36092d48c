"""The text-video retrieval model (docs/model.md "Retrieval variant").

Video: frame embeddings (B, T, E) from the frozen backbone and the side network
(model/video_encoder.py); method `linear_probe` is the frozen CLIP baseline with no side network.
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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from side4video.errors import UserError
from side4video.model.args import BackboneArgs, SideArgs
from side4video.model.backbone import build_backbone
from side4video.model.contrastive import (
    CLIP_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    LogitScale,
    gather_text,
    gather_video,
    symmetric_cross_entropy,
    world_size,
)
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
from side4video.model.spec import BackboneSpec, embed_dim
from side4video.model.text import TextTower, build_text_tower, resolve_text_spec
from side4video.model.tower import FrozenBackbone
from side4video.model.trainable import TrainableState, param_groups
from side4video.model.video_encoder import RetrievalVideoEncoder, SideProjection, check_backbone, frame_embeddings
from side4video.precision import Precision

RETRIEVAL_METHODS = ("side4video", "linear_probe")
_FP32 = Precision(torch.float32, torch.float32, torch.float32, torch.float32)  # reference models: fp32 throughout


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
        check_backbone(backbone)
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


TOWER_PREFIXES = ("backbone.", "text.", "logit_scale.")  # the CLIP towers and the logit scale: at lr * coef_lr


def retrieval_param_groups(
    model: RetrievalModel, lr: float, coef_lr: float, weight_decay: float
) -> List[Dict[str, Any]]:
    """Optimizer groups as the reference: the CLIP towers and the logit scale at `lr * coef_lr`
    (`lr_scale` coef_lr), the side network and the WTI weights at `lr`; no weight decay on biases
    and 1-D tensors, position embeddings decayed (model/trainable.py `skips_weight_decay`)."""
    return param_groups(
        model,
        lr,
        weight_decay,
        decay_position_embeddings=True,
        scaled=TOWER_PREFIXES,
        lr_scale=coef_lr,
        decayed_first=False,
    )


# ------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class RetrievalArgs:
    """Everything that decides a retrieval model's modules and weights."""

    precision: Precision
    method: str = "side4video"  # or linear_probe: the frozen CLIP baseline, no side network
    backbone: BackboneArgs = field(default_factory=BackboneArgs)  # its weights file holds both towers
    side: SideArgs = field(default_factory=SideArgs)  # method side4video only
    embed_dim: int = 0  # width of both towers' outputs (0: the model config's)
    text_trainable: bool = True
    text_overrides: Dict[str, int] = field(default_factory=dict)  # width/layers/heads/vocab_size, 0 = named
    max_words: int = 32
    similarity: str = "wti"
    logit_scale_max: float = MAX_LOGIT_SCALE
    seed: int = 0

    def spec(self) -> BackboneSpec:
        spec = self.backbone.spec()
        return dataclasses.replace(spec, embed_dim=int(self.embed_dim)) if self.embed_dim else spec


def _build(args: RetrievalArgs, device, place_unit=None) -> RetrievalModel:
    if args.method not in RETRIEVAL_METHODS:
        raise UserError(
            f"config key 'model.method' is {args.method!r}; retrieval allows "
            f"{', '.join(RETRIEVAL_METHODS)} (linear_probe: the frozen CLIP baseline)"
        )
    spec = args.spec()
    taps = args.side.taps(spec) if args.method == "side4video" else [spec.layers - 1]
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
        weights=args.backbone.weights,
        convert_weights=args.backbone.convert_weights,
        fp32_blocks=args.backbone.fp32_blocks,
        seed=args.seed,
        device=device,
        keep_final_norm=True,
        keep_proj=True,
        tap_dtype=p.storage,
        place_unit=place_unit,
    )
    text_spec = resolve_text_spec(
        args.backbone.name, int(args.max_words), embed_dim(spec), quick_gelu=spec.quick_gelu, **args.text_overrides
    )
    # A frozen text tower computes in the backbone's compute precision; a trained one is fp32
    # (DeepSpeed casts it to its training precision).
    text, scale = build_text_tower(
        text_spec,
        dtype=torch.float32 if args.text_trainable else p.compute,
        device=device,
        weights=args.backbone.weights,
        seed=args.seed + 2,
        trainable=args.text_trainable,
        convert_weights=args.backbone.convert_weights,
    )
    # Trained modules: fp32, deterministic from the seed.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(args.seed + 1)
        side = args.side.network(spec, len(taps), retrieval=True) if args.method == "side4video" else None
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
    arch = {"width": width, "layers": layers, "heads": heads, "patch_size": patch}
    args = RetrievalArgs(
        precision=_FP32,
        backbone=BackboneArgs(
            name="ViT-B-16", image_size=int(config["image_size"]), quick_gelu=True, arch_overrides=arch
        ),
        side=SideArgs(
            dim=int(config["side_dim"]), layers="all", variant="clip", heads=int(config.get("side_heads", 0))
        ),
        embed_dim=int(config["output_dim"]),
    )
    spec = args.spec()
    fp32 = torch.float32
    backbone = build_backbone(
        spec, range(layers), storage_dtype=fp32, compute_dtype=fp32, keep_final_norm=True, keep_proj=True
    )
    model = RetrievalVideoEncoder(backbone, args.side.network(spec, layers, retrieval=True))
    model.load_state_dict(convert_official_state_dict(state_dict), strict=True)
    return model.float().eval()


def official_retrieval_args(config: Dict) -> RetrievalArgs:
    """Our arguments for a reference retrieval model of `config` (the WTI fixture's keys): fp32."""
    from side4video.model.convert import official_backbone_args

    width, layers, heads, patch = (
        int(config[k]) for k in ("vision_width", "vision_layers", "vision_heads", "patch_size")
    )
    text = {
        "width": int(config["text_width"]),
        "layers": int(config["text_layers"]),
        "heads": int(config["text_heads"]),
        "vocab_size": int(config["vocab_size"]),
    }
    interaction = str(config.get("interaction", "wti")).lower()
    return RetrievalArgs(
        precision=_FP32,
        method="side4video",
        backbone=official_backbone_args(width, layers, heads, patch, int(config["image_size"])),
        side=SideArgs(
            dim=int(config["side_dim"]), layers="all", variant="clip", heads=int(config.get("side_heads", 0))
        ),
        embed_dim=int(config["embed_dim"]),
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
    from side4video.model.convert import convert_official_retrieval_state_dict, load_converted

    model = build_retrieval_model(official_retrieval_args(config))
    ours = convert_official_retrieval_state_dict(state_dict)
    if "text.positional_embedding" in ours:  # the reference keeps 77 rows and feeds max_words
        ours["text.positional_embedding"] = ours["text.positional_embedding"][: model.text.context_length]
    load_converted(model, ours, "reference retrieval")
    return model.float().eval()
