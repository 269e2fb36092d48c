"""`side4video convert-official IN OUT`: a reference Side4Video checkpoint -> our weights file."""

from __future__ import annotations

import os

from side4video.errors import UserError, first_line
from side4video.logs import get_logger

log = get_logger(__name__)

FORMAT = "side4video-model"


def cmd_convert_official(args) -> int:
    out = convert_official_file(args.input, args.output, num_frames=args.frames)
    print(f"wrote {out}")
    return 0


def convert_official_file(input: str, output: str, num_frames: int = 8) -> str:
    """Read a reference checkpoint, build our model from it, save {config overrides, state_dict}.

    Recognition and retrieval checkpoints are told apart by their keys (`clip.visual.*`: retrieval).
    The saved file also serves as `model.backbone.weights` (its `backbone.*` tensors, and for
    retrieval its `text.*` tower and logit scale).
    """
    import torch

    from side4video.engine.factory import config_overrides
    from side4video.model.convert import (
        from_official,
        is_official_retrieval,
        official_config,
        official_model_args,
        unwrap_official,
    )

    if not os.path.isfile(input):
        raise UserError(f"convert-official: file not found: {input}")
    try:
        obj = torch.load(input, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"convert-official: cannot read {input}: {first_line(e)}") from None
    if is_official_retrieval(obj):
        task, model, config, overrides = _retrieval(obj, num_frames)
    else:
        sd = unwrap_official(obj)
        config = dict(official_config(sd), num_frames=int(num_frames))
        model = from_official(sd, config)
        task, overrides = "recognition", config_overrides(official_model_args(config, sd))
    overrides = overrides + [f"data.frames={int(num_frames)}"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    torch.save(
        {
            "format": FORMAT,
            "version": 1,
            "task": task,
            "source": os.path.abspath(input),
            "overrides": overrides,
            "config": config,
            "state_dict": model.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, output)
    log.info("converted %s (%s): %d tensors -> %s", input, task, len(model.state_dict()), output)
    return output


def _retrieval(obj, num_frames: int):
    """A reference retrieval checkpoint (`clip.*`, `text_weight_fc.*`, `video_weight_fc.*`):
    our RetrievalModel, its config and the overrides that rebuild it."""
    from side4video.engine.factory import retrieval_config_overrides
    from side4video.model.convert import official_retrieval_config, unwrap_official_retrieval
    from side4video.model.retrieval import official_retrieval_args, retrieval_from_official

    sd = unwrap_official_retrieval(obj)
    config = dict(official_retrieval_config(sd), num_frames=int(num_frames))
    model = retrieval_from_official(sd, config)
    return "retrieval", model, config, retrieval_config_overrides(official_retrieval_args(config))
