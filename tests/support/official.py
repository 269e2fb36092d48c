"""The reference implementation's vectors (tests/fixtures/official, see its README.md).

They are data the tests cannot regenerate (they come from running the reference code), so they
live in the repository; a missing file is a failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "official"
RECOGNITION = "side4video_vit_tiny_reference.pt"
EVA = "side4video_eva_tiny_reference.pt"
RETRIEVAL_VISUAL = "side4video_retrieval_visual_tiny_reference.pt"
RETRIEVAL_WTI = "side4video_retrieval_wti_tiny_reference.pt"
RETRIEVAL_METRICS = "retrieval_metrics_reference.pt"


def official_path(name: str) -> Path:
    path = OFFICIAL / name
    assert path.is_file(), f"reference fixture {path} is missing (it belongs to the repository: restore it from git)"
    return path


def load_official(name: str) -> Dict[str, Any]:
    return torch.load(official_path(name), weights_only=True)
