"""Retrieval evaluation: every caption and video of a split encoded once, the similarity matrix in
bounded chunks, text->video and video->text metrics (engine/evaluate.py `retrieval_metrics`),
optional dual-softmax re-ranking reported apart, and the report files (JSON + recall@K PNG).

ZeRO-3 safety, as recognition's `predict_split`: every rank makes the same sequence of forward
calls (one video batch and the same number of caption batches per step, agreed by one
all-reduce; a rank whose share is exhausted encodes a dummy clip and an empty caption and drops
the result), and the embeddings are gathered by sample key, so nothing counts twice.

The model is reached only through plain callables: `encode_video(video) -> VideoEmbedding`,
`encode_text(list of captions) -> TextEmbedding` and `similarity(TextEmbedding, VideoEmbedding)
-> (texts, videos)` (RetrievalModel.embed_video / embed_text after tokenisation / similarity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from side4video.engine.collectives import all_gather_objects, is_distributed, max_over_ranks
from side4video.engine.evaluate import retrieval_entries, retrieval_metrics
from side4video.logs import get_logger
from side4video.model.similarity import TextEmbedding, VideoEmbedding, pair_elements

log = get_logger(__name__)

EncodeVideo = Callable[[torch.Tensor], VideoEmbedding]
EncodeText = Callable[[List[str]], TextEmbedding]
Similarity = Callable[[TextEmbedding, VideoEmbedding], torch.Tensor]
DEFAULT_MAX_ELEMENTS = 1 << 26  # 64 Mi elements: 256 MB per fp32 intermediate
RECALL_CURVE_MAX_K = 50
DUAL_SOFTMAX_TEMPERATURE = 0.01  # CLIP's logit scale of 100


@dataclass
class EncodedSplit:
    """A split's embeddings in a fixed order: videos by key, captions grouped by video in that
    order (each video's captions in their annotation order)."""

    keys: List[str]
    videos: VideoEmbedding
    captions: List[str]
    texts: TextEmbedding
    video_of_caption: torch.Tensor  # (captions,) index into keys

    @property
    def one_caption_per_video(self) -> bool:
        return len(self.captions) == len(self.keys) and bool(
            torch.equal(self.video_of_caption, torch.arange(len(self.keys)))
        )


# ----------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_split(
    loader: Iterable[Dict[str, Any]],
    encode_video: EncodeVideo,
    encode_text: EncodeText,
    *,
    dummy_video: torch.Tensor,
    text_batch_size: int = 64,
    max_batches: int = 0,
    store_dtype: torch.dtype = torch.float32,
) -> EncodedSplit:
    """Encode the split on every rank (batches with `video`, `key`, `captions`); the same
    EncodedSplit, gathered from all ranks, on every rank."""
    if text_batch_size < 1:
        raise ValueError("text_batch_size must be at least 1")
    videos: Dict[str, VideoEmbedding] = {}
    captions: Dict[str, List[str]] = {}
    texts: Dict[str, List[TextEmbedding]] = {}
    batches = iter(loader)
    done = 0
    while True:
        batch = None if (max_batches and done >= max_batches) else next(batches, None)
        pairs: List[Tuple[str, str]] = []
        if batch is not None:
            pairs = [(key, str(c)) for key, caps in zip(batch["key"], batch["captions"]) for c in _as_list(caps)]
        any_left, text_steps = max_over_ranks(batch is not None, math.ceil(len(pairs) / text_batch_size))
        if not any_left:
            break
        encoded = encode_video(batch["video"] if batch is not None else dummy_video)
        if batch is not None:
            for i, key in enumerate(batch["key"]):
                videos[key] = encoded[i : i + 1].to("cpu", store_dtype)
                captions.setdefault(key, [])
                texts.setdefault(key, [])
        for step in range(text_steps):
            part = pairs[step * text_batch_size : (step + 1) * text_batch_size]
            encoded_text = encode_text([c for _, c in part] or [""])  # "" only keeps the calls in step
            for i, (key, caption) in enumerate(part):
                captions[key].append(caption)
                texts[key].append(encoded_text[i : i + 1].to("cpu", store_dtype))
        if batch is not None:
            done += 1
    merged_videos: Dict[str, VideoEmbedding] = {}
    merged: Dict[str, Tuple[List[str], List[TextEmbedding]]] = {}
    for part_videos, part_texts in all_gather_objects((videos, {k: (captions[k], texts[k]) for k in videos})):
        merged_videos.update(part_videos)
        merged.update(part_texts)
    return _ordered(merged_videos, merged)


def _as_list(captions) -> List[str]:
    return [captions] if isinstance(captions, str) else list(captions or [])


def _ordered(
    videos: Dict[str, VideoEmbedding], texts: Dict[str, Tuple[List[str], List[TextEmbedding]]]
) -> EncodedSplit:
    keys = sorted(videos)
    flat_captions: List[str] = []
    flat_texts: List[TextEmbedding] = []
    video_of_caption: List[int] = []
    for index, key in enumerate(keys):
        caps, embs = texts.get(key, ([], []))
        flat_captions.extend(caps)
        flat_texts.extend(embs)
        video_of_caption.extend([index] * len(caps))
    if not keys:
        raise ValueError("the evaluation split is empty")
    if not flat_texts:
        raise ValueError("the evaluation split has no captions")
    return EncodedSplit(
        keys,
        VideoEmbedding.cat([videos[k] for k in keys]),
        flat_captions,
        TextEmbedding.cat(flat_texts),
        torch.tensor(video_of_caption, dtype=torch.long),
    )


# --------------------------------------------------------------------------------- similarity
def chunk_sizes(texts: int, videos: int, per_pair: int, max_elements: int) -> Tuple[int, int]:
    """(text rows, video columns) per block so that rows * columns * per_pair <= max_elements
    (a block of one pair may exceed it: that is the least any similarity needs)."""
    columns = max(1, min(videos, max_elements // max(1, per_pair)))
    rows = max(1, min(texts, max_elements // max(1, per_pair * columns)))
    return rows, columns


@torch.no_grad()
def similarity_matrix(
    texts: TextEmbedding,
    videos: VideoEmbedding,
    similarity: Similarity,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    device="cpu",
    distributed: bool = True,
) -> torch.Tensor:
    """(texts, videos) fp32 on the CPU, computed block by block on `device`.

    Each block needs rows x columns x per-pair elements (L x T for WTI) at once, never the whole
    (texts, videos, L, T) interaction. With several ranks each computes a contiguous share of the
    text rows and the shares are gathered.
    """
    n_texts, n_videos = len(texts), len(videos)
    start, stop = 0, n_texts
    if distributed and is_distributed():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        share = math.ceil(n_texts / world)
        start, stop = min(n_texts, rank * share), min(n_texts, (rank + 1) * share)
    rows, columns = chunk_sizes(n_texts, n_videos, pair_elements(texts[:1], videos[:1]), max_elements)
    out = torch.empty(stop - start, n_videos, dtype=torch.float32)
    for r in range(start, stop, rows):
        text_block = texts[r : min(stop, r + rows)].to(device, torch.float32)
        for c in range(0, n_videos, columns):
            video_block = videos[c : c + columns].to(device, torch.float32)
            out[r - start : r - start + len(text_block), c : c + len(video_block)] = (
                similarity(text_block, video_block).float().cpu()
            )
    if distributed and is_distributed():
        out = torch.cat(all_gather_objects(out), dim=0)
    return out


def dual_softmax(sim: torch.Tensor, temperature: float = DUAL_SOFTMAX_TEMPERATURE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dual-softmax re-ranking at inference (CAMoE, Cheng et al. 2021): every score weighted by how
    much the other side prefers it. Returns (for text->video, for video->text) matrices, both
    (texts, videos): sim * softmax over texts, sim * softmax over videos, of sim / temperature."""
    sim = sim.float()
    return sim * torch.softmax(sim / temperature, dim=0), sim * torch.softmax(sim / temperature, dim=1)


# ------------------------------------------------------------------------------------ reports
def retrieval_report(
    sim: torch.Tensor, video_of_caption: Optional[torch.Tensor] = None, dual_softmax_temperature: Optional[float] = None
) -> Dict[str, Any]:
    """Metrics both ways, recall@K curves, chance level; dual-softmax results under their own key."""
    n_texts, n_videos = sim.shape
    report: Dict[str, Any] = {
        "videos": int(n_videos),
        "captions": int(n_texts),
        "chance_R1": 100.0 / n_videos,
        **retrieval_metrics(sim, video_of_caption),
    }
    entries = retrieval_entries(sim, video_of_caption)
    ks = list(range(1, min(RECALL_CURVE_MAX_K, n_videos) + 1))
    report["recall_at_k"] = {"k": ks, **{d: [float(100.0 * np.mean(entries[d] < k)) for k in ks] for d in entries}}
    if dual_softmax_temperature:
        t2v_sim, v2t_sim = dual_softmax(sim, dual_softmax_temperature)
        report["dual_softmax"] = {
            "temperature": float(dual_softmax_temperature),
            "t2v": retrieval_metrics(t2v_sim, video_of_caption)["t2v"],
            "v2t": retrieval_metrics(v2t_sim, video_of_caption)["v2t"],
        }
    return report


def evaluate_retrieval(
    loader: Iterable[Dict[str, Any]],
    encode_video: EncodeVideo,
    encode_text: EncodeText,
    similarity: Similarity,
    *,
    dummy_video: torch.Tensor,
    text_batch_size: int = 64,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    device="cpu",
    dual_softmax: bool = False,
    max_batches: int = 0,
) -> Dict[str, Any]:
    """Encode the split across ranks, score it; the same report on every rank."""
    split = encode_split(
        loader,
        encode_video,
        encode_text,
        dummy_video=dummy_video,
        text_batch_size=text_batch_size,
        max_batches=max_batches,
    )
    sim = similarity_matrix(split.texts, split.videos, similarity, max_elements=max_elements, device=device)
    video_of_caption = None if split.one_caption_per_video else split.video_of_caption
    return retrieval_report(sim, video_of_caption, DUAL_SOFTMAX_TEMPERATURE if dual_softmax else None)


def flat_metrics(report: Dict[str, Any]) -> Dict[str, float]:
    """Scalars for TensorBoard and summaries: t2v_R1, ..., v2t_MeanR (+ dsl_t2v_R1, ...)."""
    out = {}
    for prefix, part in (("", report), ("dsl_", report.get("dual_softmax", {}))):
        for direction in ("t2v", "v2t"):
            for key, value in part.get(direction, {}).items():
                if key != "entries":
                    out[f"{prefix}{direction}_{key}"] = float(value)
    return out


def write_retrieval_report(report: Dict[str, Any], out_dir: Path, tag: str) -> None:
    """{tag}.json (the report) + {tag}_recall.png (recall@K curves)."""
    from side4video.engine.metrics import write_json
    from side4video.engine.plots import plot_recall_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{tag}.json", report)
    plot_recall_curves(
        report,
        out_dir / f"{tag}_recall.png",
        title=f"{tag}: t2v R@1 {report['t2v']['R1']:.1f}%, v2t R@1 {report['v2t']['R1']:.1f}%",
    )
