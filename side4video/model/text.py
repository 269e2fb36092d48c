"""The retrieval model's text tower: open_clip's TextTransformer, with the feature of every token.

open_clip builds it from the named model's text config (or small overrides for tests). The
context is cut to `max_words` tokens, as the reference feeds only 32: the position rows beyond
are never used and are dropped when weights load. `forward(ids)` returns
`ln_final(x) @ text_projection` at every position, (B, L, E), not normalised: WTI uses all the
tokens, meanP the EOT token. The causal mask keeps a token's feature independent of the padding
after it.

Weights come from the same local CLIP checkpoint as the vision tower: the OpenAI/open_clip layout
(top-level `token_embedding`, `transformer.resblocks`, ...), open_clip's custom-text layout
(`text.*`, e.g. EVA02-E-14) or ours (`text.*`, written by convert-official).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

from side4video.errors import UserError
from side4video.model.backbone import materialise, parameters_on_meta, random_init
from side4video.model.spec import open_clip_config
from side4video.model.weights import half_crossing, read_checkpoint, report_conversion, store

MIN_WORDS = 3  # SOT, one word, EOT


@dataclass(frozen=True)
class TextSpec:
    """A text tower resolved from open_clip's model config and the overrides."""

    width: int
    layers: int
    heads: int
    context_length: int  # = max_words: the tokens fed (the tower's position rows)
    vocab_size: int
    embed_dim: int
    quick_gelu: bool
    named_context_length: int  # position rows of the named model's weights (77 for CLIP)


def resolve_text_spec(
    name: str,
    max_words: int,
    embed_dim: int,
    *,
    quick_gelu: bool = False,
    width: int = 0,
    layers: int = 0,
    heads: int = 0,
    vocab_size: int = 0,
) -> TextSpec:
    """The text tower of open_clip model `name` (non-zero arguments override its config)."""
    named = open_clip_config(name)
    text = (named or {}).get("text_cfg")
    if not text:
        raise UserError(f"model.backbone.name {name!r} has no text tower in its open_clip config (retrieval needs one)")
    if text.get("hf_model_name"):
        raise UserError(
            f"model.backbone.name {name!r}: Hugging Face text towers are not supported (open_clip TextTransformer only)"
        )
    if max_words < MIN_WORDS:
        raise UserError(f"config key 'model.text.max_words' is {max_words}: at least {MIN_WORDS} (SOT, a word, EOT)")
    width = int(width or text.get("width", 512))
    heads = int(heads or text.get("heads", max(1, width // 64)))
    if width % heads:
        raise UserError(f"text tower: width {width} is not divisible by heads {heads}")
    return TextSpec(
        width=width,
        layers=int(layers or text.get("layers", 12)),
        heads=heads,
        context_length=int(max_words),
        vocab_size=int(vocab_size or text.get("vocab_size", 49408)),
        embed_dim=int(embed_dim),
        quick_gelu=bool(quick_gelu) or bool(named.get("quick_gelu", False)),
        named_context_length=int(text.get("context_length", 77)),
    )


class TextTower(TextTransformer):
    """open_clip's TextTransformer returning every token's projected feature (B, L, E).

    A subclass (not a wrapper) so that the state-dict keys are open_clip's own, and so that the
    projection is used inside this module's forward: ZeRO-3 gathers a module's own parameters
    only while it is being called.
    """

    def __init__(self, spec: TextSpec):
        super().__init__(
            context_length=spec.context_length,
            vocab_size=spec.vocab_size,
            width=spec.width,
            heads=spec.heads,
            layers=spec.layers,
            output_dim=spec.embed_dim,
            act_layer=QuickGELU if spec.quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
        )
        self.spec = spec

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens given, the text tower takes at most {self.context_length}")
        x = self.token_embedding(input_ids)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        return x @ self.text_projection.to(x.dtype)


# ------------------------------------------------------------------------------------ weights
_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def text_state_dict(sd: Dict[str, torch.Tensor], path: str = "weights file") -> Dict[str, torch.Tensor]:
    """The text tower's tensors of a CLIP checkpoint, keyed as TextTower's."""
    if "text.token_embedding.weight" in sd:  # open_clip custom text (EVA02) and ours
        return {k[len("text.") :]: v for k, v in sd.items() if k.startswith("text.")}
    if "token_embedding.weight" in sd:  # OpenAI / open_clip CLIP: the text tower at the top level
        return {k: v for k, v in sd.items() if k.startswith(_TOP_LEVEL)}
    raise UserError(
        f"{path} holds no CLIP text tower (no 'token_embedding.weight'); retrieval needs the whole CLIP "
        f"checkpoint, not only its vision tower"
    )


@torch.no_grad()
def load_text_weights(tower: TextTower, path: str, convert: bool = False) -> Optional[float]:
    """Copy a local checkpoint's text tower into `tower`; returns its `logit_scale` if it has one.
    A half-precision file into the other half precision: refused unless `convert` (then counted),
    as for the vision tower (model/weights.py)."""
    sd = read_checkpoint(path)
    ours = text_state_dict(sd, path)
    if "positional_embedding" in ours:  # the reference feeds only the first max_words positions
        ours["positional_embedding"] = ours["positional_embedding"][: tower.context_length]
    targets = tower.state_dict(keep_vars=True)
    missing = [k for k in targets if k not in ours]
    if missing:
        raise UserError(f"weights file {path} lacks {len(missing)} tensors of the text tower (e.g. text.{missing[0]})")
    dtype = next((t.dtype for t in targets.values() if t.is_floating_point()), None)
    crossing = half_crossing(path, {ours[k].dtype for k in targets}, dtype, convert, "'s text tower")
    converted = changed = 0
    for key, target in targets.items():
        value = ours[key]
        if value.shape != target.shape:
            raise UserError(
                f"weights file {path}: text.{key} has shape {tuple(value.shape)}, the text tower needs "
                f"{tuple(target.shape)} (check model.backbone.name and model.text.*)"
            )
        n, c = store(target, value)
        converted, changed = converted + n, changed + c
    report_conversion(path, crossing, converted, changed, "'s text tower")
    scale = sd.get("logit_scale", sd.get("logit_scale.value"))  # open_clip's / ours
    return float(scale) if torch.is_tensor(scale) and scale.numel() == 1 else None


def build_text_tower(
    spec: TextSpec,
    *,
    dtype: torch.dtype,
    device="cpu",
    weights: str = "",
    seed: int = 0,
    trainable: bool = False,
    convert_weights: bool = False,
) -> Tuple[TextTower, Optional[float]]:
    """Build on meta, materialise in `dtype` on `device`, load or initialise as open_clip does.

    Returns (tower, logit_scale of the weights file or None).
    """
    if weights and spec.context_length > spec.named_context_length:
        raise UserError(
            f"config key 'model.text.max_words' is {spec.context_length}: the pretrained text tower has "
            f"{spec.named_context_length} positions"
        )
    with parameters_on_meta():
        tower = TextTower(spec)
    materialise(tower, dtype, dtype, device)
    scale = None
    if str(device) != "meta":
        if weights:
            scale = load_text_weights(tower, weights, convert=convert_weights)
        else:
            # Defaults for what open_clip's init leaves to the modules (norms, biases), then its own.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random_init(tower)
                tower.init_parameters()
    tower.requires_grad_(trainable)
    tower.train(False)
    return tower, scale
