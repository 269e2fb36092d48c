"""Frame sampling, augmentation parameters, the synthetic dataset, inspect and the data bench."""

from __future__ import annotations

import json

import numpy as np
import pytest

from side4video.cli import main as cli_main
from side4video.data import augment as A
from side4video.data.sampling import dense_indices, eval_indices, train_indices, tsn_indices
from side4video.data.stream import RankStream, resolve_shards
from side4video.data.synthetic import CLASSES, make_synthetic, render_clip
from side4video.errors import UserError
from tests.support.data import load_cfg


# ------------------------------------------------------------------------------- sampling
def test_tsn_training_picks_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = tsn_indices(80, 8, rng)
        assert idx.shape == (8,) and idx.dtype == np.int32
        assert all(10 * i <= f < 10 * (i + 1) for i, f in enumerate(idx))
    draws = {tuple(tsn_indices(80, 8, rng)) for _ in range(20)}
    assert len(draws) > 1  # random offsets


def test_tsn_test_is_centred_and_views_are_spread():
    assert tsn_indices(80, 8).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    views = eval_indices(80, 8, "tsn", 1, clips=2)
    assert [v.tolist() for v in views] == [[2, 12, 22, 32, 42, 52, 62, 72], [7, 17, 27, 37, 47, 57, 67, 77]]


def test_dense_clips():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(30):
        idx = dense_indices(100, 8, 2, rng)
        assert np.all(np.diff(idx) == 2) and idx[-1] <= 99
        starts.add(int(idx[0]))
    assert len(starts) > 1
    views = eval_indices(100, 8, "dense", 2, clips=3)
    assert [int(v[0]) for v in views] == [0, 42, 85] and all(v[-1] <= 99 for v in views)
    assert dense_indices(100, 8, 2).tolist()[0] == 42  # centred


@pytest.mark.parametrize("num_frames", [1, 3, 7])
def test_short_videos_never_fail(num_frames):
    rng = np.random.default_rng(0)
    for sampling in ("tsn", "dense"):
        idx = train_indices(num_frames, 8, sampling, 4, rng)
        assert idx.shape == (8,) and idx.min() >= 0 and idx.max() <= num_frames - 1
        for view in eval_indices(num_frames, 8, sampling, 4, clips=2):
            assert view.shape == (8,) and view.max() <= num_frames - 1
    assert np.all(np.diff(tsn_indices(num_frames, 8, rng)) >= 0)  # repeats, in order
    with pytest.raises(ValueError):
        tsn_indices(0, 8)


# --------------------------------------------------------------------------- augmentation
def test_random_resized_crop_respects_area_and_aspect():
    rng = np.random.default_rng(0)
    for _ in range(200):
        start, end = A.random_resized_crop(rng, 256.0, 320.0, (0.08, 1.0), (3 / 4, 4 / 3))
        h, w = (end - start) * np.array([256.0, 320.0])
        assert np.all(start >= 0) and np.all(end <= 1 + 1e-6)
        assert 0.08 * 0.999 <= h * w / (256 * 320) <= 1.0 + 1e-6
        assert 3 / 4 - 1e-3 <= w / h <= 4 / 3 + 1e-3


def test_view_parameters_are_a_function_of_the_seed():
    cfg = load_cfg("data.randaugment.enabled=true")

    def view(seed):
        return A.train_view(np.random.default_rng([seed, 5]), 240, 320, cfg.data)

    a, b, c = view(1), view(1), view(2)
    assert np.array_equal(a.roi_start, b.roi_start) and a.flip == b.flip
    assert [(s.kind, s.arg) for s in a.ra] == [(s.kind, s.arg) for s in b.ra] and len(a.ra) == 4
    assert not (np.array_equal(a.roi_start, c.roi_start) and [s.kind for s in a.ra] == [s.kind for s in c.ra])
    # about half of the steps apply (probability 0.5)
    kinds = [s.kind for seed in range(200) for s in view(seed).ra]
    assert 0.35 < np.mean([k != A.RA_NONE for k in kinds]) < 0.65


def test_eval_geometry():
    start, end = A.centre_crop(256.0, 320.0, 224)
    assert np.allclose(start, [16 / 256, 48 / 320]) and np.allclose(end, [240 / 256, 272 / 320])
    crops = A.three_crops(240, 320)
    assert [round(float(s[1]), 3) for s, _ in crops] == [0.0, 0.125, 0.25]
    assert all(float(e[0] - s[0]) == 1.0 for s, e in crops)  # full height
    assert A.flip_label_map([[86, 87], [93, 94]]) == {86: 87, 87: 86, 93: 94, 94: 93}


# ----------------------------------------------------------------------------- synthetic
def test_paired_classes_are_the_same_frames_in_reverse_order():
    """A frame-averaging model cannot separate class 2k from 2k+1: same frames, reversed."""
    for base in range(0, len(CLASSES), 2):
        fwd, cap_f = render_clip(base, np.random.default_rng(11), 8, 32)
        bwd, cap_b = render_clip(base + 1, np.random.default_rng(11), 8, 32)
        assert all(np.array_equal(a, b) for a, b in zip(fwd, bwd[::-1]))
        assert np.array_equal(np.mean(fwd, axis=0), np.mean(bwd, axis=0))
        assert not np.array_equal(fwd[0], fwd[-1])  # it does move
        assert cap_f != cap_b and cap_f.split()[:3] == cap_b.split()[:3]


def test_make_synthetic_writes_train_and_val(synthetic_data):
    assert synthetic_data["counts"] == {"train": 24, "val": 8}
    train = json.loads((synthetic_data["train"] / "manifest.json").read_text())
    assert train["samples"] == 24 and [s["samples"] for s in train["shards"]] == [6, 6, 6, 6]
    assert train["classes"] == [c[0] for c in CLASSES[:4]]
    samples = list(RankStream(resolve_shards(str(synthetic_data["val"])), None, epoch=0, shuffle_shards=False))
    assert len(samples) == 8 and sorted(s.label for s in samples) == [0, 0, 1, 1, 2, 2, 3, 3]
    for s in samples:
        assert s.ext == "webm" and s.meta["codec"] == "vp9" and s.meta["frames"] == 8
        assert len(s.captions) == 1 and s.captions[0].split()[0] in ("a", "an") and "shapes" in s.captions[0]


def test_make_synthetic_with_workers_is_identical(tmp_path):
    make_synthetic(str(tmp_path / "one"), videos=6, classes=2, val_videos=0, frames=4, size=16, shard_samples=3)
    make_synthetic(
        str(tmp_path / "two"), videos=6, classes=2, val_videos=0, frames=4, size=16, shard_samples=3, workers=2
    )
    for name in ("train-000000.tar", "train-000001.tar"):
        assert (tmp_path / "one/train" / name).read_bytes() == (tmp_path / "two/train" / name).read_bytes()
    with pytest.raises(UserError, match="classes"):
        make_synthetic(str(tmp_path / "x"), videos=4, classes=9)


# ------------------------------------------------------------------------------- inspect
def test_inspect_json(synthetic_data, tmp_path, capsys):
    import io
    import shutil
    import tarfile

    folder = tmp_path / "ds"
    shutil.copytree(synthetic_data["val"], folder)
    shard = folder / "val-000001.tar"  # replace one video by garbage
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in members:
            if m.name.endswith(".webm") and m.name.startswith("val_000007"):
                data = b"\x1aE\xdf\xa3garbage" * 10
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    code = cli_main(["inspect", str(folder / "manifest.json"), "data.frames=4", "data.size=32", "--decode", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["samples"] == 8 and report["bad_samples"] == ["val_000007"]
    assert report["classes"] == {"moving right": 2, "moving left": 2, "moving down": 2, "moving up": 2}
    assert report["frames"] == {"min": 8, "max": 8} and report["codecs"] == {"vp9": 7}
    code = cli_main(["inspect", "pipe:cat x.tar"])
    assert code == 2 and "allow_pipe" in capsys.readouterr().err


# --------------------------------------------------------------------------------- bench
@pytest.mark.timeout(300)
def test_bench_data_quick(tmp_path):
    out = tmp_path / "bench"
    assert cli_main(["bench", "data", "--out", str(out), "--quick"]) == 0
    report = json.loads((out / "data.json").read_text())
    assert report["dali_clips_per_s"] > 0 and report["pyav_clips_per_s"] > 0
    assert report["clips"] == 8 and report["frames_per_clip"] == 8 and report["dali_decode_only_clips_per_s"] > 0
    assert len(report["pass_rates"]["dali"]) == report["passes"] == 2
    md = (out / "data.md").read_text()
    assert str(report["dali_clips_per_s"]) in md and str(report["pyav_clips_per_s"]) in md
    assert (out / "data.png").stat().st_size > 1000
