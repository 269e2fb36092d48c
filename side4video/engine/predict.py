"""`side4video predict EXPORT VIDEO`: the top classes of one video file with an exported model.

The video goes through the evaluation views of the config it was trained with (centre or three
crops x temporal clips, `eval.crops=3 eval.clips=2` on the command line), decoded by DALI or PyAV
as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from side4video.config import Config
from side4video.engine.export import apply_trained_state, export_config, load_trained_state, read_export_meta
from side4video.errors import UserError


def clip_views(cfg: Config, video_path: str | Path, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One video file -> its test views (1, crops*clips, T, 3, S, S) on `device` (decoded there
    by DALI 'mixed' when it is a GPU the video suits)."""
    from side4video.data.decode import ClipDecoder
    from side4video.data.loader import eval_request, eval_views_layout
    from side4video.data.video import VideoError, probe

    path = Path(video_path)
    if not path.is_file():
        raise UserError(f"video not found: {path}")
    data = path.read_bytes()
    try:
        info = probe(data)
    except VideoError as e:
        raise UserError(f"{path}: not a readable video ({e})") from None
    request = eval_request(path.name, data, info, cfg.data, crops=cfg.eval.crops, clips=cfg.eval.clips)
    gpu = device.type == "cuda"
    decoder = ClipDecoder(
        views=cfg.eval.crops,
        size=cfg.data.size,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        batch_size=1,
        threads=cfg.data.decode_threads,
        decoder=cfg.data.decoder,
        gpu=gpu,
        device_id=device.index if gpu else None,
    )
    try:
        tensors, bad = decoder.decode([request])
    finally:
        decoder.close()
    if bad:
        raise UserError(f"{path}: could not decode the video ({bad[0][1]})")
    return eval_views_layout(tensors[0].unsqueeze(0), cfg.eval.clips, cfg.data.frames).to(device, dtype)


@torch.no_grad()
def predict_video(
    export_dir: str, video_path: str, top_k: int = 5, overrides: Sequence[str] = (), captions: Sequence[str] = ()
) -> Dict[str, Any]:
    """Recognition exports: the top-k classes of the video. Retrieval exports: `captions` ranked
    by their similarity to the video (the score evaluation ranks by)."""
    from side4video.distributed import select_device
    from side4video.engine.factory import run_precision
    from side4video.engine.tasks import Compute, PredictRequest, task_for

    if not Path(video_path).is_file():
        raise UserError(f"video not found: {video_path}")
    meta = read_export_meta(export_dir)
    cfg = export_config(export_dir, overrides)
    task = task_for(cfg)
    task.check_predict_inputs(captions)
    # model and clips on one device; the training host's train.device does not bind this one
    requested = cfg.train.device if any(o.startswith("train.device=") for o in overrides) else "auto"
    device = select_device(requested, 0, 1)
    precision = run_precision(cfg, device.type == "cuda")
    model = task.build_model(device, precision)
    apply_trained_state(model, load_trained_state(export_dir, model.backbone.fingerprint()))
    model.eval()
    views = clip_views(cfg, video_path, precision.clips, device)
    request = PredictRequest(top_k=top_k, captions=tuple(captions), class_names=tuple(meta.get("class_names") or ()))
    compute = Compute(model=model, call=model, device=device, clip_dtype=precision.clips)
    return {
        "video": str(video_path),
        "views": cfg.eval.crops * cfg.eval.clips,
        "device": str(device),
        **task.predict(compute, views, request),
    }
