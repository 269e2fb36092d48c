"""Evaluation: multi-view testing, top-1/top-5/per-class accuracy, gathered across ranks; and the
text-video retrieval metrics (`retrieval_metrics`; the rest of retrieval evaluation is in
engine/retrieval.py).

Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively inside
forward): a rank whose share of the split is exhausted keeps feeding a zero clip and discards the
output until all ranks are done. Predictions are gathered by sample key, so nothing is counted twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import torch

from side4video import signals
from side4video.config import Config
from side4video.engine.collectives import all_gather_objects, any_rank
from side4video.logs import get_logger
from side4video.signals import StopRequested

log = get_logger(__name__)


def view_probabilities(forward, video: torch.Tensor) -> torch.Tensor:
    """(B, V, T, 3, H, W) -> (B, C): softmax per view, then the mean over views (docs/model.md)."""
    b, v = video.shape[:2]
    logits = forward(video.flatten(0, 1)).float()
    return logits.softmax(dim=-1).view(b, v, -1).mean(dim=1)


def _dummy_batch(cfg: Config, device, dtype) -> torch.Tensor:
    views = cfg.eval.crops * cfg.eval.clips
    return torch.zeros(1, views, cfg.data.frames, 3, cfg.data.size, cfg.data.size, device=device, dtype=dtype)


@torch.no_grad()
def predict_split(forward, loader, cfg: Config, device, dtype, max_batches: int = 0) -> Dict[str, Any]:
    """Run the split on every rank; return {key: (label, probabilities)} gathered from all ranks.

    A stop request on any rank (signals.py) ends the evaluation on every rank together, with
    StopRequested, at the next batch: a training run then saves and exits."""
    local: Dict[str, tuple] = {}
    batches = iter(loader)
    done = 0
    while True:
        batch = None
        if not (max_batches and done >= max_batches):
            try:
                batch = next(batches, None)
            except StopRequested:
                batch = None
        any_left, stop = any_rank(batch is not None, signals.stop_requested())
        if stop:
            raise StopRequested(f"stop requested ({signals.stop_reason() or 'another rank'}) during evaluation")
        if not any_left:
            break
        video = batch["video"] if batch is not None else _dummy_batch(cfg, device, dtype)
        probs = view_probabilities(forward, video.to(device, dtype, non_blocking=True)).cpu()
        if batch is not None:
            for key, label, p in zip(batch["key"], batch["label"].tolist(), probs):
                local[key] = (int(label), p.numpy().astype(np.float32))
            done += 1
    merged: Dict[str, tuple] = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return merged


def accuracy_report(predictions: Dict[str, tuple], num_classes: int, class_names: Sequence[str] = ()) -> Dict[str, Any]:
    """top-1, top-5, mean per-class accuracy, per-class accuracy and the confusion matrix."""
    if not predictions:
        return {"samples": 0, "top1": 0.0, "top5": 0.0, "mean_class_accuracy": 0.0, "per_class": {}, "confusion": []}
    labels = np.array([label for label, _ in predictions.values()])
    probs = np.stack([p for _, p in predictions.values()])
    ranked = np.argsort(-probs, axis=1)
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, : min(5, probs.shape[1])] == labels[:, None]).any(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, ranked[:, 0]), 1)
    names = list(class_names) if len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    per_class = {}
    for c in range(num_classes):
        n = int(confusion[c].sum())
        if n:
            per_class[names[c]] = float(confusion[c, c] / n)
    return {
        "samples": int(len(labels)),
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "mean_class_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def evaluate(forward, loader, cfg: Config, device, dtype, class_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Predict the whole split across ranks and score it; the same report on every rank."""
    predictions = predict_split(forward, loader, cfg, device, dtype, cfg.eval.max_batches)
    report = accuracy_report(predictions, cfg.data.num_classes, class_names)
    report["views"] = cfg.eval.crops * cfg.eval.clips
    return report


def write_report(report: Dict[str, Any], out_dir: Path, class_names: Sequence[str], tag: str) -> None:
    """eval json (without the big matrix) + a confusion matrix PNG."""
    from side4video.engine.metrics import write_json
    from side4video.engine.plots import plot_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{tag}.json", {k: v for k, v in report.items() if k != "confusion"})
    if report.get("confusion"):
        plot_confusion(
            np.array(report["confusion"]),
            list(class_names),
            out_dir / f"{tag}_confusion.png",
            title=f"{tag}: top-1 {100 * report['top1']:.1f}%",
        )


# ------------------------------------------------------------------------------------ retrieval
# Text-video retrieval metrics, with the reference's rules (tests/fixtures/official/README.md,
# "Retrieval metrics"); ranks are 1-based, R@k in percent.
#  - One caption per video (`video_of_caption` None, a square matrix, text i <-> video i): each row
#    is sorted in descending order and every sorted position equal to the row's correct value is
#    an entry, so a tie adds several entries for one query; statistics run over the entries.
#  - Several captions per video: text->video ranks each caption (the number of videos scoring
#    strictly higher, + 1: the reference's argsort rank whenever the correct video is not tied;
#    its order within ties is unspecified), median = the lower middle (torch.median); captions
#    whose correct score is not finite are left out, as the reference's -inf padding mask does.
#    Video->text scores each video against each caption group by the group's best caption and
#    applies the one-caption rule (ties included).
RETRIEVAL_KS = (1, 5, 10)


def _tied_entries(sim: np.ndarray) -> np.ndarray:
    """0-based sorted positions equal to each row's diagonal value (ties give several)."""
    diff = np.sort(-sim, axis=1) - np.diag(-sim)[:, None]
    return np.nonzero(diff == 0)[1]


def _entry_metrics(entries: np.ndarray) -> Dict[str, float]:
    n = len(entries)
    out = {f"R{k}": float(np.sum(entries < k)) * 100 / n for k in RETRIEVAL_KS}
    out.update(MedianR=float(np.median(entries) + 1), MeanR=float(np.mean(entries) + 1), entries=n)
    return out


def _grouped(sim: torch.Tensor, video_of_caption: torch.Tensor):
    """Rows stable-sorted by video (the reference's layout), their videos, and the group sizes."""
    n_videos = sim.shape[1]
    video_of_caption = torch.as_tensor(video_of_caption, dtype=torch.long).flatten()
    if video_of_caption.numel() != sim.shape[0]:
        raise ValueError(f"video_of_caption has {video_of_caption.numel()} entries for {sim.shape[0]} captions")
    if video_of_caption.numel() and (video_of_caption.min() < 0 or video_of_caption.max() >= n_videos):
        raise ValueError(f"video_of_caption holds videos outside 0..{n_videos - 1}")
    counts = torch.bincount(video_of_caption, minlength=n_videos)
    if (counts == 0).any():
        raise ValueError(f"video {int((counts == 0).nonzero()[0])} has no caption")
    order = torch.sort(video_of_caption, stable=True).indices
    return sim[order], video_of_caption[order], counts


def text_to_video_ranks(sim, video_of_caption) -> torch.Tensor:
    """Several captions per video: each caption's 1-based rank of its video (row order); captions
    whose correct score is not finite get rank 0 (left out of the metrics)."""
    sim = torch.as_tensor(sim)
    video_of_caption = torch.as_tensor(video_of_caption, dtype=torch.long).flatten()
    correct = sim.gather(1, video_of_caption[:, None])
    ranks = (sim > correct).sum(dim=1) + 1
    return torch.where(torch.isfinite(correct[:, 0]), ranks, torch.zeros_like(ranks))


def video_to_text_similarity(sim, video_of_caption) -> torch.Tensor:
    """(videos, caption groups): the best caption of group g against video v, NaN as -inf."""
    sim = torch.as_tensor(sim)
    sim = torch.where(torch.isnan(sim), torch.full_like(sim, float("-inf")), sim)
    video_of_caption = torch.as_tensor(video_of_caption, dtype=torch.long).flatten()
    n_videos = sim.shape[1]
    best = torch.full((n_videos, n_videos), float("-inf"), dtype=sim.dtype)
    best.scatter_reduce_(0, video_of_caption[:, None].expand(-1, n_videos), sim, reduce="amax")
    return best.T  # best[g, v] -> [v, g]


def retrieval_entries(sim, video_of_caption=None) -> Dict[str, np.ndarray]:
    """The 0-based ranks the metrics run over: {'t2v': ..., 'v2t': ...} (recall curves)."""
    sim = torch.as_tensor(sim)
    if video_of_caption is None:
        return {"t2v": _tied_entries(sim.numpy()), "v2t": _tied_entries(sim.T.numpy())}
    sim, video_of_caption, _ = _grouped(sim, video_of_caption)
    ranks = text_to_video_ranks(sim, video_of_caption)
    return {
        "t2v": (ranks[ranks > 0] - 1).numpy(),
        "v2t": _tied_entries(video_to_text_similarity(sim, video_of_caption).numpy()),
    }


def retrieval_metrics(sim, video_of_caption=None) -> Dict[str, Dict[str, float]]:
    """Text->video and video->text R1, R5, R10 (percent), MedianR, MeanR (1-based), as the reference.

    `sim`: (captions, videos), rows are texts. `video_of_caption`: None when caption i describes
    video i (one caption per video, a square matrix), else the video of each row.
    """
    sim = torch.as_tensor(sim).detach().cpu()
    if video_of_caption is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(
                f"one caption per video needs a square matrix, got {tuple(sim.shape)}; pass video_of_caption"
            )
        return {"t2v": _entry_metrics(_tied_entries(sim.numpy())), "v2t": _entry_metrics(_tied_entries(sim.T.numpy()))}
    sim, video_of_caption, _ = _grouped(sim, video_of_caption)
    ranks = text_to_video_ranks(sim, video_of_caption)
    valid = ranks[ranks > 0] - 1  # 0-based, as the reference's argsort ranks
    n = len(valid)
    # R@k as the reference computes it (an integer tensor divided: float32), the median with
    # torch.median (lower middle), mean and population std with numpy.
    t2v = {f"R{k}": float(torch.sum(valid < k) * 100 / n) for k in RETRIEVAL_KS}
    t2v.update(
        MedianR=float(torch.median(valid + 1)),
        MeanR=float(np.mean(valid.numpy() + 1)),
        Std_Rank=float(np.std(valid.numpy() + 1)),
        entries=n,
    )
    v2t = _entry_metrics(_tied_entries(video_to_text_similarity(sim, video_of_caption).numpy()))
    return {"t2v": t2v, "v2t": v2t}
