"""The trainer's own state: everything a checkpoint holds besides what DeepSpeed saves (trained
weights, optimizer state, its step counters).

One object, one `state_dict` / `load_state_dict` pair, so what is saved and what is restored
cannot drift apart: the step, the train loader's position at the end of that step, the RNG
states, the evaluations so far, the bad-step counters and the fingerprint of the frozen backbone
(a checkpoint made over other frozen weights is refused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch

from side4video.errors import UserError

VERSION = 2  # 2: nonfinite_* and loader_position (version 1 said bad_* and data; both load)


def rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainerState:
    """`loader`: the train loader (its position is captured at the end of every step);
    `fingerprint`: the frozen backbone's identity (model/tower.py `FrozenBackbone.fingerprint`)."""

    loader: Any
    fingerprint: Dict[str, Any]
    rank: int = 0  # whose loader position a resume restores (the checkpoint holds every rank's)
    world_size: int = 1
    step: int = 0  # optimizer steps completed
    nonfinite_in_row: int = 0  # consecutive steps with a non-finite loss
    nonfinite_total: int = 0  # steps with a non-finite loss, over the whole run
    skipped_total: int = 0  # steps DeepSpeed did not apply (non-finite gradients, fp16 overflow)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    loader_position: Dict[str, Any] = field(default_factory=dict)  # the loader's state after step `step`

    def end_step(self, step: int) -> None:
        """Step `step` is complete: it, and the data it consumed, are what a save records."""
        self.step = step
        self.loader_position = self.loader.state_dict()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": VERSION,
            "step": self.step,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "skipped_total": self.skipped_total,
            "evals": list(self.evals),
            "loader_position": dict(self.loader_position),
            "rng": rng_state(),
            "backbone": self.fingerprint,
        }

    def load_state_dict(self, saved: Dict[str, Any], where: str = "checkpoint") -> None:
        if saved.get("backbone") != self.fingerprint:
            raise UserError(
                f"{where} was made over another frozen backbone ({_describe(saved.get('backbone'))}); "
                f"this run's is {_describe(self.fingerprint)}: resume with the same "
                f"model.backbone.* or start a new train.output_dir"
            )
        self.step = int(saved["step"])
        version_1 = int(saved.get("version", 1)) == 1
        self.nonfinite_in_row = int(saved.get("bad_in_row" if version_1 else "nonfinite_in_row", 0))
        self.nonfinite_total = int(saved.get("bad_total" if version_1 else "nonfinite_total", 0))
        self.skipped_total = int(saved.get("skipped_total", 0))
        self.evals = list(saved.get("evals", []))
        every = [dict(p) for p in saved.get("loader_positions") or []]
        self.loader.load_state_dict(self._own_position(saved, every, version_1), every_rank=every or None)
        self.loader_position = self.loader.state_dict()
        set_rng_state(saved["rng"])

    def _own_position(self, saved: Dict[str, Any], every: List[Dict[str, Any]], version_1: bool) -> Dict[str, Any]:
        """This rank's loader position when the checkpoint was written by as many ranks (each rank
        has its own: bad samples skipped move one rank's stream further than another's); rank 0's
        otherwise (the loader then places the epoch's rest from every rank's position)."""
        if len(every) == self.world_size:
            return every[self.rank]
        return dict(saved["data" if version_1 else "loader_position"])


def _describe(fingerprint: Any) -> str:
    if not isinstance(fingerprint, dict):
        return "unknown"
    weights = fingerprint.get("weights")
    seed = f" seed {fingerprint.get('seed')}" if weights == "random" else ""
    return f"{fingerprint.get('name')} weights {weights}{seed}"
