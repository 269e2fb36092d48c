"""What every trainable model here shares: its checkpoints hold the trained state only."""

from __future__ import annotations

from typing import Dict

import torch


class TrainableState:
    """Mixin for models with a `trainable_state_dict()` (trained parameters and the buffers that
    go with them, never the frozen towers)."""

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        expected = set(self.trainable_state_dict())
        if strict:
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            if missing or unexpected:
                raise KeyError(f"trainable state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
