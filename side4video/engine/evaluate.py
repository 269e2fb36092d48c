"""Evaluation: multi-view testing, top-1/top-5/per-class accuracy, gathered across ranks.

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
from side4video.engine.collectives import all_gather_objects, any_rank
from side4video.signals import StopRequested
from side4video.logs import get_logger

log = get_logger(__name__)


def view_probabilities(forward, video: torch.Tensor) -> torch.Tensor:
    """(B, V, T, 3, H, W) -> (B, C): softmax per view, then the mean over views (docs/model.md)."""
    b, v = video.shape[:2]
    logits = forward(video.flatten(0, 1)).float()
    return logits.softmax(dim=-1).view(b, v, -1).mean(dim=1)


def _dummy_batch(cfg, device, dtype) -> torch.Tensor:
    views = cfg.eval.crops * cfg.eval.clips
    return torch.zeros(1, views, cfg.data.frames, 3, cfg.data.size, cfg.data.size, device=device, dtype=dtype)


@torch.no_grad()
def predict_split(forward, loader, cfg, device, dtype, max_batches: int = 0) -> Dict[str, Any]:
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


def evaluate(forward, loader, cfg, device, dtype, class_names: Sequence[str] = ()) -> Dict[str, Any]:
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
        plot_confusion(np.array(report["confusion"]), list(class_names), out_dir / f"{tag}_confusion.png",
                       title=f"{tag}: top-1 {100 * report['top1']:.1f}%")
