"""PNG plots of a run: loss/accuracy curves, the confusion matrix, retrieval recall@K curves."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from side4video.engine.metrics import read_metrics
from side4video.logs import get_logger

_MISSING_SAID = False


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (files only): every plot of the project; None
    where matplotlib is not installed (the portable GPU kit leaves it out), said once in one line."""
    global _MISSING_SAID
    try:
        import matplotlib
    except ImportError:
        if not _MISSING_SAID:
            get_logger(__name__).warning("matplotlib is not installed: no plots are drawn (pip install matplotlib)")
            _MISSING_SAID = True
        return None

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dir: Path) -> Optional[Path]:
    """loss and lr per step, top-1/top-5 per evaluation -> curves.png."""
    train = [r for r in read_metrics(run_dir, "train") if "loss" in r]
    evals = [r for r in read_metrics(run_dir, "eval") if "top1" in r]
    if not train and not evals:
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss")
        lr_axis = axes[0].twinx()
        lr_axis.plot(steps, [r.get("lr", np.nan) for r in train], color="tab:gray", alpha=0.5, label="lr")
        lr_axis.set_ylabel("lr")
    if evals:
        steps = [r["step"] for r in evals]
        axes[1].plot(steps, [100 * r["top1"] for r in evals], marker="o", label="top-1")
        axes[1].plot(steps, [100 * r.get("top5", np.nan) for r in evals], marker="s", label="top-5")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], out: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class); labelled when classes are few."""
    plt = pyplot()
    if plt is None:
        return None
    n = confusion.shape[0]
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
    size = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        names: List[str] = [str(c) for c in class_names] if len(class_names) == n else [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_recall_curves(report: dict, out: Path, title: str = "") -> Path:
    """Retrieval recall@K curves, text->video and video->text (+ dual-softmax, dashed), K log-scaled."""
    plt = pyplot()
    if plt is None:
        return None
    curves = report["recall_at_k"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for direction, label in (("t2v", "text -> video"), ("v2t", "video -> text")):
        ax.plot(curves["k"], curves[direction], marker=".", label=label)
    for direction, label in (("t2v", "text -> video"), ("v2t", "video -> text")):
        dsl = report.get("dual_softmax", {}).get(direction)
        if dsl:  # only R@1/5/10 are computed after re-ranking
            ax.plot(
                [1, 5, 10],
                [dsl["R1"], dsl["R5"], dsl["R10"]],
                linestyle="--",
                marker="x",
                label=f"{label}, dual softmax",
            )
    chance = [100.0 * k / report["videos"] for k in curves["k"]]
    ax.plot(curves["k"], chance, color="tab:gray", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title or "retrieval recall@K")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
