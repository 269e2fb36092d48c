"""A generated video dataset whose classes differ by motion only (`side4video make-synthetic`).

A scene of textured shapes over a smooth textured background moves as a whole, as under a moving
camera. Classes come in pairs that are the same
motion played forwards and backwards: right/left, down/up, clockwise/anticlockwise rotation,
approaching/receding (growing/shrinking). A clip of class 2k+1 is a clip of class 2k with its
frames reversed, so the two have the same set of frames: a model that averages frames cannot
tell them apart, a model that sees the order can. Shapes, textures, colours, positions and
speeds are random per clip. Every clip has a caption sentence.

Clips are small VP9 WebM files written through the same shard writer as real data, into
OUT/train/ and OUT/val/, each with its manifest.json.

With `captions=True` (text-video retrieval) the clips come in pairs: one scene with a single large
shape, played forwards (clip 2k) and backwards (clip 2k+1), captioned with what moves and which way
("a red square drifting left", a few paraphrases). Only a model that sees the order of the frames
can tell the two captions of a pair apart. Validation captions use sentence frames never seen in
training (the same words for colour, shape and motion), so they are held-apart captions.
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
    ("moving right", "drift from left to right"),
    ("moving left", "drift from right to left"),
    ("moving down", "drift from top to bottom"),
    ("moving up", "drift from bottom to top"),
    ("turning clockwise", "turn clockwise"),
    ("turning anticlockwise", "turn anticlockwise"),
    ("approaching", "grow as the camera comes closer"),
    ("receding", "shrink as the camera moves away"),
]
# Retrieval captions: ways to say each motion (paired with the sentence frames below in turn).
MOTION_PHRASES: List[Tuple[str, ...]] = [
    ("drifting right", "moving right", "sliding to the right"),
    ("drifting left", "moving left", "sliding to the left"),
    ("drifting down", "moving down", "sliding downwards"),
    ("drifting up", "moving up", "sliding upwards"),
    ("turning clockwise", "rotating clockwise", "spinning clockwise"),
    ("turning anticlockwise", "rotating anticlockwise", "spinning anticlockwise"),
    ("coming closer", "growing as it comes closer", "approaching"),
    ("moving away", "shrinking as it moves away", "receding"),
]
TRAIN_FRAMES = ("{a} {colour} {shape} {motion}", "the {colour} {shape} is {motion}", "{colour} {shape} {motion}")
VAL_FRAMES = ("there is {a} {colour} {shape} {motion}", "watch the {colour} {shape} {motion}")
SHAPES = ("circle", "square", "diamond", "triangle")
TEXTURES = ("striped", "checkered", "spotted")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 190),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 200, 210),
}


def _background_field(rng: np.random.Generator):
    """A smooth random colour field defined everywhere on the plane (a few random sinusoids per
    channel), so the scene can be evaluated at any moved/rotated/zoomed coordinate."""
    waves = 4
    freq = rng.uniform(0.08, 0.25, size=(3, waves, 1, 1))
    angle = rng.uniform(0, np.pi, size=(3, waves, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(3, waves, 1, 1))
    amp = rng.uniform(15, 35, size=(3, waves, 1, 1))
    base = rng.uniform(70, 180, size=(3, 1, 1))

    def field(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
        proj = np.cos(angle) * wx[None, None] + np.sin(angle) * wy[None, None]
        return np.moveaxis(base + (amp * np.sin(freq * proj + phase)).sum(axis=1), 0, -1)

    return field


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


def _camera(base: int, rng: np.random.Generator, frames: int, size: int):
    """Per-frame (shift x, shift y, rotation, zoom) of the whole scene for a motion class."""
    t = np.linspace(0.0, 1.0, frames)
    zero, one = np.zeros(frames), np.ones(frames)
    travel = rng.uniform(0.35, 0.5) * size
    if base == 0:  # the scene moves right
        return t * travel, zero, zero, one
    if base == 2:  # down
        return zero, t * travel, zero, one
    if base == 4:  # clockwise on screen (y points down)
        return zero, zero, t * rng.uniform(0.9, 1.3), one
    return zero, zero, zero, np.exp(t * np.log(rng.uniform(1.8, 2.3)))  # zooming in: approaching


def render_clip(class_index: int, rng: np.random.Generator, frames: int, size: int) -> Tuple[List[np.ndarray], str]:
    """Frames (H, W, 3 uint8) of one clip of `class_index`, and its caption.

    The whole scene (a smooth textured background and a few textured shapes) moves as under a
    camera: every part of the frame carries the motion, the way camera motion or a large moving
    object does in real video, so even a patch-level model sees it everywhere.
    """
    out, (colour, texture, shape) = render_scene(class_index, rng, frames, size)
    article = "an" if colour[0] in "aeiou" else "a"
    return out, f"{article} {colour} {texture} {shape} and other shapes {CLASSES[class_index][1]}"


def render_scene(
    class_index: int,
    rng: np.random.Generator,
    frames: int,
    size: int,
    count: int = 4,
    radius: Tuple[float, float] = (0.1, 0.16),
) -> Tuple[List[np.ndarray], Tuple[str, str, str]]:
    """render_clip's frames with `count` shapes of `radius` x size, and (colour, texture, shape)
    of the first shape (the one captions name)."""
    base = class_index - class_index % 2
    background = _background_field(rng)
    shift_x, shift_y, rotation, zoom = _camera(base, rng, frames, size)
    if class_index % 2 == 1:  # the paired class: the same motion backwards
        shift_x, shift_y, rotation, zoom = shift_x[::-1], shift_y[::-1], rotation[::-1], zoom[::-1]
    # shapes placed in scene coordinates (origin at the frame centre), spread over the start view
    # and upstream of the motion so the frame never empties
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(count)]
    textures = [TEXTURES[int(rng.integers(len(TEXTURES)))] for _ in range(count)]
    colour_names = [list(COLOURS)[int(rng.integers(len(COLOURS)))] for _ in range(count)]
    centres = rng.uniform(-0.45, 0.45, size=(count, 2)) * size - np.array([shift_x.mean(), shift_y.mean()])
    radii = size * rng.uniform(radius[0], radius[1], size=count)
    freqs = rng.uniform(5.0, 9.0, size=count)
    screen = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    sx, sy = np.meshgrid(screen, screen)
    out = []
    for i in range(frames):
        # screen -> scene: undo the zoom, the rotation, then the shift
        c, s_ = np.cos(rotation[i]), np.sin(rotation[i])
        zx, zy = sx / zoom[i], sy / zoom[i]
        wx = c * zx + s_ * zy - shift_x[i]
        wy = -s_ * zx + c * zy - shift_y[i]
        frame = background(wx, wy)
        for k in range(count):
            u, v = (wx - centres[k, 0]) / radii[k], (wy - centres[k, 1]) / radii[k]
            mask = _mask(shapes[k], u, v)[..., None]
            pattern = _texture(textures[k], u, v, freqs[k])[..., None]
            obj = np.array(COLOURS[colour_names[k]], dtype=np.float32) * (0.55 + 0.45 * pattern)
            frame = np.where(mask, obj, frame)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out, (colour_names[0], textures[0], shapes[0])


def motion_captions(class_index: int, colour: str, shape: str, split: str) -> List[str]:
    """The retrieval captions of a clip: what moves and which way, one per sentence frame of the
    split (validation frames are never used in training)."""
    article = "an" if colour[0] in "aeiou" else "a"
    phrases = MOTION_PHRASES[class_index]
    frames = VAL_FRAMES if split == "val" else TRAIN_FRAMES
    return [
        f.format(a=article, colour=colour, shape=shape, motion=phrases[k % len(phrases)]) for k, f in enumerate(frames)
    ]


def _make_one(args) -> Tuple[str, bytes, Dict]:
    split, index, class_index, seed, frames, size, fps, captions = args
    if captions:  # clips 2k and 2k+1 share their scene (the same draws): one forwards, one backwards
        rng = np.random.default_rng([seed, 1 if split == "val" else 0, index // 2, 7])
        clip, (colour, _, shape) = render_scene(class_index, rng, frames, size, count=1, radius=(0.22, 0.3))
        texts = motion_captions(class_index, colour, shape, split)
    else:
        rng = np.random.default_rng([seed, 1 if split == "val" else 0, index])
        clip, caption = render_clip(class_index, rng, frames, size)
        texts = [caption]
    data = encode_frames(clip, codec="vp9", fps=fps, keyframe_interval=frames)
    meta = {
        "label": class_index,
        "label_name": CLASSES[class_index][0],
        "captions": texts,
        "frames": frames,
        "fps": float(fps),
        "width": size,
        "height": size,
        "codec": "vp9",
    }
    return f"{split}/{index:06d}", data, meta


def make_synthetic(
    out: str,
    videos: int = 256,
    classes: int = 8,
    val_videos=None,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    shard_samples: int = 32,
    workers: int = 1,
    captions: bool = False,
) -> Dict[str, int]:
    """Write OUT/train and OUT/val (shards + manifest.json); returns the video counts.

    `captions`: retrieval clips (forwards/backwards pairs with motion captions, see above)."""
    if not 2 <= classes <= len(CLASSES):
        raise UserError(f"--classes {classes}: between 2 and {len(CLASSES)} motion classes")
    if captions and classes % 2:
        raise UserError(f"--classes {classes}: --captions needs an even number (each motion with its reverse)")
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
        if captions:  # pair k: motion 2 * (k mod classes/2), forwards then backwards
            jobs = [
                (split, i, 2 * ((i // 2) % (classes // 2)) + i % 2, seed, frames, size, fps, True) for i in range(n)
            ]
        else:
            jobs = [(split, i, i % classes, seed, frames, size, fps, False) for i in range(n)]
        for key, data, meta in _map(_make_one, jobs, max(1, int(workers))):
            writer.write(key.replace("/", "_"), data, "webm", meta)
        if n:
            writer.close(names, [], "synthetic", frames=frames, size=size, fps=fps, seed=seed, captions=bool(captions))
        counts[split] = n
    return counts
