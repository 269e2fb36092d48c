"""Reference Side4Video checkpoints (recognition: CLIP and EVA variants) -> our model.

The reference keeps everything under `visual.*` (frozen backbone and side network side by side)
plus the classifier `fc.*`; training checkpoints wrap it in `model_state_dict` (the classifier in
`fusion_model_state_dict`) and DDP adds `module.`. Its pointwise/depthwise Conv3d weights become
our Linear / (C, k) temporal conv weights. The CLIP variant uses OpenAI-CLIP names; the EVA
variant (ViT-E backbone in timm's Eva names, `side_blocks.K`) has its own section below, chosen
by `is_official_eva`.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from side4video.errors import UserError
from side4video.logs import get_logger
from side4video.model.args import BackboneArgs, SideArgs
from side4video.model.build import ModelArgs, VideoModel, build_model
from side4video.precision import Precision

log = get_logger(__name__)


def _squeeze_conv(v: torch.Tensor) -> torch.Tensor:
    """Conv3d weight with unit spatial kernel -> (out, in) or (C, k); a bias stays as it is."""
    return v.reshape(v.shape[0], -1) if v.dim() > 1 else v


_SIDE_BLOCK = r"^visual\.transformer\.side_transformer\.(\d+)\."
# (pattern, replacement, tensor transform) in the order tried; the first match wins.
_RULES: List[Tuple[str, str, Optional[Callable]]] = [
    (r"^visual\.conv1\.weight$", "backbone.stem.patch_weight", None),
    (r"^visual\.class_embedding$", "backbone.stem.class_embedding", None),
    (r"^visual\.positional_embedding$", "backbone.stem.positional_embedding", None),
    (r"^visual\.ln_pre\.(weight|bias)$", r"backbone.stem.norm_\1", None),
    (r"^visual\.transformer\.resblocks\.(\d+)\.", r"backbone.blocks.\1.", None),
    (r"^visual\.ln_post\.", "backbone.final_norm.", None),
    (r"^visual\.proj$", "backbone.proj.weight", None),
    (r"^visual\.side_conv1\.", "side.patch_embed.", None),
    (r"^visual\.side_pre_bn3d\.", "side.patch_norm.", None),
    (r"^visual\.side_post_bn\.", "side.post_norm.", None),
    (r"^visual\.side_proj$", "side_proj.weight", None),
    (r"^visual\.transformer\.side_spatial_position_embeddings$", "side.pos_embed.weight", None),
    (r"^visual\.transformer\.side_lns\.(\d+)\.", r"side.taps.\1.norm.", None),
    (r"^visual\.transformer\.side_linears\.(\d+)\.", r"side.taps.\1.linear.", None),
    (_SIDE_BLOCK + r"(?:bn_1|norm1)\.", r"side.blocks.\1.conv_norm.", None),
    (_SIDE_BLOCK + r"(?:conv\.0|pw_conv1)\.(weight|bias)$", r"side.blocks.\1.conv.pw1.\2", _squeeze_conv),
    (_SIDE_BLOCK + r"(?:conv\.1|dw_conv1)\.(weight|bias)$", r"side.blocks.\1.conv.dw.\2", _squeeze_conv),
    (_SIDE_BLOCK + r"(?:conv\.2|pw_conv2)\.(weight|bias)$", r"side.blocks.\1.conv.pw2.\2", _squeeze_conv),
    (_SIDE_BLOCK + r"(?:bn_2|norm2)\.", r"side.blocks.\1.mlp_norm.", None),
    (_SIDE_BLOCK + r"ln_1\.", r"side.blocks.\1.attn_norm.", None),
    (_SIDE_BLOCK + r"attn\.in_proj_weight$", r"side.blocks.\1.attn.in_proj.weight", None),
    (_SIDE_BLOCK + r"attn\.in_proj_bias$", r"side.blocks.\1.attn.in_proj.bias", None),
    (_SIDE_BLOCK + r"attn\.out_proj\.", r"side.blocks.\1.attn.out_proj.", None),
    (_SIDE_BLOCK + r"mlp\.(fc1|fc2)\.", r"side.blocks.\1.mlp.\2.", None),
    (r"^fc\.", "head.fc.", None),
]
_COMPILED = [(re.compile(p), r, f) for p, r, f in _RULES]


def unwrap_official(obj) -> Dict[str, torch.Tensor]:
    """A reference checkpoint or state dict -> one flat state dict in the reference's names."""
    if not isinstance(obj, dict):
        raise UserError("not a Side4Video checkpoint: expected a dict of tensors")
    sd = dict(obj.get("model_state_dict", obj.get("state_dict", obj)))
    if isinstance(obj.get("fusion_model_state_dict"), dict):  # the reference's classifier, saved apart
        sd.update(obj["fusion_model_state_dict"])
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if "visual.side_conv1.weight" not in sd:
        raise UserError("not a Side4Video checkpoint: no 'visual.side_conv1.weight' (keys as in the reference's model)")
    return sd


def convert_official_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference names -> our names; keys of no use to the visual model (text tower, ...) dropped."""
    if is_official_eva(sd):
        return convert_official_eva_state_dict(sd)
    out, dropped = {}, []
    for key, value in unwrap_official(sd).items():
        for pattern, repl, transform in _COMPILED:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = transform(value) if transform else value
                break
        else:
            dropped.append(key)
    if dropped:
        log.debug("not converted (not part of the visual model): %d keys, e.g. %s", len(dropped), dropped[:3])
    return out


def official_config(sd: Dict[str, torch.Tensor]) -> Dict:
    """The fixture-style config dict (width, layers, heads, ...) read off a reference state dict."""
    sd = unwrap_official(sd)
    if is_official_eva(sd):
        return official_eva_config(sd)
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    side_dim = sd["visual.side_conv1.weight"].shape[0]
    config = {
        "width": width,
        "layers": layers,
        "heads": width // 64,
        "patch_size": patch,
        "image_size": grid * patch,
        "side_dim": side_dim,
        "side_heads": max(1, side_dim // 64),
    }
    if "fc.weight" in sd:
        config["num_classes"] = sd["fc.weight"].shape[0]
    return config


OFFICIAL_NAMES = {(768, 12, 32): "ViT-B-32", (768, 12, 16): "ViT-B-16", (1024, 24, 14): "ViT-L-14"}


def official_backbone_args(width: int, layers: int, heads: int, patch: int, image_size: int) -> BackboneArgs:
    """The reference's CLIP ViT (QuickGELU): its open_clip name when the shape is a standard one,
    else the same shape as overrides of ViT-B-16."""
    name = OFFICIAL_NAMES.get((width, layers, patch))
    named = name is not None and heads == width // 64
    return BackboneArgs(
        name=name if named else "ViT-B-16",
        quick_gelu=True,
        arch_overrides={} if named else {"width": width, "layers": layers, "heads": heads, "patch_size": patch},
        image_size=image_size,
    )


def official_model_args(config: Dict, sd: Optional[Dict[str, torch.Tensor]] = None) -> ModelArgs:
    """Our model arguments for a reference recognition model of `config` (fixture keys): fp32 throughout."""
    if sd is not None and is_official_eva(sd):
        return official_eva_model_args(config, sd)
    width, layers, patch, heads = (int(config[k]) for k in ("width", "layers", "patch_size", "heads"))
    side_layers: object = "all"
    if sd is not None:  # the reference may start its side network after a few layers
        n = len({k.split(".")[3] for k in unwrap_official(sd) if k.startswith("visual.transformer.side_linears.")})
        if n != layers:
            side_layers = tuple(range(layers - n, layers))
    fp32 = torch.float32
    return ModelArgs(
        num_classes=int(config.get("num_classes", 400)),
        precision=Precision(fp32, fp32, fp32, fp32),
        method="side4video",
        backbone=official_backbone_args(width, layers, heads, patch, int(config["image_size"])),
        side=SideArgs(
            dim=int(config["side_dim"]), layers=side_layers, variant="clip", heads=int(config.get("side_heads", 0))
        ),
    )


def from_official(state_dict: Dict[str, torch.Tensor], config: Dict) -> VideoModel:
    """The reference recognition model (CLIP or EVA variant) as our VideoModel: fp32, eval mode.

    `config` has the reference fixture's keys (width, layers, heads, patch_size, image_size,
    num_frames, side_dim, side_heads, num_classes, ...). model(x) on (B, T, 3, H, W) gives logits
    (B, num_classes); model.features(x) the pooled side features (B, side_dim).
    """
    model = build_model(official_model_args(config, state_dict))
    load_converted(model, convert_official_state_dict(state_dict), "reference")
    return model.float().eval()


def load_converted(model: torch.nn.Module, ours: Dict[str, torch.Tensor], what: str) -> None:
    """Load converted reference tensors into `model`: every key and every shape must match
    (a UserError naming `what` otherwise)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{what} state dict does not match the model built from its config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise UserError(
                f"reference tensor for {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(ours, strict=True)


# ------------------------------------------------------------------------ retrieval checkpoints
# The reference's retrieval model (a CLIP4Clip layout): `clip.visual.*` is the video encoder (the
# visual keys above under `clip.`), the CLIP text tower sits at `clip.*`, the temperature at
# `clip.logit_scale`, and WTI's weight MLPs are `text_weight_fc.{0,2}` / `video_weight_fc.{0,2}`.
# Its training checkpoints are the bare state dict (`pytorch_model.bin.N`).
_TEXT_TOWER = r"(token_embedding\.|positional_embedding$|transformer\.|ln_final\.|text_projection$)"
_RETRIEVAL_RULES = [
    (r"^clip\.logit_scale$", "logit_scale.value"),
    (r"^clip\." + _TEXT_TOWER, r"text.\1"),
    (r"^(text|video)_weight_fc\.([02])\.", r"\1_weight_fc.\2."),
]
_RETRIEVAL_COMPILED = [(re.compile(p), r) for p, r in _RETRIEVAL_RULES]


def is_official_retrieval(obj) -> bool:
    """Does this reference checkpoint hold a retrieval model (rather than a recognition one)?"""
    if not isinstance(obj, dict):
        return False
    sd = obj.get("model_state_dict", obj.get("state_dict", obj))
    return isinstance(sd, dict) and any(str(k).startswith(("clip.visual.", "module.clip.visual.")) for k in sd)


def unwrap_official_retrieval(obj) -> Dict[str, torch.Tensor]:
    """A reference retrieval checkpoint or state dict -> one flat state dict in its names."""
    if not isinstance(obj, dict):
        raise UserError("not a Side4Video retrieval checkpoint: expected a dict of tensors")
    sd = dict(obj.get("model_state_dict", obj.get("state_dict", obj)))
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    if "clip.visual.side_conv1.weight" not in sd:
        raise UserError(
            "not a Side4Video retrieval checkpoint: no 'clip.visual.side_conv1.weight' "
            "(keys as in the reference's retrieval model)"
        )
    return sd


def convert_official_retrieval_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference retrieval names -> RetrievalModel's (video encoder by the visual rules above)."""
    sd = unwrap_official_retrieval(sd)
    out = convert_official_state_dict({k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.visual.")})
    dropped = []
    for key, value in sd.items():
        if key.startswith("clip.visual."):
            continue
        for pattern, repl in _RETRIEVAL_COMPILED:
            if pattern.match(key):
                # the temperature is a 1-element tensor here (DeepSpeed cannot broadcast 0-dim ones)
                out[pattern.sub(repl, key)] = value.reshape(1) if key == "clip.logit_scale" else value
                break
        else:
            dropped.append(key)
    if dropped:
        log.debug("not converted (not part of the retrieval model): %d keys, e.g. %s", len(dropped), dropped[:3])
    return out


def official_retrieval_config(sd: Dict[str, torch.Tensor]) -> Dict:
    """The WTI-fixture-style config (vision_*, text_*, side_dim, embed_dim, ...) of a reference
    retrieval state dict. Head counts follow the reference's `width // 64`; `max_words` is the
    reference scripts' 32 (or fewer if the tower has fewer positions)."""
    sd = unwrap_official_retrieval(sd)
    width, _, patch, _ = sd["clip.visual.conv1.weight"].shape
    layers = len({k.split(".")[4] for k in sd if k.startswith("clip.visual.transformer.resblocks.")})
    grid = round((sd["clip.visual.positional_embedding"].shape[0] - 1) ** 0.5)
    side_dim = sd["clip.visual.side_conv1.weight"].shape[0]
    vocab, text_width = sd["clip.token_embedding.weight"].shape
    context = sd["clip.positional_embedding"].shape[0]
    return {
        "vision_width": width,
        "vision_layers": layers,
        "vision_heads": width // 64,
        "patch_size": patch,
        "image_size": grid * patch,
        "side_dim": side_dim,
        "side_heads": max(1, side_dim // 64),
        "embed_dim": sd["clip.text_projection"].shape[1],
        "text_width": text_width,
        "text_layers": len({k.split(".")[3] for k in sd if k.startswith("clip.transformer.resblocks.")}),
        "text_heads": max(1, text_width // 64),
        "vocab_size": vocab,
        "context_length": context,
        "max_words": min(32, context),
        "interaction": "wti" if "text_weight_fc.0.weight" in sd else "meanp",
    }


# ------------------------------------------------------------------------------------------------
# EVA variant (tests/fixtures/official/README.md, "EVA variant"): the frozen EVA02-CLIP-bigE-14
# backbone in timm's Eva names (which our backbone keeps: blocks.N.{norm1, attn.qkv, attn.q_bias,
# attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}), post-norm side blocks `side_blocks.K` after
# blocks 1, 3, 5, ..., their attention with separate q/k/v projections (fused into our in_proj).

_EVA_SIDE_BLOCK = r"^visual\.side_blocks\.(\d+)\."
_EVA_RULES: List[Tuple[str, str, Optional[Callable]]] = [
    (r"^visual\.patch_embed\.proj\.weight$", "backbone.stem.patch_weight", None),
    (r"^visual\.patch_embed\.proj\.bias$", "backbone.stem.patch_bias", None),
    (r"^visual\.cls_token$", "backbone.stem.class_embedding", None),
    (r"^visual\.pos_embed$", "backbone.stem.positional_embedding", None),
    (r"^visual\.blocks\.(\d+)\.", r"backbone.blocks.\1.", None),
    (r"^visual\.side_conv1\.", "side.patch_embed.", None),
    (r"^visual\.side_pre_bn3d\.", "side.patch_norm.", None),
    (r"^visual\.side_spatial_position_embeddings$", "side.pos_embed.weight", None),
    (r"^visual\.side_lns\.(\d+)\.", r"side.taps.\1.norm.", None),
    (r"^visual\.side_linears\.(\d+)\.", r"side.taps.\1.linear.", None),
    (_EVA_SIDE_BLOCK + r"bn_1\.", r"side.blocks.\1.conv_norm.", None),
    (_EVA_SIDE_BLOCK + r"conv\.0\.(weight|bias)$", r"side.blocks.\1.conv.pw1.\2", _squeeze_conv),
    (_EVA_SIDE_BLOCK + r"conv\.1\.(weight|bias)$", r"side.blocks.\1.conv.dw.\2", _squeeze_conv),
    (_EVA_SIDE_BLOCK + r"conv\.2\.(weight|bias)$", r"side.blocks.\1.conv.pw2.\2", _squeeze_conv),
    (_EVA_SIDE_BLOCK + r"bn_2\.", r"side.blocks.\1.mlp_norm.", None),
    (_EVA_SIDE_BLOCK + r"ln_1\.", r"side.blocks.\1.attn_norm.", None),
    (_EVA_SIDE_BLOCK + r"attn\.proj\.", r"side.blocks.\1.attn.out_proj.", None),
    (_EVA_SIDE_BLOCK + r"mlp\.0\.", r"side.blocks.\1.mlp.fc1.", None),
    (_EVA_SIDE_BLOCK + r"mlp\.2\.", r"side.blocks.\1.mlp.fc2.", None),
    (r"^fc\.", "head.fc.", None),
]
_EVA_COMPILED = [(re.compile(p), r, f) for p, r, f in _EVA_RULES]
_EVA_QKV = re.compile(_EVA_SIDE_BLOCK + r"attn\.([qkv])_proj\.(weight|bias)$")
# Unused by the reference's forward (final norm, CLIP head) or not part of our model.
_EVA_UNUSED = re.compile(r"^visual\.(norm|head|rope)\.")

# EVA02-CLIP-bigE-14 (width, layers, patch) -> (open_clip name, heads): its heads are 112 wide,
# so they cannot be read off the width as the reference's other towers (64-wide heads).
_OFFICIAL_EVA_NAMES = {(1792, 64, 14): ("EVA02-E-14", 16)}


def is_official_eva(sd: Dict[str, torch.Tensor]) -> bool:
    """A reference state dict (flat or wrapped) of the EVA recognition model."""
    return "visual.patch_embed.proj.weight" in unwrap_official(sd)


def convert_official_eva_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EVA reference names -> ours; each side block's q/k/v projections -> one in_proj (q, k, v rows)."""
    out, qkv, dropped = {}, {}, []
    for key, value in unwrap_official(sd).items():
        fused = _EVA_QKV.match(key)
        if fused:
            block, which, kind = fused.groups()
            qkv.setdefault((block, kind), {})[which] = value
            continue
        for pattern, repl, transform in _EVA_COMPILED:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = transform(value) if transform else value
                break
        else:
            dropped.append(key)
    for (block, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise UserError(
                f"reference EVA side block {block}: attention {kind} lacks "
                f"{', '.join(sorted(set('qkv') - set(parts)))}_proj"
            )
        out[f"side.blocks.{block}.attn.in_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    unknown = [k for k in dropped if k.startswith("visual.") and not _EVA_UNUSED.match(k)]
    if unknown:  # a backbone or side tensor we would silently ignore: another architecture
        raise UserError(
            f"reference EVA checkpoint: {len(unknown)} tensors have no place in the model "
            f"(e.g. {unknown[0]}); only the post-norm EVA02-CLIP-bigE-14 layout is supported"
        )
    log.debug("EVA: not converted (not part of the visual model): %d keys", len(dropped))
    return out


def official_eva_config(sd: Dict[str, torch.Tensor]) -> Dict:
    """The fixture-style config of a reference EVA recognition state dict."""
    sd = unwrap_official(sd)
    width, _, patch, _ = sd["visual.patch_embed.proj.weight"].shape
    layers = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
    grid = round((sd["visual.pos_embed"].shape[-2] - 1) ** 0.5)
    side_dim = sd["visual.side_conv1.weight"].shape[0]
    heads = _OFFICIAL_EVA_NAMES.get((width, layers, patch), (None, width // 64))[1]
    config = {
        "width": width,
        "layers": layers,
        "heads": heads,
        "patch_size": patch,
        "image_size": grid * patch,
        "side_dim": side_dim,
        "side_heads": max(1, side_dim // 64),
        "mlp_hidden": sd["visual.blocks.0.mlp.fc1.weight"].shape[0],
    }
    if "fc.weight" in sd:
        config["num_classes"] = sd["fc.weight"].shape[0]
    return config


def official_eva_model_args(config: Dict, sd: Dict[str, torch.Tensor]) -> ModelArgs:
    """Our model arguments for the reference EVA recognition model: EVA02-E-14 (timm's post-norm
    Eva, no RoPE, MLP ratio 15360/1792) with the given architecture, side blocks after every other
    block, the 'eva' side variant; fp32 throughout."""
    width, layers, patch, heads = (int(config[k]) for k in ("width", "layers", "patch_size", "heads"))
    named = _OFFICIAL_EVA_NAMES.get((width, layers, patch))
    overrides = (
        {} if named and named[1] == heads else {"width": width, "layers": layers, "heads": heads, "patch_size": patch}
    )
    sd = unwrap_official(sd)
    taps = len({k.split(".")[2] for k in sd if k.startswith("visual.side_linears.")})
    if taps != layers // 2:
        raise UserError(
            f"reference EVA checkpoint has {taps} side taps; the reference taps after every other "
            f"of its {layers} blocks ({layers // 2})"
        )
    fp32 = torch.float32
    return ModelArgs(
        num_classes=int(config.get("num_classes", 400)),
        precision=Precision(fp32, fp32, fp32, fp32),
        method="side4video",
        backbone=BackboneArgs(name="EVA02-E-14", arch_overrides=overrides, image_size=int(config["image_size"])),
        side=SideArgs(
            dim=int(config["side_dim"]), layers="every_other", variant="eva", heads=int(config.get("side_heads", 0))
        ),
    )
