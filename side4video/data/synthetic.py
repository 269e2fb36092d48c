"""A generated video dataset whose classes differ by motion only (`side4video make-synthetic`).

A textured shape moves over a textured background. Classes come in pairs that are the same
motion played forwards and backwards: right/left, down/up, clockwise/anticlockwise orbit,
approaching/receding (growing/shrinking). A clip of class 2k+1 is a clip of class 2k with its
frames reversed, so the two have the same set of frames: a model that averages frames cannot
tell them apart, a model that sees the order can. Shapes, textures, colours, positions and
speeds are random per clip. Every clip has a caption sentence.

Clips are small VP9 WebM files written through the same shard writer as real data, into
OUT/train/ and OUT/val/, each with its manifest.json.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from side4video.data.shards import ShardWriter, _map
from side4video.data.video import encode_frames
from side4video.errors import UserError

# (class name, caption phrase); class 2k+1 is class 2k reversed in time.
CLASSES: List[Tuple[str, str]] = [
    ("moving right", "moves from left to right"),
    ("moving left", "moves from right to left"),
    ("moving down", "moves from top to bottom"),
    ("moving up", "moves from bottom to top"),
    ("orbiting clockwise", "circles clockwise"),
    ("orbiting anticlockwise", "circles anticlockwise"),
    ("approaching", "grows as it comes closer"),
    ("receding", "shrinks as it moves away"),
]
SHAPES = ("circle", "square", "diamond", "triangle")
TEXTURES = ("striped", "checkered", "spotted")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190), "orange": (240, 140, 30), "white": (235, 235, 235), "cyan": (40, 200, 210)}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field (static over the clip)."""
    cells = max(2, size // 8)
    coarse = rng.uniform(40, 200, size=(cells, cells, 3)).astype(np.float32)
    idx = np.minimum((np.arange(size) * cells) // size, cells - 1)
    field = coarse[idx][:, idx]
    # soften the blocks with a box blur
    k = max(1, size // 16)
    pad = np.pad(field, ((k, k), (k, k), (0, 0)), mode="edge")
    c = pad.cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    w = 2 * k + 1
    blurred = (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)
    return blurred[:size, :size]


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    return (v <= 0.8) & (v >= -1.0 + 1.8 * np.abs(u))  # triangle, apex up


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    if texture == "striped":
        return (np.sin(freq * (u + 0.5 * v)) > 0).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(freq * u / 3.0) + np.floor(freq * v / 3.0)) % 2).astype(np.float32)
    return ((np.sin(freq * u) * np.sin(freq * v)) > 0.3).astype(np.float32)


def render_clip(class_index: int, rng: np.random.Generator, frames: int, size: int) -> Tuple[List[np.ndarray], str]:
    """Frames (H, W, 3 uint8) of one clip of `class_index`, and its caption."""
    base = class_index - class_index % 2
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    colour = np.array(COLOURS[colour_name], dtype=np.float32)
    background = _background(rng, size)
    radius = size * rng.uniform(0.13, 0.2)
    freq = rng.uniform(5.0, 9.0)
    t = np.linspace(0.0, 1.0, frames)
    if base == 0:  # horizontal
        y = np.full(frames, rng.uniform(0.3, 0.7) * size)
        x = rng.uniform(0.12, 0.3) * size + t * rng.uniform(0.4, 0.58) * size
        scale = np.ones(frames)
    elif base == 2:  # vertical
        x = np.full(frames, rng.uniform(0.3, 0.7) * size)
        y = rng.uniform(0.12, 0.3) * size + t * rng.uniform(0.4, 0.58) * size
        scale = np.ones(frames)
    elif base == 4:  # orbit; angle grows = clockwise on screen (y points down)
        r_orbit = rng.uniform(0.22, 0.3) * size
        angle = rng.uniform(0, 2 * np.pi) + t * rng.uniform(1.2, 1.7) * np.pi
        x = size / 2 + r_orbit * np.cos(angle)
        y = size / 2 + r_orbit * np.sin(angle)
        scale = np.ones(frames)
    else:  # growing
        x = np.full(frames, rng.uniform(0.4, 0.6) * size)
        y = np.full(frames, rng.uniform(0.4, 0.6) * size)
        scale = 0.55 + t * rng.uniform(0.9, 1.3)
    if class_index % 2 == 1:  # the paired class: the same motion backwards
        x, y, scale = x[::-1], y[::-1], scale[::-1]
    grid = np.arange(size, dtype=np.float32) + 0.5
    out = []
    for i in range(frames):
        r = radius * scale[i]
        u = (grid[None, :] - x[i]) / r
        v = (grid[:, None] - y[i]) / r
        mask = _mask(shape, u, v)[..., None]
        pattern = _texture(texture, u, v, freq)[..., None]
        obj = colour * (0.55 + 0.45 * pattern)
        frame = np.where(mask, obj, background)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    caption = f"a {colour_name} {texture} {shape} {CLASSES[class_index][1]}"
    return out, caption


def _make_one(args) -> Tuple[str, bytes, Dict]:
    split, index, class_index, seed, frames, size, fps = args
    rng = np.random.default_rng([seed, 1 if split == "val" else 0, index])
    clip, caption = render_clip(class_index, rng, frames, size)
    data = encode_frames(clip, codec="vp9", fps=fps, keyframe_interval=frames)
    meta = {"label": class_index, "label_name": CLASSES[class_index][0], "captions": [caption], "frames": frames,
            "fps": float(fps), "width": size, "height": size, "codec": "vp9"}
    return f"{split}/{index:06d}", data, meta


def make_synthetic(out: str, videos: int = 256, classes: int = 8, val_videos=None, frames: int = 16, size: int = 64,
                   fps: int = 8, seed: int = 0, shard_samples: int = 32, workers: int = 1) -> Dict[str, int]:
    """Write OUT/train and OUT/val (shards + manifest.json); returns the video counts."""
    if not 2 <= classes <= len(CLASSES):
        raise UserError(f"--classes {classes}: between 2 and {len(CLASSES)} motion classes")
    if videos < 1:
        raise UserError("--videos must be at least 1")
    if size < 16 or size % 2:
        raise UserError(f"--size {size}: an even number of pixels, at least 16")
    if frames < 2:
        raise UserError("--frames must be at least 2 (motion needs time)")
    if shard_samples < 1:
        raise UserError("--shard-samples must be at least 1")
    val_videos = videos // 4 if val_videos is None else int(val_videos)
    names = [c[0] for c in CLASSES[:classes]]
    counts = {}
    for split, n in (("train", videos), ("val", val_videos)):
        writer = ShardWriter(os.path.join(out, split), max_samples=shard_samples, prefix=split)
        jobs = [(split, i, i % classes, seed, frames, size, fps) for i in range(n)]
        for key, data, meta in _map(_make_one, jobs, max(1, int(workers))):
            writer.write(key.replace("/", "_"), data, "webm", meta)
        if n:
            writer.close(names, [], "synthetic", frames=frames, size=size, fps=fps, seed=seed)
        counts[split] = n
    return counts
