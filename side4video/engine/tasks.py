"""The two tasks (`task: recognition | retrieval`): what differs between them, behind one interface
the runner and the training loop call. Everything else (the loop, DeepSpeed, checkpoints, data,
SLURM) is shared.

- recognition: video -> logits; label-smoothed cross-entropy; top-1/top-5 over multi-view tests.
- retrieval:   (captions, video) pairs; symmetric contrastive loss over the batch gathered from
               all ranks; text<->video R@K over every test caption.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

from side4video.engine.factory import (
    model_from_config,
    model_on_meta,
    retrieval_model_from_config,
    retrieval_model_on_meta,
)
from side4video.precision import Precision


class RecognitionTask:
    name = "recognition"

    def build_model(self, cfg, device, precision: Precision, place_unit=None):
        return model_from_config(cfg, device=device, precision=precision, place_unit=place_unit)

    def model_on_meta(self, cfg, precision: Precision):
        return model_on_meta(cfg, precision)

    def param_groups(self, model, cfg) -> List[Dict[str, Any]]:
        from side4video.engine.deepspeed_engine import param_groups

        return param_groups(model, cfg)

    def loss(self, run, batch: Dict[str, Any]) -> torch.Tensor:
        video = batch["video"].to(run.device, run.dtype, non_blocking=True)
        labels = batch["label"].to(run.device, non_blocking=True)
        logits = run.engine(video)
        return F.cross_entropy(logits.float(), labels, label_smoothing=run.cfg.train.label_smoothing)

    def after_step(self, model) -> None:
        pass

    def evaluate(self, run) -> Dict[str, Any]:
        from side4video.engine.evaluate import evaluate

        return evaluate(run.forward, run.val_loader, run.cfg, run.device, run.dtype, run.class_names)

    def scalars(self, report: Dict[str, Any]) -> Dict[str, float]:
        """The report's figures for metrics.jsonl, TensorBoard and summary.json."""
        return {
            "top1": report["top1"],
            "top5": report["top5"],
            "mean_class_accuracy": report["mean_class_accuracy"],
            "eval_samples": report["samples"],
        }

    def headline(self, report: Dict[str, Any]) -> str:
        return f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%"

    def write_report(self, report: Dict[str, Any], run, tag: str) -> None:
        from side4video.engine.evaluate import write_report

        write_report(report, run.run_dir, run.class_names, tag)


class RetrievalTask:
    name = "retrieval"

    def build_model(self, cfg, device, precision: Precision, place_unit=None):
        return retrieval_model_from_config(cfg, device=device, precision=precision, place_unit=place_unit)

    def model_on_meta(self, cfg, precision: Precision):
        return retrieval_model_on_meta(cfg, precision)

    def param_groups(self, model, cfg) -> List[Dict[str, Any]]:
        """The reference's groups: the CLIP towers (when trained) and the logit scale at
        lr * coef_lr, the side network and WTI weights at lr; no decay on biases and norms."""
        from side4video.model.retrieval import retrieval_param_groups

        return retrieval_param_groups(model, cfg.train.lr, cfg.model.retrieval.coef_lr, cfg.train.weight_decay)

    def _tokens(self, run, captions: Sequence[str]):
        from side4video.data.captions import tokenize

        ids, mask = tokenize(captions, run.cfg.model.text.max_words)
        return ids.to(run.device), mask.to(run.device)

    def loss(self, run, batch: Dict[str, Any]) -> torch.Tensor:
        """The caption drawn for each clip this epoch against its video; the batch gathered from
        every rank inside the model (the loss is the same on every rank)."""
        video = batch["video"].to(run.device, run.dtype, non_blocking=True)
        input_ids, text_mask = self._tokens(run, batch["caption"])
        return run.engine(input_ids, text_mask, video)["loss"]

    def after_step(self, model) -> None:
        model.clamp_logit_scale()  # as the reference: logit_scale <= ln(100) after every step

    def evaluate(self, run) -> Dict[str, Any]:
        from side4video.engine.retrieval import evaluate_retrieval

        cfg, model = run.cfg, run.module
        d = cfg.data
        views = cfg.eval.crops * cfg.eval.clips
        return evaluate_retrieval(
            run.val_loader,
            encode_video=lambda video: model.embed_video(video[:, 0].to(run.device, run.dtype)),
            encode_text=lambda captions: model.embed_text(*self._tokens(run, captions)),
            similarity=model.similarity,
            dummy_video=torch.zeros(1, views, d.frames, 3, d.size, d.size, dtype=run.dtype),
            text_batch_size=cfg.eval.text_batch_size,
            max_elements=cfg.eval.similarity_chunk,
            device=run.device,
            dual_softmax=cfg.eval.dual_softmax,
            max_batches=cfg.eval.max_batches,
        )

    def scalars(self, report: Dict[str, Any]) -> Dict[str, float]:
        from side4video.engine.retrieval import flat_metrics

        return {**flat_metrics(report), "chance_R1": report["chance_R1"]}

    def headline(self, report: Dict[str, Any]) -> str:
        t2v, v2t = report["t2v"], report["v2t"]
        return (
            f"t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f}  "
            f"v2t R@1 {v2t['R1']:.1f} R@5 {v2t['R5']:.1f} R@10 {v2t['R10']:.1f}"
        )

    def write_report(self, report: Dict[str, Any], run, tag: str) -> None:
        from side4video.engine.retrieval import write_retrieval_report

        write_retrieval_report(report, run.run_dir, tag)


def task_for(cfg):
    return RetrievalTask() if cfg.task == "retrieval" else RecognitionTask()
