"""Decoding: DALI vs PyAV frames, codec routing, bad videos, augmentation, views, flips, dtypes."""

from __future__ import annotations

from typing import Dict, Set

import numpy as np
import pytest
import torch

from side4video.data import augment as A
from side4video.data.decode import ClipDecoder, ClipRequest, build_pipeline, define_pipeline
from side4video.data.shards import ShardWriter
from side4video.data.synthetic import render_clip
from side4video.data.video import decode_frames, encode_frames, probe
from side4video.engine.factory import loader_from_config as build_loader
from side4video.errors import UserError
from tests.support.data import data_cfg_for, encode, load_cfg


def dali_raw_frames(data: bytes, indices) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.video(encoded, device="cpu", frames=list(indices))

    p = pipe()
    p.build()
    p.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
    (out,) = p.run()
    return np.array(out[0])


def test_dali_frames_match_pyav_frames():
    # sharp-edged shapes on a textured background: the hard case for chroma upsampling
    frames, _ = render_clip(4, np.random.default_rng(3), 16, 64)
    data = encode_frames(frames, codec="vp9", fps=8, keyframe_interval=5)
    indices = [0, 3, 7, 8, 12, 15, 15, 1]
    dali = dali_raw_frames(data, indices).astype(np.float64)
    pyav = decode_frames(data, indices).astype(np.float64)
    assert dali.shape == pyav.shape == (8, 64, 64, 3)
    diff = np.abs(dali - pyav).mean()
    assert diff < 2.0, diff
    # and the frames really are the indexed ones: frame 3 is not frame 7
    assert np.abs(pyav[1] - pyav[2]).mean() > 5 * max(diff, 0.1)


def requests_for(videos, cfg, views=1, train=True, seed=0):
    out = []
    for i, (codec, data) in enumerate(videos):
        info = probe(data)
        idx = np.array([0, 3, 6, 9], dtype=np.int32)
        if train:
            v = [
                A.train_view(np.random.default_rng([seed, i, r]), info.height, info.width, cfg.data)
                for r in range(views)
            ]
        else:
            v = A.eval_views(info.height, info.width, cfg.data, views)
        out.append(ClipRequest(f"k{i}", data, codec, idx, v, info))
    return out


def test_dali_and_pyav_paths_apply_the_same_transforms():
    cfg = load_cfg("data.size=32", "data.resize=[36]", "data.randaugment.enabled=true", "data.randaugment.num_ops=1")
    videos = [("vp9", encode(i)) for i in range(3)]
    reqs = requests_for(videos, cfg, views=2)
    kw = dict(views=2, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=4, ra_steps=1, threads=2)
    dali = ClipDecoder(decoder="dali", **kw)
    pyav = ClipDecoder(decoder="pyav", **kw)
    a, bad_a = dali.decode(reqs)
    b, bad_b = pyav.decode(reqs)
    dali.close()
    pyav.close()
    assert not bad_a and not bad_b
    for x, y in zip(a, b):
        assert x.shape == y.shape == (2, 4, 3, 32, 32)
        # normalised units: 2 levels of 255 over the CLIP std
        assert (x - y).abs().mean().item() < 2 / 255 / 0.26


def test_codec_routing_and_recovery_after_a_dali_error():
    cfg = load_cfg("data.size=32", "data.resize=[36]")
    videos = [("vp9", encode(0)), ("h264", encode(1, codec="h264")), ("vp9", encode(2))]
    reqs = requests_for(videos, cfg, views=1, train=False)
    kw = dict(views=1, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=4, threads=2)
    auto = ClipDecoder(decoder="auto", **kw)
    out, bad = auto.decode(reqs)
    assert [auto.route(r) for r in reqs] == ["dali", "pyav", "dali"]
    assert not bad and all(t is not None and t.shape == (1, 4, 3, 32, 32) for t in out)
    # forcing H.264 through DALI's CPU backend fails for that sample only; the pipeline is rebuilt
    forced = ClipDecoder(decoder="dali", **kw)
    out2, bad2 = forced.decode(reqs)
    assert [k for k, _ in bad2] == ["k1"] and out2[1] is None
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    out3, bad3 = forced.decode([reqs[0]])
    assert not bad3 and torch.equal(out3[0], out[0])
    auto.close()
    forced.close()


def test_gpu_routing_sends_what_nvdec_refuses_to_pyav():
    """NVDEC refuses VP9/AV1 below 128 px, HEVC below 144 px, and 10-bit or 4:2:2/4:4:4 H.264: those
    go to PyAV from the start ('mixed' would fail on every such sample, e.g. the demo's 32 px clips)."""
    from side4video.data.video import dali_decodes

    assert dali_decodes("vp9", 320, 240, "yuv420p", gpu=True)
    assert not dali_decodes("vp9", 64, 64, "yuv420p", gpu=True)
    assert not dali_decodes("hevc", 200, 140, "yuv420p", gpu=True)
    assert dali_decodes("h264", 320, 240, "yuv420p", gpu=True)
    assert not dali_decodes("h264", 320, 240, "yuv420p10le", gpu=True)
    assert not dali_decodes("h264", 320, 240, "yuv422p", gpu=True)
    assert not dali_decodes("h264", 320, 240, "yuv420p", gpu=False)  # DALI's CPU backend lacks H.264
    assert dali_decodes("vp9", 32, 32, "yuv420p", gpu=False)
    cfg = load_cfg("data.size=32", "data.resize=[36]")
    small = requests_for([("vp9", encode(0))], cfg, views=1, train=False)[0]
    gpu_decoder = ClipDecoder(
        views=1, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=1, gpu=True, device_id=0
    )  # routing only: no pipeline is built
    assert small.info.width == 48 and gpu_decoder.route(small) == "pyav"
    gpu_decoder.close()


def test_a_dali_failure_is_retried_through_pyav_and_counted():
    cfg = load_cfg("data.size=32", "data.resize=[36]")
    reqs = requests_for([("vp9", encode(0)), ("vp9", encode(2))], cfg, views=1, train=False)
    kw = dict(views=1, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=4, threads=2)
    reference, _ = ClipDecoder(decoder="pyav", **kw).decode(reqs)
    decoder = ClipDecoder(decoder="auto", **kw)
    run = decoder._run

    def dali_refuses_k0(source, requests, frames=None):  # e.g. AV1 on a GPU without AV1 decoding
        if source == "bytes" and any(r.key == "k0" for r in requests):
            raise RuntimeError("Error when executing Mixed operator decoders__Video: unsupported codec")
        return run(source, requests, frames)

    decoder._run = dali_refuses_k0
    out, bad = decoder.decode(reqs)
    assert not bad and [k for k, _ in decoder.fallbacks] == ["k0"] and "unsupported codec" in decoder.fallbacks[0][1]
    assert torch.equal(out[0], reference[0])  # decoded by PyAV, same transforms
    assert out[1] is not None
    decoder.close()


def test_every_randaugment_op_runs_on_dali():
    frames, _ = render_clip(0, np.random.default_rng(1), 8, 32)
    data = encode_frames(frames, codec="vp9", fps=8)
    full = (np.zeros(2, np.float32), np.ones(2, np.float32))
    rng = np.random.default_rng(0)
    ops = list(dict.fromkeys(A.RAND_OPS + A.RAND_INCREASING_OPS))  # both op sets: 21 ops
    steps = [A.RAStep()] + [A.op_step(op, 7.0, float(rng.choice([-1, 1])), 32) for op in ops]
    reqs = [
        ClipRequest(f"op{i}", data, "vp9", np.arange(4, dtype=np.int32), [A.ViewParams(*full, False, [st])])
        for i, st in enumerate(steps)
    ]
    dec = ClipDecoder(views=1, size=32, mean=[0, 0, 0], std=[1 / 255] * 3, batch_size=len(reqs), ra_steps=1)
    out, bad = dec.decode(reqs)
    dec.close()
    assert not bad
    plain = out[0][0]  # RA_NONE: values on 0..255
    by_op = {op: out[i + 1][0] for i, op in enumerate(ops)}
    for op, t in by_op.items():
        assert torch.isfinite(t).all() and t.min() >= -1e-3 and t.max() <= 255 + 1e-3, op
    assert torch.allclose(by_op["Invert"], 255 - plain, atol=1e-3)
    changed = [op for op, t in by_op.items() if (t - plain).abs().mean() > 0.5]
    assert len(changed) >= len(ops) - 2, changed  # every op does something at magnitude 7 (AutoContrast may not)


def test_eval_views_three_crops_two_clips(synthetic_data, tmp_path):
    writer = ShardWriter(str(tmp_path / "wide"))
    for i in range(5):
        writer.write(f"w{i}", encode(i, frames=16, height=32, width=64), "webm", {"label": i % 4})
    writer.close([f"c{i}" for i in range(4)], [], "test")
    cfg = data_cfg_for(
        str(tmp_path / "wide"), str(tmp_path / "wide"), "eval.crops=3", "eval.clips=2", "eval.batch_size=2"
    )
    loader = build_loader(cfg, "val")
    batches = list(loader)
    loader.close()
    with pytest.raises(TypeError):
        len(loader)
    assert [b["video"].shape[0] for b in batches] == [2, 2, 1]  # the last batch is smaller
    video = batches[0]["video"]
    assert video.shape == (2, 6, 4, 3, 32, 32)
    views = video[0]
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.equal(views[a], views[b])  # left/centre/right x 2 temporal clips
    assert [k for b in batches for k in b["key"]] == [f"w{i}" for i in range(5)]


def test_flip_mirrors_the_view_and_swaps_paired_labels(synthetic_data):
    cfg = data_cfg_for(
        str(synthetic_data["train"]),
        None,
        "data.repeated_views=2",
        "data.flip=true",
        "data.flip_label_pairs=[[0,1],[2,3]]",
        "data.crop_area=[1.0,1.0]",
        "data.crop_aspect=[1.0,1.0]",
    )
    loader = build_loader(cfg, "train")
    flips_seen = 0
    for batch in loader:
        video, labels, keys = batch["video"], batch["label"], batch["key"]
        assert video.shape == (8, 4, 3, 32, 32) and keys[0::2] == keys[1::2]
        for i in range(0, 8, 2):
            same = torch.equal(video[i], video[i + 1])
            mirrored = torch.equal(video[i], video[i + 1].flip(-1))
            assert same or mirrored
            if not same:  # exactly one of the two views is flipped: the labels differ by the pair swap
                flips_seen += 1
                assert {labels[i].item(), labels[i + 1].item()} in ({0, 1}, {2, 3})
            else:
                assert labels[i] == labels[i + 1]
    loader.close()
    assert flips_seen > 0


def test_training_loader_applies_grayscale_as_drawn(synthetic_data):
    """data.grayscale (K400's p=0.2) through the loader: grey views have equal channels before
    normalisation, the others colour, and which views are grey follows the seeded draw."""

    from side4video.data import augment as A
    from side4video.data.stream import seeded_rng, stable_hash

    cfg = data_cfg_for(
        str(synthetic_data["train"]), None, "data.grayscale=0.5", "data.flip=false", "data.shuffle_buffer=0"
    )
    loader = build_loader(cfg, "train")
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    grey_seen = colour_seen = 0
    for batch in loader:
        pixels = batch["video"] * std + mean  # back to 0-1 RGB
        for clip, key in zip(pixels, batch["key"]):
            grey = bool((clip[:, 0] - clip[:, 1]).abs().max() < 1e-3 and (clip[:, 1] - clip[:, 2]).abs().max() < 1e-3)
            view = A.train_view(seeded_rng(int(cfg.data.seed), 0, stable_hash(key), 0, 1), 32, 32, cfg.data)
            assert grey == view.grayscale, key
            grey_seen += grey
            colour_seen += not grey
    loader.close()
    assert grey_seen and colour_seen


def test_clip_dtype(synthetic_data):
    spec = str(synthetic_data["val"])
    fp16 = build_loader(data_cfg_for(spec, spec, "data.dtype=fp16"), "val")
    assert next(iter(fp16))["video"].dtype == torch.float16
    fp16.close()
    bf16 = build_loader(data_cfg_for(spec, spec), "val", dtype=torch.bfloat16)  # data.dtype auto: the caller's
    batch = next(iter(bf16))
    bf16.close()
    assert batch["video"].dtype == torch.bfloat16
    # normalised with the CLIP mean/std: roughly zero-centred
    assert -1.5 < batch["video"].float().mean().item() < 1.5


def test_corrupt_videos_are_skipped_and_counted(tmp_path):
    writer = ShardWriter(str(tmp_path / "mixed"))
    good = []
    for i in range(10):
        key = f"s{i:02d}"
        if i == 3:
            data, ext = b"\x1aE\xdf\xa3" + bytes(range(256)) * 8, "webm"  # garbage behind a WebM magic
        elif i == 6:
            full = encode(i)
            data, ext = full[:300], "webm"  # the headers, no complete frame
        elif i == 8:
            data, ext = encode(i, codec="h264"), "mp4"  # fine, through PyAV
            good.append(key)
        else:
            data, ext = encode(i), "webm"
            good.append(key)
        writer.write(key, data, ext, {"label": i % 4})
    writer.close([f"c{i}" for i in range(4)], [], "test")
    spec = str(tmp_path / "mixed")
    val = build_loader(data_cfg_for(spec, spec, "eval.batch_size=4"), "val")
    keys = [k for b in val for k in b["key"]]
    assert keys == good
    assert sorted(val.bad_samples) == ["s03", "s06"]
    val.close()
    train = build_loader(data_cfg_for(spec, spec), "train")
    batches = [b for b in train]
    assert len(batches) == len(train) == 3 and all(b["video"].shape[0] == 4 for b in batches)
    assert not {"s03", "s06"} & {k for b in batches for k in b["key"]}
    assert sorted(train.bad_samples) == ["s03", "s06"]
    train.close()


def test_a_run_of_undecodable_samples_ends_with_one_line(tmp_path):
    """Skipping is for the odd corrupt video: data.max_bad_in_row unusable samples in a row (bad
    data, or a decoder that refuses everything) end the epoch with one line instead of skipping
    forever; a usable sample resets the count."""
    writer = ShardWriter(str(tmp_path / "bad"))
    for i in range(12):
        ok = i in (0, 4)  # two usable samples, then a run of eight garbage ones
        writer.write(f"s{i:02d}", encode(i) if ok else b"\x1aE\xdf\xa3" + bytes([i]) * 600, "webm", {"label": i % 4})
    writer.close([f"c{i}" for i in range(4)], [], "test")
    spec = str(tmp_path / "bad")
    loader = build_loader(
        data_cfg_for(spec, spec, "data.max_bad_in_row=5", "data.shuffle_buffer=0", "train.batch_size=2"), "train"
    )
    with pytest.raises(UserError, match=r"5 samples in a row could not be used \(the last, s09: undecodable"):
        list(loader)
    loader.close()
    lenient = build_loader(
        data_cfg_for(spec, spec, "data.max_bad_in_row=0", "data.shuffle_buffer=0", "train.batch_size=2"), "train"
    )
    assert len(list(lenient)) == len(lenient)  # 0: never stop for bad samples
    lenient.close()


def _data_path(pipe, first: str) -> Dict[str, Set[str]]:
    """{operator: devices} of the operators the clip flows through, from the operator named
    `first` (the decoder, or the fed frames) on, in a defined pipeline's graph.

    DALI 2.4 has no public way to look at a GPU graph on a host without CUDA (`build()` and
    `serialize()` both need the device): its first step, `_build_graph()`, lays the operators
    and their devices out in `_ops`, and that is what is read here. The fed parameters (ROIs,
    flips, RandAugment kinds) are not on the path: they stay on the CPU by design.
    """
    pipe._build_graph()

    def schema(op) -> str:
        return getattr(op._op, "schema_name", type(op._op).__name__)

    on_path = {id(op) for op in pipe._ops if first in (schema(op), op.name)}
    assert on_path, f"no operator {first} in the graph"
    grew = True
    while grew:
        grew = False
        for op in pipe._ops:
            if id(op) not in on_path and any(id(getattr(x, "source", None)) in on_path for x in op.inputs):
                on_path.add(id(op))
                grew = True
    devices: Dict[str, Set[str]] = {}
    for op in pipe._ops:
        if id(op) in on_path:
            devices.setdefault(schema(op), set()).add(op._op.device)
    assert all(id(out.source) in on_path for out in pipe._graph_outputs)
    return devices


def test_pipeline_builds_for_gpu_layout_without_running():
    """On a GPU host the video decoder runs 'mixed' (NVDEC, without pinning its threads to cores)
    and every operator after it on the GPU, RandAugment and grayscale included; PyAV's frames go to
    the GPU before the first operator. The graph is defined here, on any host; building and
    running it needs CUDA (tests/gpu)."""
    kw = dict(
        batch_size=2, views=2, ra_steps=1, size=32, mean=[0.5] * 3, std=[0.5] * 3, fp16=True, threads=1, grayscale=True
    )
    gpu = define_pipeline("bytes", gpu=True, device_id=0, **kw)
    path = _data_path(gpu, "decoders__Video")
    assert path.pop("decoders__Video") == {"mixed"}
    assert {"Resize", "WarpAffine", "ColorTwist", "Equalize", "reductions__Sum", "CropMirrorNormalize"} <= set(path)
    assert all(devices == {"gpu"} for devices in path.values()), path
    decoder = next(op for op in gpu._ops if op.name.startswith("__Video"))
    assert "\n    affine: False\n" in str(decoder.spec)  # its arguments, as DALI prints them
    assert [out.device for out in gpu._graph_outputs] == ["gpu", "gpu"]  # one per view

    frames = _data_path(define_pipeline("frames", gpu=True, device_id=0, **kw), "frames")
    assert frames.pop("ExternalSource") == {"cpu"} and "decoders__Video" not in frames
    assert frames and all(devices == {"gpu"} for devices in frames.values()), frames

    cpu = define_pipeline("bytes", gpu=False, device_id=None, **kw)
    assert {d for devices in _data_path(cpu, "decoders__Video").values() for d in devices} == {"cpu"}
    assert build_pipeline("bytes", gpu=False, device_id=None, **kw) is not None  # this host builds its own layout


WITHOUT_DALI = """
import sys
sys.modules["nvidia.dali"] = None  # DALI not installed: its import fails
import torch
from side4video.logs import setup_logging
from side4video.data.decode import ClipDecoder
from side4video.errors import UserError
from tests.data.test_decode import requests_for
from tests.support.data import encode, load_cfg
setup_logging()
cfg = load_cfg("data.size=32", "data.resize=[36]", "data.grayscale=0.5")
videos = [("vp9", encode(i)) for i in range(3)]
reqs = requests_for(videos, cfg, views=2)
kw = dict(views=2, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=4, threads=2, grayscale=True)
decoder = ClipDecoder(**kw)
assert all(decoder.route(r) == "pyav" for r in reqs)
out, bad = decoder.decode(reqs)
assert not bad and not decoder.fallbacks
torch.save({"clips": out, "grey": [[v.grayscale for v in r.views] for r in reqs]}, sys.argv[1])
ClipDecoder(**kw, gpu=True, device_id=0).release_memory()  # a GPU host without DALI: nothing to release
for wrong in (dict(kw, ra_steps=1), dict(kw, decoder="dali")):
    try:
        ClipDecoder(**wrong)
        raise SystemExit("not refused")
    except UserError as e:
        print("refused:", e)
"""


def test_without_dali_pyav_decodes_and_torch_transforms_in_one_line(tmp_path):
    """DALI absent (its import fails in a fresh process): one log line says so, every clip goes
    through PyAV with the same crops, flips, grayscale and normalisation in torch, close to what
    the DALI graph gives; RandAugment and data.decoder=dali are refused in one line each."""
    import subprocess
    import sys

    from tests.support import REPO

    out = tmp_path / "clips.pt"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_DALI, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "DALI" in line]
    assert len(said) == 1 and "NVIDIA DALI is not available" in said[0] and "decoding every clip with PyAV" in said[0]
    refused = proc.stdout.splitlines()
    assert len(refused) == 2 and "RandAugment (data.randaugment.enabled) needs NVIDIA DALI" in refused[0]
    assert "data.decoder=dali needs NVIDIA DALI" in refused[1]

    saved = torch.load(out, weights_only=True)
    cfg = load_cfg("data.size=32", "data.resize=[36]", "data.grayscale=0.5")
    reqs = requests_for([("vp9", encode(i)) for i in range(3)], cfg, views=2)
    assert saved["grey"] == [[v.grayscale for v in r.views] for r in reqs]
    dali = ClipDecoder(
        views=2, size=32, mean=cfg.data.mean, std=cfg.data.std, batch_size=4, threads=2, grayscale=True, decoder="dali"
    )
    expected, bad = dali.decode(reqs)
    dali.close()
    assert not bad
    for x, y in zip(saved["clips"], expected):
        assert x.shape == y.shape == (2, 4, 3, 32, 32) and x.dtype == y.dtype
        # normalised units: a few levels of 255 over the CLIP std (DALI's resampling differs a little)
        assert (x - y).abs().mean().item() < 4 / 255 / 0.26, (x - y).abs().mean().item()
