"""The two tasks (`task: recognition | retrieval`): everything that differs between them, behind
one interface; the only module that branches on the task. The loop, DeepSpeed, checkpoints, data
and SLURM are shared.

- recognition: video -> logits; label-smoothed cross-entropy; top-1/top-5 over multi-view tests;
  predict ranks the classes.
- retrieval:   (captions, video) pairs; symmetric contrastive loss over the batch gathered from
               all ranks; text<->video R@K over every test caption; predict ranks captions.

A task is built from the config (`task_for`) and receives what it works on: a `Compute` (the
model, how to call its forward, where clips go), batches, loaders, reports. It never sees the
Runner, so the Runner depends on the task and not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Protocol, Sequence

import torch
import torch.nn.functional as F

from side4video.config import Config
from side4video.engine.factory import (
    model_from_config,
    model_on_meta,
    retrieval_model_from_config,
    retrieval_model_on_meta,
)
from side4video.errors import UserError
from side4video.precision import Precision


@dataclass(frozen=True)
class Compute:
    """The model as a task uses it. `call` runs a forward pass: the DeepSpeed engine when there is
    one (its hooks gather ZeRO-3 partitions), else the module itself; `model` is the module (for
    methods such as `embed_video`); clips go to `device` in `clip_dtype`."""

    model: torch.nn.Module
    call: Callable[..., Any]
    device: torch.device
    clip_dtype: torch.dtype

    def clips(self, video: torch.Tensor) -> torch.Tensor:
        return video.to(self.device, self.clip_dtype, non_blocking=True)


class Task(Protocol):
    name: str
    labelled: bool  # samples carry a class label the loader checks against data.num_classes
    plans_activations: bool  # `side4video plan` counts a training step's activations per rank

    def build_model(self, device: torch.device, precision: Precision, place_unit=None) -> torch.nn.Module: ...
    def model_on_meta(self, precision: Precision) -> torch.nn.Module: ...
    def param_groups(self, model: torch.nn.Module) -> List[Dict[str, Any]]: ...
    def loss(self, compute: Compute, batch: Dict[str, Any]) -> torch.Tensor: ...
    def after_step(self, model: torch.nn.Module) -> None: ...
    def evaluate(self, compute: Compute, loader, class_names: Sequence[str]) -> Dict[str, Any]: ...
    def scalars(self, report: Dict[str, Any]) -> Dict[str, Any]: ...
    def summary(self, report: Dict[str, Any]) -> Dict[str, Any]: ...
    def headline(self, report: Dict[str, Any]) -> str: ...
    def write_report(self, report: Dict[str, Any], out_dir: Path, class_names: Sequence[str], tag: str) -> None: ...
    def check_predict_inputs(self, captions: Sequence[str]) -> None: ...
    def predict(self, compute: Compute, views: torch.Tensor, request: "PredictRequest") -> Dict[str, Any]: ...
    def frozen_weights(self, model: torch.nn.Module) -> Dict[str, int]: ...


@dataclass(frozen=True)
class PredictRequest:
    """What `side4video predict` asks of one video: the top_k classes (recognition) or the
    captions to rank (retrieval); class names from the export."""

    top_k: int = 5
    captions: Sequence[str] = ()
    class_names: Sequence[str] = ()


class RecognitionTask:
    name = "recognition"
    labelled = True
    plans_activations = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self, device: torch.device, precision: Precision, place_unit=None) -> torch.nn.Module:
        return model_from_config(self.cfg, device=device, precision=precision, place_unit=place_unit)

    def model_on_meta(self, precision: Precision) -> torch.nn.Module:
        return model_on_meta(self.cfg, precision)

    def param_groups(self, model: torch.nn.Module) -> List[Dict[str, Any]]:
        from side4video.engine.deepspeed_engine import param_groups

        return param_groups(model, self.cfg)  # each with its lr_scale (model/trainable.py)

    def loss(self, compute: Compute, batch: Dict[str, Any]) -> torch.Tensor:
        labels = batch["label"].to(compute.device, non_blocking=True)
        logits = compute.call(compute.clips(batch["video"]))
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    def evaluate(self, compute: Compute, loader, class_names: Sequence[str]) -> Dict[str, Any]:
        from side4video.engine.evaluate import evaluate

        return evaluate(compute.call, loader, self.cfg, compute.device, compute.clip_dtype, class_names)

    def scalars(self, report: Dict[str, Any]) -> Dict[str, Any]:
        """The report's figures for metrics.jsonl and TensorBoard."""
        return {
            "top1": report["top1"],
            "top5": report["top5"],
            "mean_class_accuracy": report["mean_class_accuracy"],
            "eval_samples": report["samples"],
        }

    def summary(self, report: Dict[str, Any]) -> Dict[str, Any]:
        """What summary.json holds of the final evaluation."""
        return self.scalars(report)

    def headline(self, report: Dict[str, Any]) -> str:
        return f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%"

    def write_report(self, report: Dict[str, Any], out_dir: Path, class_names: Sequence[str], tag: str) -> None:
        from side4video.engine.evaluate import write_report

        write_report(report, out_dir, class_names, tag)

    def check_predict_inputs(self, captions: Sequence[str]) -> None:
        if captions:
            raise UserError("--caption is for retrieval exports; this one classifies (its classes are ranked)")

    def predict(self, compute: Compute, views: torch.Tensor, request: PredictRequest) -> Dict[str, Any]:
        from side4video.engine.evaluate import view_probabilities

        probs = view_probabilities(compute.call, views)[0].cpu()
        names = list(request.class_names) or [str(i) for i in range(probs.numel())]
        top = probs.topk(min(request.top_k, probs.numel()))
        return {
            "top": [
                {"class": names[i], "index": int(i), "probability": float(p)} for p, i in zip(top.values, top.indices)
            ]
        }

    def frozen_weights(self, model: torch.nn.Module) -> Dict[str, int]:
        return {}


class RetrievalTask:
    name = "retrieval"
    labelled = False
    plans_activations = False  # the plan counts its weights; a retrieval step's activations are not modelled

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self, device: torch.device, precision: Precision, place_unit=None) -> torch.nn.Module:
        return retrieval_model_from_config(self.cfg, device=device, precision=precision, place_unit=place_unit)

    def model_on_meta(self, precision: Precision) -> torch.nn.Module:
        return retrieval_model_on_meta(self.cfg, precision)

    def param_groups(self, model: torch.nn.Module) -> List[Dict[str, Any]]:
        """The reference's groups: the CLIP towers (when trained) and the logit scale at
        lr * coef_lr, the side network and WTI weights at lr; no decay on biases and norms."""
        from side4video.model.retrieval import retrieval_param_groups

        train = self.cfg.train
        return retrieval_param_groups(model, train.lr, self.cfg.model.retrieval.coef_lr, train.weight_decay)

    def _tokens(self, captions: Sequence[str], device: torch.device):
        from side4video.data.captions import tokenize

        ids, mask = tokenize(list(captions), self.cfg.model.text.max_words)
        return ids.to(device), mask.to(device)

    def loss(self, compute: Compute, batch: Dict[str, Any]) -> torch.Tensor:
        """The caption drawn for each clip this epoch against its video; the batch gathered from
        every rank inside the model (the loss is the same on every rank)."""
        input_ids, text_mask = self._tokens(batch["caption"], compute.device)
        return compute.call(input_ids, text_mask, compute.clips(batch["video"]))["loss"]

    def after_step(self, model: torch.nn.Module) -> None:
        model.clamp_logit_scale()  # as the reference: logit_scale <= ln(100) after every step

    def evaluate(self, compute: Compute, loader, class_names: Sequence[str]) -> Dict[str, Any]:
        from side4video.engine.retrieval import evaluate_retrieval

        cfg, model = self.cfg, compute.model
        d = cfg.data
        views = cfg.eval.crops * cfg.eval.clips
        return evaluate_retrieval(
            loader,
            encode_video=lambda video: model.embed_video(compute.clips(video[:, 0])),
            encode_text=lambda captions: model.embed_text(*self._tokens(captions, compute.device)),
            similarity=model.similarity,
            dummy_video=torch.zeros(1, views, d.frames, 3, d.size, d.size, dtype=compute.clip_dtype),
            text_batch_size=cfg.eval.text_batch_size,
            max_elements=cfg.eval.similarity_chunk,
            device=compute.device,
            dual_softmax=cfg.eval.dual_softmax,
            max_batches=cfg.eval.max_batches,
        )

    def scalars(self, report: Dict[str, Any]) -> Dict[str, Any]:
        from side4video.engine.retrieval import flat_metrics

        return {**flat_metrics(report), "chance_R1": report["chance_R1"]}

    def summary(self, report: Dict[str, Any]) -> Dict[str, Any]:
        """The scalars and the recall dicts too, as the demo and README read them."""
        return {**self.scalars(report), "t2v": report["t2v"], "v2t": report["v2t"]}

    def headline(self, report: Dict[str, Any]) -> str:
        t2v, v2t = report["t2v"], report["v2t"]
        return (
            f"t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f}  "
            f"v2t R@1 {v2t['R1']:.1f} R@5 {v2t['R5']:.1f} R@10 {v2t['R10']:.1f}"
        )

    def write_report(self, report: Dict[str, Any], out_dir: Path, class_names: Sequence[str], tag: str) -> None:
        from side4video.engine.retrieval import write_retrieval_report

        write_retrieval_report(report, out_dir, tag)

    def check_predict_inputs(self, captions: Sequence[str]) -> None:
        if not captions:
            raise UserError(
                "this export is a retrieval model: give the captions to rank with --caption TEXT (repeatable)"
            )

    def predict(self, compute: Compute, views: torch.Tensor, request: PredictRequest) -> Dict[str, Any]:
        """The captions ranked by their similarity to the video (the score evaluation ranks by)."""
        model = compute.model
        text = model.embed_text(*self._tokens(request.captions, compute.device))
        scores = model.similarity(text, model.embed_video(views[:, 0]))[:, 0].float().cpu()
        order = scores.argsort(descending=True).tolist()
        return {"captions": [{"caption": request.captions[i], "similarity": float(scores[i])} for i in order]}

    def frozen_weights(self, model: torch.nn.Module) -> Dict[str, int]:
        """A frozen text tower is stored like the backbone (a trained one is trainable)."""
        text = list(model.text.parameters())
        frozen = 0 if text[0].requires_grad else sum(p.numel() for p in text)
        return {"frozen_text_weights_bytes": frozen * text[0].element_size()}


def task_for(cfg: Config) -> Task:
    tasks: Dict[str, Callable[[Config], Task]] = {"recognition": RecognitionTask, "retrieval": RetrievalTask}
    return tasks[cfg.task](cfg)
