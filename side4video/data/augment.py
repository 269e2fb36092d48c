"""Augmentation parameters, drawn in Python from seeded Generators and fed to DALI.

DALI applies them (decode.py); drawing them here instead of with DALI's internal RNG makes every
crop box, flip and RandAugment op a pure function of (seed, epoch, sample key, pass, view), so a
pipeline rebuilt after a resume produces the same tensors.

Geometry is expressed as a region of interest (ROI) in relative coordinates of the decoded
frame: "resize, then crop" is one `fn.resize(roi=...)` from the decoded frame to size x size.

- train: resize (`data.resize`: short side or [height, width]) -> random resized crop (area and
  aspect ranges of the resized frame, torchvision's algorithm) -> RandAugment -> grayscale
  (`data.grayscale`, the reference's Kinetics recipe) -> flip.
  RandAugment runs after the crop, on the final size, to keep it cheap; its geometric ops are
  relative to the image size, so this changes little against the reference's order
  (docs/model.md, "Deviations from the reference").
- test: 1 crop = resize then centre crop; 3 crops = short side resized to the crop size, then
  left/centre/right (top/centre/bottom for portrait video) squares of full height.

RandAugment follows timm's `rand-m{M}-n{N}-mstd{S}[-inc1]` (the reference's rand-m7-n4-mstd0.5-inc1):
N ops drawn with replacement from 15, each applied with probability 0.5, magnitude ~ N(M, S)
clipped to [0, 10], signed ops negated half the time. The same op, magnitude and sign apply to
every frame of a clip. Two op sets (`data.randaugment.ops`):
- increasing (inc1, the reference's): every op grows stronger with the magnitude. Posterize keeps
  4 - int(4 m/10) bits, Solarize inverts pixels >= 256 - int(256 m/10), and Color, Contrast,
  Brightness, Sharpness blend with factor 1 +- 0.9 m/10 (random sign).
- standard (timm's default): Posterize keeps int(4 m/10) bits, Solarize's threshold is
  int(256 m/10), the enhance ops use factor 0.1 + 1.8 m/10: these grow weaker with magnitude
  (or, for the enhance ops, cross "no change" at m = 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from side4video.config import DataConfig

# What DALI executes for a RandAugment step (one conditional branch each).
(
    RA_NONE,
    RA_AFFINE,
    RA_POSTERIZE,
    RA_SOLARIZE,
    RA_SOLARIZE_ADD,
    RA_COLOR,
    RA_CONTRAST,
    RA_BRIGHTNESS,
    RA_SHARPNESS,
    RA_AUTOCONTRAST,
    RA_EQUALIZE,
    RA_INVERT,
) = range(12)

RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
OP_SETS = {"increasing": RAND_INCREASING_OPS, "standard": RAND_OPS}
# ops whose argument does not depend on the magnitude
UNLEVELLED_OPS = ("AutoContrast", "Equalize", "Invert")
RA_PROB = 0.5
MAX_LEVEL = 10.0
IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


@dataclass
class RAStep:
    kind: int = RA_NONE
    arg: float = 0.0
    matrix: np.ndarray = field(default_factory=lambda: IDENTITY.copy())


@dataclass
class ViewParams:
    """One augmented view of a clip: ROI [y, x] in relative coordinates, flip, RandAugment steps,
    grayscale. All of them apply to every frame of the clip alike."""

    roi_start: np.ndarray
    roi_end: np.ndarray
    flip: bool = False
    ra: List[RAStep] = field(default_factory=list)
    grayscale: bool = False


# ------------------------------------------------------------------------------------ geometry
def resized_shape(height: int, width: int, resize: Sequence[int]) -> Tuple[float, float]:
    """Frame size after `data.resize`: [short side] keeps the aspect, [height, width] is exact."""
    if len(resize) == 2:
        return float(resize[0]), float(resize[1])
    short = float(resize[0])
    scale = short / min(height, width)
    return height * scale, width * scale


def _roi(y0: float, x0: float, y1: float, x1: float) -> Tuple[np.ndarray, np.ndarray]:
    return np.array([y0, x0], dtype=np.float32), np.array([y1, x1], dtype=np.float32)


def random_resized_crop(
    rng: np.random.Generator, height: float, width: float, area: Sequence[float], aspect: Sequence[float]
) -> Tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop box on a (height, width) frame, as a relative ROI."""
    total = height * width
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * ratio)
        h = math.sqrt(target / ratio)
        if 0 < w <= width and 0 < h <= height:
            y = rng.uniform(0, height - h)
            x = rng.uniform(0, width - w)
            return _roi(y / height, x / width, (y + h) / height, (x + w) / width)
    # Fallback: the largest centred box with an allowed aspect ratio.
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, width / aspect[0]
    elif ratio > aspect[1]:
        w, h = height * aspect[1], height
    else:
        w, h = width, height
    y, x = (height - h) / 2, (width - w) / 2
    return _roi(y / height, x / width, (y + h) / height, (x + w) / width)


def centre_crop(height: float, width: float, size: int) -> Tuple[np.ndarray, np.ndarray]:
    rh, rw = min(1.0, size / height), min(1.0, size / width)
    return _roi((1 - rh) / 2, (1 - rw) / 2, (1 + rh) / 2, (1 + rw) / 2)


def three_crops(height: int, width: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Full-height (or full-width for portrait) squares at the start, centre and end."""
    if width >= height:
        rw = height / width
        return [_roi(0.0, x0, 1.0, x0 + rw) for x0 in (0.0, (1 - rw) / 2, 1 - rw)]
    rh = width / height
    return [_roi(y0, 0.0, y0 + rh, 1.0) for y0 in (0.0, (1 - rh) / 2, 1 - rh)]


# --------------------------------------------------------------------------------- RandAugment
def _affine_about_centre(a: float, b: float, c: float, d: float, size: int) -> np.ndarray:
    """Destination -> source map [[a, b, tx], [c, d, ty]] about the frame centre."""
    cx = cy = size / 2.0
    tx = cx - a * cx - b * cy
    ty = cy - c * cx - d * cy
    return np.array([[a, b, tx], [c, d, ty]], dtype=np.float32)


def op_step(op: str, level: float, sign: float, size: int) -> RAStep:
    """The DALI step of one RandAugment op at `level` (0-10); `sign` (+1/-1) for the signed ops.

    Arguments follow timm's `auto_augment` level-to-argument rules for the op names of OP_SETS.
    """
    frac = level / MAX_LEVEL
    if op == "Rotate":
        t = math.radians(30.0 * frac * sign)
        return RAStep(RA_AFFINE, 0.0, _affine_about_centre(math.cos(t), math.sin(t), -math.sin(t), math.cos(t), size))
    if op == "ShearX":
        return RAStep(RA_AFFINE, 0.0, np.array([[1, 0.3 * frac * sign, 0], [0, 1, 0]], dtype=np.float32))
    if op == "ShearY":
        return RAStep(RA_AFFINE, 0.0, np.array([[1, 0, 0], [0.3 * frac * sign, 1, 0]], dtype=np.float32))
    if op == "TranslateXRel":
        return RAStep(RA_AFFINE, 0.0, np.array([[1, 0, 0.45 * frac * sign * size], [0, 1, 0]], dtype=np.float32))
    if op == "TranslateYRel":
        return RAStep(RA_AFFINE, 0.0, np.array([[1, 0, 0], [0, 1, 0.45 * frac * sign * size]], dtype=np.float32))
    if op in ("Posterize", "PosterizeIncreasing"):  # bits kept: fewer bits = stronger
        bits = int(frac * 4) if op == "Posterize" else 4 - int(frac * 4)
        return RAStep(RA_POSTERIZE, float((0xFF << (8 - bits)) & 0xFF))  # the mask of the kept bits
    if op in ("Solarize", "SolarizeIncreasing"):  # invert pixels at or above the threshold
        threshold = int(frac * 256)
        return RAStep(RA_SOLARIZE, float(threshold if op == "Solarize" else 256 - threshold))
    if op == "SolarizeAdd":  # add to pixels below 128
        return RAStep(RA_SOLARIZE_ADD, float(int(frac * 110)))
    enhance = {"Color": RA_COLOR, "Contrast": RA_CONTRAST, "Brightness": RA_BRIGHTNESS, "Sharpness": RA_SHARPNESS}
    name = op[: -len("Increasing")] if op.endswith("Increasing") else op
    if name in enhance:
        # blend factor with the degenerate image: 1 is "no change"
        factor = 1.0 + sign * 0.9 * frac if op.endswith("Increasing") else 0.1 + 1.8 * frac
        return RAStep(enhance[name], factor)
    if op == "AutoContrast":
        return RAStep(RA_AUTOCONTRAST)
    if op == "Equalize":
        return RAStep(RA_EQUALIZE)
    if op == "Invert":
        return RAStep(RA_INVERT)
    raise ValueError(op)


def randaugment_program(
    rng: np.random.Generator, num_ops: int, magnitude: float, magnitude_std: float, size: int, ops: str = "increasing"
) -> List[RAStep]:
    """`num_ops` steps for one clip from the op set `ops`; a step not applied (probability 1 - 0.5)
    is RA_NONE."""
    names = OP_SETS[ops]
    steps = []
    for _ in range(num_ops):
        op = names[int(rng.integers(len(names)))]
        applied = rng.random() < RA_PROB
        level = float(rng.normal(magnitude, magnitude_std)) if magnitude_std > 0 else float(magnitude)
        level = min(MAX_LEVEL, max(0.0, level))
        sign = -1.0 if rng.random() < 0.5 else 1.0
        steps.append(op_step(op, level, sign, size) if applied else RAStep())
    return steps


# --------------------------------------------------------------------------------------- views
def train_view(rng: np.random.Generator, height: int, width: int, data_cfg: DataConfig) -> ViewParams:
    hr, wr = resized_shape(height, width, list(data_cfg.resize))
    roi_start, roi_end = random_resized_crop(rng, hr, wr, list(data_cfg.crop_area), list(data_cfg.crop_aspect))
    flip = bool(data_cfg.flip) and rng.random() < 0.5
    ra = data_cfg.randaugment
    steps = (
        randaugment_program(
            rng, int(ra.num_ops), float(ra.magnitude), float(ra.magnitude_std), int(data_cfg.size), str(ra.ops)
        )
        if ra.enabled
        else []
    )
    p_gray = float(data_cfg.grayscale)
    grayscale = p_gray > 0 and rng.random() < p_gray  # drawn last: the other draws keep their values
    return ViewParams(roi_start, roi_end, flip, steps, grayscale)


def eval_views(height: int, width: int, data_cfg: DataConfig, crops: int) -> List[ViewParams]:
    if crops == 3:
        return [ViewParams(s, e) for s, e in three_crops(height, width)]
    hr, wr = resized_shape(height, width, list(data_cfg.resize))
    return [ViewParams(*centre_crop(hr, wr, int(data_cfg.size)))]


def mirrored_label_pairs(class_names: Sequence[str]) -> List[List[int]]:
    """[[a, b], ...]: the classes whose names become each other when "left" and "right" swap
    (e.g. "Pushing something from left to right"): a horizontal flip turns one into the other."""
    index = {name: i for i, name in enumerate(class_names)}
    pairs = []
    for i, name in enumerate(class_names):
        words = name.split(" ")
        mirrored = " ".join({"left": "right", "right": "left"}.get(w, w) for w in words)
        j = index.get(mirrored)
        if j is not None and i < j:
            pairs.append([i, j])
    return pairs


def flip_label_map(pairs: Sequence[Sequence[int]]) -> dict:
    """{a: b, b: a} for every pair of labels a flip swaps (SSv2's left/right classes)."""
    mapping = {}
    for pair in pairs:
        a, b = int(pair[0]), int(pair[1])
        mapping[a], mapping[b] = b, a
    return mapping
