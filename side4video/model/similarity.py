"""Text-video similarity of the retrieval model: weighted token interaction (WTI) and mean pooling.

Each side is first reduced, on its own, to an embedding: unit-length token (or frame) features
and their weights. The similarity of any text chunk with any video chunk is then a pure function
of two embeddings, which lets evaluation fill the matrix chunk by chunk and training score the
batch gathered from all ranks.

WTI (tests/fixtures/official/README.md, "Retrieval model"), `a` texts, `b` videos:
    S[a,b,t,v] = text_mask[a,t] * <t_hat[a,t], v_hat[b,v]>    (padded tokens give exactly 0)
    s[a,b] = (sum_t w_text[a,t] max_v S + sum_v w_video[b,v] max_t S) / 2
with softmax token weights over the valid tokens and frame weights over all frames (the
reference ignores the video mask), and the max over text positions including the padded zeros.
meanP: the EOT token's feature against the mean of the frame features, both unit length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

SIMILARITIES = ("wti", "meanp")


class TokenWeights(nn.Sequential):
    """WTI's weight MLP, Linear(E, E) -> ReLU -> Linear(E, 1): one logit per token or frame."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., E) -> (...) logits in fp32, whatever precision the MLP is trained in."""
        return super().forward(features.to(self[0].weight.dtype)).squeeze(-1).float()


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dimension (as the reference; no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class TextEmbedding:
    """Captions reduced for similarity: features (N, L, E) unit, mask (N, L) 0/1, weights (N, L)."""

    features: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "TextEmbedding":
        return TextEmbedding(self.features[index], self.mask[index], self.weights[index])

    def to(self, *args, **kwargs) -> "TextEmbedding":
        return TextEmbedding(
            self.features.to(*args, **kwargs), self.mask.to(*args, **kwargs), self.weights.to(*args, **kwargs)
        )

    @staticmethod
    def cat(parts: Sequence["TextEmbedding"]) -> "TextEmbedding":
        return TextEmbedding(*(torch.cat([getattr(p, f) for p in parts]) for f in ("features", "mask", "weights")))


@dataclass
class VideoEmbedding:
    """Videos reduced for similarity: features (M, T, E) unit, weights (M, T)."""

    features: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "VideoEmbedding":
        return VideoEmbedding(self.features[index], self.weights[index])

    def to(self, *args, **kwargs) -> "VideoEmbedding":
        return VideoEmbedding(self.features.to(*args, **kwargs), self.weights.to(*args, **kwargs))

    @staticmethod
    def cat(parts: Sequence["VideoEmbedding"]) -> "VideoEmbedding":
        return VideoEmbedding(*(torch.cat([getattr(p, f) for p in parts]) for f in ("features", "weights")))


# ----------------------------------------------------------------------------- reducing a side
def text_embedding(
    kind: str, features: torch.Tensor, mask: torch.Tensor, weight_logits: Optional[torch.Tensor] = None
) -> TextEmbedding:
    """Token features (N, L, E) + mask (N, L) (+ WTI weight logits (N, L)) -> TextEmbedding."""
    mask = mask.to(torch.float32)
    features = features.float()
    if kind == "wti":
        weights = torch.softmax(weight_logits.float().masked_fill(mask == 0, float("-inf")), dim=-1)
        return TextEmbedding(unit(features), mask, weights)
    if kind == "meanp":
        eot = mask.sum(dim=1).long() - 1  # the last valid token is EOT
        feature = features[torch.arange(len(features), device=features.device), eot]
        ones = torch.ones(len(features), 1, device=features.device)
        return TextEmbedding(unit(feature).unsqueeze(1), ones, ones)
    raise ValueError(f"unknown similarity {kind!r}; allowed: {', '.join(SIMILARITIES)}")


def video_embedding(kind: str, features: torch.Tensor, weight_logits: Optional[torch.Tensor] = None) -> VideoEmbedding:
    """Frame features (M, T, E) (+ WTI weight logits (M, T)) -> VideoEmbedding."""
    features = features.float()
    if kind == "wti":
        return VideoEmbedding(unit(features), torch.softmax(weight_logits.float(), dim=-1))
    if kind == "meanp":
        ones = torch.ones(len(features), 1, device=features.device)
        return VideoEmbedding(unit(features.mean(dim=1)).unsqueeze(1), ones)
    raise ValueError(f"unknown similarity {kind!r}; allowed: {', '.join(SIMILARITIES)}")


# ---------------------------------------------------------------------------------- similarity
def wti_similarity(text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
    """(N, M): needs an (N, M, L, T) intermediate; chunk the inputs to bound it."""
    s = torch.einsum("atd,bvd->abtv", text.features, video.features) * text.mask[:, None, :, None]
    text_to_video = (s.amax(dim=3) * text.weights[:, None, :]).sum(dim=2)
    video_to_text = (s.amax(dim=2) * video.weights[None, :, :]).sum(dim=2)
    return (text_to_video + video_to_text) / 2


def meanp_similarity(text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
    return text.features[:, 0] @ video.features[:, 0].T


SIMILARITY_FUNCTIONS: Dict[str, Callable[[TextEmbedding, VideoEmbedding], torch.Tensor]] = {
    "wti": wti_similarity,
    "meanp": meanp_similarity,
}


def pair_elements(text: TextEmbedding, video: VideoEmbedding) -> int:
    """Elements of the per-pair intermediate a similarity builds (L * T for WTI, 1 for meanP)."""
    return text.features.shape[1] * video.features.shape[1]
