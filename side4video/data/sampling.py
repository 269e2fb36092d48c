"""Which frames of a video make a clip.

- TSN segments: the video is cut into T equal segments, one frame per segment; in training at a
  random offset inside each segment, at test time at the segment's centre.
- Dense clips: T frames `stride` apart from a start frame (random in training, centred at test).
- Test views: N temporal clips per video (TSN: N evenly spaced offsets inside the segments;
  dense: N evenly spaced starts).

Videos shorter than the clip never fail: TSN indices repeat frames, dense indices are clamped
to the last frame. Randomness comes from the Generator passed in (seeded by the caller from
integers), so every index is reproducible.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np


def _check(num_frames: int, frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")


def tsn_indices(
    num_frames: int, frames: int, rng: Optional[np.random.Generator] = None, offset: float = 0.5
) -> np.ndarray:
    """One frame per segment: random offset per segment if `rng` is given, else at `offset`
    (0.5 = centre) of every segment."""
    _check(num_frames, frames)
    seg = num_frames / frames
    u = rng.random(frames) if rng is not None else np.full(frames, offset)
    pos = (np.arange(frames) + u) * seg
    return np.clip(np.floor(pos), 0, num_frames - 1).astype(np.int32)


def dense_indices(
    num_frames: int, frames: int, stride: int, rng: Optional[np.random.Generator] = None, start: Optional[int] = None
) -> np.ndarray:
    """T frames `stride` apart; start random (training), given, or centred; clamped at the end."""
    _check(num_frames, frames)
    stride = max(1, int(stride))
    span = (frames - 1) * stride + 1
    room = max(0, num_frames - span)
    if start is None:
        start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
    idx = start + np.arange(frames) * stride
    return np.clip(idx, 0, num_frames - 1).astype(np.int32)


def train_indices(num_frames: int, frames: int, sampling: str, stride: int, rng: np.random.Generator) -> np.ndarray:
    if sampling == "tsn":
        return tsn_indices(num_frames, frames, rng)
    if sampling == "dense":
        return dense_indices(num_frames, frames, stride, rng)
    raise ValueError(f"unknown sampling {sampling!r}")


def eval_indices(num_frames: int, frames: int, sampling: str, stride: int, clips: int = 1) -> List[np.ndarray]:
    """The `clips` temporal views of the test protocol, each T indices."""
    clips = max(1, int(clips))
    if sampling == "tsn":
        return [tsn_indices(num_frames, frames, offset=(j + 0.5) / clips) for j in range(clips)]
    if sampling == "dense":
        span = (max(1, stride) * (frames - 1)) + 1
        room = max(0, num_frames - span)
        starts = [room // 2] if clips == 1 else [int(round(room * j / (clips - 1))) for j in range(clips)]
        return [dense_indices(num_frames, frames, stride, start=s) for s in starts]
    raise ValueError(f"unknown sampling {sampling!r}")
