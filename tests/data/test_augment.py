"""RandAugment's op sets and grayscale, through the DALI graph for both input kinds.

Videos DALI decodes itself ("dali": encoded bytes in the graph) and frames PyAV decodes ("pyav":
raw frames fed to the same graph) must get the same augmentations, so every graph test runs on
both.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from side4video.data import augment as A
from side4video.data.decode import ClipDecoder, ClipRequest
from side4video.data.video import encode_frames
from tests.support.data import load_cfg

SIZE = 64
FULL = (np.zeros(2, np.float32), np.ones(2, np.float32))  # the whole frame, no crop
LEVELS = (2.0, 5.0, 8.0)
SIGNED = {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
}


def ramp_frames(frames: int = 4) -> List[np.ndarray]:
    """Smooth colour ramps (red along x, green along y) and a sharp bright square: every op,
    geometric, colour or sharpness, changes it by an amount that grows with its argument."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = []
    for t in range(frames):
        # blue differs frame to frame: statistics (AutoContrast, Contrast's mean) must be per frame
        img = np.stack([xx * 255 / (SIZE - 1), yy * 255 / (SIZE - 1), np.full_like(xx, 40.0 + 50 * t)], axis=-1)
        img[24:40, 24 + t : 40 + t] = (250, 240, 230)
        out.append(img.astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def video() -> bytes:
    return encode_frames(ramp_frames(), codec="vp9", fps=8)


def decoder(path: str, batch: int, ra_steps: int, grayscale: bool = False) -> ClipDecoder:
    # mean 0, std 1/255: outputs stay on the 0..255 scale
    return ClipDecoder(
        views=1,
        size=SIZE,
        mean=[0, 0, 0],
        std=[1 / 255] * 3,
        batch_size=batch,
        ra_steps=ra_steps,
        threads=2,
        decoder=path,
        grayscale=grayscale,
    )


def run(
    path: str, video: bytes, views: List[A.ViewParams], indices=(0, 1, 2, 3), ra_steps: int = 1, grayscale: bool = False
) -> List[torch.Tensor]:
    reqs = [ClipRequest(f"v{i}", video, "vp9", np.asarray(indices, np.int32), [v]) for i, v in enumerate(views)]
    dec = decoder(path, len(reqs), ra_steps, grayscale)
    out, bad = dec.decode(reqs)
    dec.close()
    assert not bad
    return [t[0] for t in out]  # (F, 3, S, S) each


# ------------------------------------------------------------------------------ parameters
def test_the_increasing_set_is_timm_inc1_and_the_default():
    assert load_cfg().data.randaugment.ops == "increasing"
    assert len(A.RAND_INCREASING_OPS) == len(A.RAND_OPS) == 15
    renamed = {a: b for a, b in zip(A.RAND_OPS, A.RAND_INCREASING_OPS) if a != b}
    assert renamed == {
        op: op + "Increasing" for op in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
    }
    # arguments at m = 7 (the reference's magnitude)
    assert A.op_step("PosterizeIncreasing", 7, 1, SIZE).arg == 0b11000000  # 4 - int(2.8) = 2 bits kept
    assert A.op_step("SolarizeIncreasing", 7, 1, SIZE).arg == 256 - 179
    assert A.op_step("ContrastIncreasing", 7, -1, SIZE).arg == pytest.approx(1 - 0.63)
    assert A.op_step("ContrastIncreasing", 7, 1, SIZE).arg == pytest.approx(1 + 0.63)
    assert A.op_step("Solarize", 7, 1, SIZE).arg == 179 and A.op_step("Contrast", 7, -1, SIZE).arg == pytest.approx(
        1.36
    )


@pytest.mark.parametrize("ops, expected", [("increasing", 256 - 230), ("standard", 230)])
def test_the_configured_op_set_is_the_one_drawn(ops, expected):
    cfg = load_cfg(
        "data.randaugment.enabled=true",
        "data.randaugment.magnitude=9",
        "data.randaugment.magnitude_std=0",
        f"data.randaugment.ops={ops}",
    )
    steps = [s for seed in range(300) for s in A.train_view(np.random.default_rng(seed), 240, 320, cfg.data).ra]
    solarize = {s.arg for s in steps if s.kind == A.RA_SOLARIZE}
    assert solarize == {float(expected)}


def test_one_program_per_clip_with_one_magnitude_and_sign():
    """A clip's view carries one RandAugment program, and every frame of the clip gets its ops at
    the same magnitude and sign: a still clip stays still through any program, the sign of a
    signed op changes the result, and clips decoded together keep their own programs (each as if
    decoded alone)."""
    cfg = load_cfg("data.randaugment.enabled=true", "data.randaugment.num_ops=2", f"data.size={SIZE}")
    view = A.train_view(np.random.default_rng(0), 240, 320, cfg.data)
    assert len(view.ra) == 2 and all(np.ndim(s.arg) == 0 and s.matrix.shape == (2, 3) for s in view.ra)

    still = np.stack([ramp_frames(1)[0]] * 4)  # four identical frames, fed as they are (no codec)
    programs = [
        [A.op_step("Rotate", 7.0, 1.0, SIZE), A.op_step("BrightnessIncreasing", 7.0, 1.0, SIZE)],
        [A.op_step("Rotate", 7.0, -1.0, SIZE), A.op_step("BrightnessIncreasing", 7.0, -1.0, SIZE)],
        [A.op_step("TranslateXRel", 5.0, 1.0, SIZE), A.op_step("SolarizeIncreasing", 5.0, 1.0, SIZE)],
        [A.RAStep(), A.RAStep()],
    ]
    reqs = [
        ClipRequest(f"c{i}", b"", "vp9", np.arange(4, dtype=np.int32), [A.ViewParams(*FULL, False, steps)])
        for i, steps in enumerate(programs)
    ]
    dec = decoder("pyav", len(reqs), ra_steps=2)
    together = [t[0] for t in dec._run("frames", reqs, [still] * len(reqs))]  # (F, 3, S, S) each
    alone = [dec._run("frames", [r], [still])[0][0] for r in reqs]
    dec.close()
    for clip, steps in zip(together, programs):
        assert all(torch.equal(frame, clip[0]) for frame in clip), f"frames differ under {steps}"
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    plus, minus, other, plain = (clip[0] for clip in together)
    assert (plus - minus).abs().mean() > 5 and (plus - plain).abs().mean() > 5 and (other - plain).abs().mean() > 5


# ------------------------------------------------------------------------------- the graph
def strength_requests() -> Dict[tuple, A.ViewParams]:
    views = {("none", 0, 0): A.ViewParams(*FULL)}
    levelled = [op for op in A.RAND_INCREASING_OPS if op not in A.UNLEVELLED_OPS] + ["Posterize", "Solarize"]
    for op in levelled:
        for sign in (1.0, -1.0) if op in SIGNED else (1.0,):
            for level in LEVELS:
                views[(op, sign, level)] = A.ViewParams(*FULL, False, [A.op_step(op, level, sign, SIZE)])
    return views


@pytest.mark.parametrize("path", ["dali", "pyav"])
def test_increasing_ops_grow_stronger_with_the_magnitude(video, path):
    views = strength_requests()
    out = dict(zip(views, run(path, video, list(views.values()))))
    plain = out[("none", 0, 0)]
    strength = {key: (t - plain).abs().mean().item() for key, t in out.items()}
    for op in A.RAND_INCREASING_OPS:
        if op in A.UNLEVELLED_OPS:  # no argument: the same step at every magnitude
            assert len({(A.op_step(op, lv, 1.0, SIZE).kind, A.op_step(op, lv, 1.0, SIZE).arg) for lv in LEVELS}) == 1
            continue
        for sign in (1.0, -1.0) if op in SIGNED else (1.0,):
            s = [strength[(op, sign, lv)] for lv in LEVELS]
            assert s[0] > 0.05 and s[1] > 1.1 * s[0] and s[2] > 1.1 * s[1], (op, sign, s)
    # the standard set's Posterize and Solarize do the opposite: that is what the option changes
    for op in ("Posterize", "Solarize"):
        s = [strength[(op, 1.0, lv)] for lv in LEVELS]
        assert s[0] > s[1] > s[2], (op, s)


@pytest.mark.parametrize("path", ["dali", "pyav"])
def test_every_frame_of_a_clip_gets_the_same_ops(video, path):
    """Four copies of one frame stay four copies through any op, program and grayscale."""
    rng = np.random.default_rng(5)
    views = [
        A.ViewParams(*FULL, False, [A.op_step(op, 7.0, float(rng.choice([-1, 1])), SIZE)], bool(i % 2))
        for i, op in enumerate(A.RAND_INCREASING_OPS)
    ]
    views += [A.ViewParams(*FULL, False, A.randaugment_program(rng, 4, 7.0, 0.5, SIZE), bool(i % 2)) for i in range(8)]
    out = run(path, video, views, indices=(1, 1, 1, 1), ra_steps=4, grayscale=True)
    plain = run(path, video, [A.ViewParams(*FULL)], indices=(1, 1, 1, 1), ra_steps=0)[0]
    changed = 0
    for view, t in zip(views, out):
        for f in range(1, 4):
            assert torch.equal(t[f], t[0]), (view.ra, f)
        changed += (t - plain).abs().mean().item() > 0.5
    assert changed >= len(views) - 2  # the ops did act (AutoContrast / Equalize may barely change a frame)


def pil_op(op: str, step: A.RAStep, frame: np.ndarray) -> np.ndarray:
    """What the reference does to one frame: PIL's ImageOps / ImageEnhance (timm's op functions)."""
    img = Image.fromarray(frame)
    name = op[: -len("Increasing")] if op.endswith("Increasing") else op
    if name == "AutoContrast":
        out = ImageOps.autocontrast(img)
    elif name == "Invert":
        out = ImageOps.invert(img)
    elif name == "Posterize":
        out = ImageOps.posterize(img, bin(int(step.arg)).count("1"))
    elif name == "Solarize":
        out = ImageOps.solarize(img, int(step.arg))
    elif name == "SolarizeAdd":
        out = img.point([min(255, i + int(step.arg)) if i < 128 else i for i in range(256)] * 3)
    else:
        enhance = {
            "Color": ImageEnhance.Color,
            "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness,
            "Sharpness": ImageEnhance.Sharpness,
        }[name]
        out = enhance(img).enhance(step.arg)
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("path", ["dali", "pyav"])
def test_pixel_ops_match_pil_frame_by_frame(video, path):
    """The reference runs PIL on each frame: the graph must give the same pixels (PIL rounds to
    integers, so within 2 levels), with image statistics taken per frame. Equalize is DALI's
    (OpenCV's) histogram equalisation, a few levels from PIL's: docs/model.md, deviations."""
    ops = [
        op
        for op in A.RAND_INCREASING_OPS
        if op not in ("Equalize", "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    ]
    cases = [(op, sign) for op in ops for sign in ((1.0, -1.0) if op in SIGNED else (1.0,))]
    views = [A.ViewParams(*FULL)] + [A.ViewParams(*FULL, False, [A.op_step(op, 7.0, sign, SIZE)]) for op, sign in cases]
    out = run(path, video, views)
    frames = out[0].permute(0, 2, 3, 1).numpy()  # RA_NONE: the decoded frames (full-frame ROI, same size)
    assert np.array_equal(frames, np.round(frames))
    frames = frames.astype(np.uint8)
    for (op, sign), view, t in zip(cases, views[1:], out[1:]):
        ours = t.permute(0, 2, 3, 1).numpy()
        ref = np.stack([pil_op(op, view.ra[0], f) for f in frames])
        assert np.abs(ours - ref).max() <= 2.0, (op, sign, np.abs(ours - ref).max())


# ------------------------------------------------------------------------------- grayscale
def test_grayscale_is_a_seeded_per_clip_draw():
    gray = load_cfg("data.grayscale=0.2", "data.randaugment.enabled=true").data
    colour = load_cfg("data.grayscale=0.0", "data.randaugment.enabled=true").data

    def view(data, seed):
        return A.train_view(np.random.default_rng([seed, 3]), 240, 320, data)

    draws = [view(gray, s).grayscale for s in range(1000)]
    assert 0.16 < np.mean(draws) < 0.24
    assert [view(gray, s).grayscale for s in range(50)] == draws[:50]  # a resumed epoch draws the same
    assert not any(view(colour, s).grayscale for s in range(200))
    a, b = view(gray, 7), view(colour, 7)  # drawn last: crop, flip and RandAugment do not move
    assert np.array_equal(a.roi_start, b.roi_start) and a.flip == b.flip
    assert [(s.kind, s.arg) for s in a.ra] == [(s.kind, s.arg) for s in b.ra]


@pytest.mark.parametrize("path", ["dali", "pyav"])
@pytest.mark.parametrize("ra_steps", [0, 1])
def test_grayscale_turns_every_frame_grey(video, path, ra_steps):
    steps = [A.op_step("ContrastIncreasing", 5.0, 1.0, SIZE)] if ra_steps else []
    colour, grey = run(
        path,
        video,
        [A.ViewParams(*FULL, False, steps, False), A.ViewParams(*FULL, False, steps, True)],
        ra_steps=ra_steps,
        grayscale=True,
    )
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])  # every frame, every pixel
    luma = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    assert (grey[:, 0] - luma).abs().max().item() <= 0.5 + 1e-3  # PIL's convert("L"), rounded when uint8
    assert (colour[:, 0] - colour[:, 1]).abs().mean() > 20  # the colour view is untouched...
    without = run(path, video, [A.ViewParams(*FULL, False, steps, False)], ra_steps=ra_steps, grayscale=False)[0]
    assert torch.equal(colour, without)  # ...exactly as a graph without the grayscale node


def test_a_decoder_without_grayscale_refuses_a_grey_view(video):
    dec = decoder("dali", 1, 0, grayscale=False)
    with pytest.raises(ValueError, match="grayscale"):
        dec.decode(
            [ClipRequest("g", video, "vp9", np.arange(4, dtype=np.int32), [A.ViewParams(*FULL, grayscale=True)])]
        )
    dec.close()


def test_grayscale_probability_is_checked():
    from side4video.errors import UserError

    with pytest.raises(UserError, match="data.grayscale"):
        load_cfg("data.grayscale=1.5")
