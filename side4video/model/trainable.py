"""What every trainable model here shares: its checkpoints hold the trained state only, and its
optimizer groups follow one no-weight-decay rule."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn


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


# ------------------------------------------------------------------------------- weight decay
def is_position_embedding(name: str) -> bool:
    """Position embeddings by name: the side network's `pos_embed`, the towers' `positional_embedding`."""
    return "position" in name or "pos_emb" in name


def skips_weight_decay(name: str, param: torch.Tensor, decay_position_embeddings: bool = False) -> bool:
    """The no-weight-decay rule: True for a parameter that trains without weight decay.

    Biases and every other tensor of at most one dimension (norm weights, the logit scale) skip
    decay; so do position embeddings (2-D) unless `decay_position_embeddings`.

    Recognition (with train.decay_norm_and_bias=false; the reference decays everything) skips
    position embeddings too, the usual rule. Retrieval decays them (`decay_position_embeddings`):
    the reference's retrieval optimizer (Retrieval/main_task_retrieval.py `prep_optimizer`) skips
    only names containing 'bias', so every 2-D tensor decays there, position embeddings included;
    skipping norm weights and the logit scale as well is our stated deviation
    (configs/experiments/msrvtt_vitb16.yaml).
    """
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return not decay_position_embeddings and is_position_embedding(name)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    decay_all: bool = False,
    decay_position_embeddings: bool = False,
    scaled: Sequence[str] = (),
    lr_scale: float = 1.0,
    decayed_first: bool = True,
) -> List[Dict[str, Any]]:
    """Optimizer groups of the trained parameters (frozen ones never enter; empty groups left out).

    Parameters whose names start with one of the `scaled` prefixes train at `lr * lr_scale`, the
    others at `lr`; within each rate, `skips_weight_decay` splits decayed from not decayed
    (`decay_all`: everything decays). Each group carries `params`, `weight_decay`, `lr_scale` (its
    rate relative to `lr`) and `lr` (= lr * lr_scale). Order: unscaled before scaled, decayed
    before not decayed unless `decayed_first=False` (the order checkpoints written so far hold:
    the optimizer state is saved per group).
    """
    prefixes = tuple(scaled)
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decay_all or not skips_weight_decay(name, param, decay_position_embeddings)
        groups.setdefault((bool(prefixes) and name.startswith(prefixes), decay), []).append(param)
    out = []
    for is_scaled, decay in sorted(groups, key=lambda key: (key[0], key[1] != decayed_first)):
        scale = lr_scale if is_scaled else 1.0
        out.append(
            {
                "params": groups[(is_scaled, decay)],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * scale,
                "lr_scale": scale,
            }
        )
    return out
