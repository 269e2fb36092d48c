"""What every command shares: loading the run config (with logging set up) and JSON output."""

from __future__ import annotations

import json


def load_run_config(args):
    """The config of a run command: CONFIG + overrides, validated; logging set up from it."""
    from side4video.config import load_config
    from side4video.logs import setup_logging

    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.logging.level, cfg.logging.all_ranks)
    return cfg


def print_json(obj) -> None:
    """One JSON object on stdout (DeepSpeed's own output goes to stderr, see engine/deepspeed_engine.py)."""
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))
