"""The reference implementation's vectors (tests/fixtures/official/README.md says what each holds).

They are data the tests cannot regenerate (they come from running the reference code) and hold
tiny models' weights, so they are not committed: tests read them from tests/fixtures/official/
when copied there (ignored by git), else from the shared fixtures beside the checkout
(../shared/fixtures/official, where CI has them). A missing file is a failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

REPO = Path(__file__).resolve().parents[2]
SEARCHED = (REPO / "tests" / "fixtures" / "official", REPO.parent / "shared" / "fixtures" / "official")
RECOGNITION = "side4video_vit_tiny_reference.pt"
EVA = "side4video_eva_tiny_reference.pt"
RETRIEVAL_VISUAL = "side4video_retrieval_visual_tiny_reference.pt"
RETRIEVAL_WTI = "side4video_retrieval_wti_tiny_reference.pt"
RETRIEVAL_METRICS = "retrieval_metrics_reference.pt"


def official_path(name: str) -> Path:
    for folder in SEARCHED:
        if (folder / name).is_file():
            return folder / name
    raise AssertionError(f"reference fixture {name} is missing: copy it into {SEARCHED[0]} "
                         f"(or keep ../shared/fixtures/official beside the checkout)")


def load_official(name: str) -> Dict[str, Any]:
    return torch.load(official_path(name), weights_only=True)
