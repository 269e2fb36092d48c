"""`side4video bench data`: clips per second through the DALI path against a plain PyAV decode.

Both decode the same samples at the same frame indices (TSN centre sampling, data.frames
frames per clip), one after the other in one run:
- dali:  the loader's decoder (fn.decoders.video on bytes, device 'mixed' on a GPU host else
         'cpu', data.decode_threads threads) + resize/centre crop to data.size + normalisation,
         batches of train.batch_size;
- pyav:  a plain single-threaded PyAV loop: open, decode up to the last wanted frame, convert
         the wanted frames to RGB arrays (no resizing);
- dali_train_aug: the DALI path with the training augmentation (random resized crop, flip,
         RandAugment m7-n4, 2 repeated views) for reference.

Without --config the videos are generated: 48 VP9 WebM clips of 96 frames at 320x240 (--quick:
8 clips of 24 frames at 128x96, output at most 112 px). With --config the first clips of data.train.shards are used.
Writes OUT/data.json, OUT/data.md and OUT/data.png.
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from typing import Dict, List, Sequence

import av
import numpy as np

from side4video.config import load_config
from side4video.data import augment as A
from side4video.data.decode import ClipDecoder, ClipRequest, gpu_available
from side4video.data.sampling import eval_indices, train_indices
from side4video.data.stream import RankStream, resolve_shards, seeded_rng
from side4video.data.synthetic import render_clip
from side4video.data.video import encode_frames, probe
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)


def _generated(clips: int, frames: int, width: int, height: int) -> List[bytes]:
    """Motion clips rendered square and cropped/padded to width x height."""
    out = []
    side = max(width, height)
    for i in range(clips):
        video, _ = render_clip(i % 8, np.random.default_rng([7, i]), frames, side)
        out.append(encode_frames([f[:height, :width] for f in video], codec="vp9", fps=25, keyframe_interval=32))
    return out


def _from_shards(cfg, clips: int) -> List[bytes]:
    shardset = resolve_shards(cfg.data.train.shards, cfg.data, what="data.train.shards")
    stream = RankStream(shardset, cfg.data, epoch=0, shuffle_shards=False, infinite=False)
    videos = []
    try:
        for sample in stream:
            videos.append(sample.video)
            if len(videos) >= clips:
                break
    finally:
        stream.close()
    if not videos:
        raise UserError("bench data: data.train.shards yielded no samples")
    return videos


def _pyav_plain(data: bytes, indices: Sequence[int]) -> List[np.ndarray]:
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    frames = []
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    return frames


def _time_dali(decoder: ClipDecoder, requests: List[ClipRequest], batch: int, repeats: int) -> float:
    decoder.decode(requests[:batch])  # builds the pipeline; not timed
    start = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(0, len(requests), batch):
            results, bad = decoder.decode(requests[i:i + batch])
            if bad:
                raise RuntimeError(f"bench data: DALI failed on {bad[0]}")
            n += len(results)
    return n / (time.perf_counter() - start)


def _time_pyav(videos: List[bytes], indices: List[np.ndarray], repeats: int) -> float:
    _pyav_plain(videos[0], indices[0])  # warm-up
    start = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for data, idx in zip(videos, indices):
            frames = _pyav_plain(data, idx)
            assert len(frames) == len(set(idx.tolist()))
            n += 1
    return n / (time.perf_counter() - start)


def run(out: str, config=None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    cfg = load_config(config, list(overrides))
    d = cfg.data
    os.makedirs(out, exist_ok=True)
    if quick:
        clips, frames_in_video, width, height, repeats = 8, 24, 128, 96, 1
    else:
        clips, frames_in_video, width, height, repeats = 48, 96, 320, 240, 2
    if config is not None and d.train.shards:
        videos, source = _from_shards(cfg, clips), f"data.train.shards={d.train.shards}"
    else:
        t0 = time.perf_counter()
        videos = _generated(clips, frames_in_video, width, height)
        source = f"generated VP9 WebM, {frames_in_video} frames at {width}x{height} ({time.perf_counter() - t0:.1f}s to make)"
    infos = [probe(v) for v in videos]
    size, T = (min(int(d.size), 112) if quick else int(d.size)), int(d.frames)
    batch = max(1, int(cfg.train.batch_size))
    threads = int(d.decode_threads)
    indices = [np.concatenate(eval_indices(info.frames, T, d.sampling, int(d.dense_stride), 1)) for info in infos]
    requests = [ClipRequest(f"clip{i}", v, info.codec, idx, A.eval_views(info.height, info.width, d, 1))
                for i, (v, info, idx) in enumerate(zip(videos, infos, indices))]
    gpu = gpu_available()

    log.info("bench data: %d clips, %d frames each, DALI (%s, %d threads) vs plain PyAV", len(videos), T,
             "mixed" if gpu else "cpu", threads)
    dali = ClipDecoder(views=1, size=size, mean=list(d.mean), std=list(d.std), batch_size=batch, threads=threads,
                       decoder="dali")
    dali_cps = _time_dali(dali, requests, batch, repeats)
    dali.close()
    pyav_cps = _time_pyav(videos, indices, repeats)

    # The training path: random resized crop, flip, RandAugment m7-n4-mstd0.5, 2 views per clip.
    aug_cfg = load_config(config, list(overrides) + ["data.randaugment.enabled=true", "data.flip=true"])
    train_requests = []
    for i, (v, info) in enumerate(zip(videos, infos)):
        views = [A.train_view(seeded_rng(0, 0, i, 1 + r), info.height, info.width, aug_cfg.data) for r in range(2)]
        idx = train_indices(info.frames, T, d.sampling, int(d.dense_stride), seeded_rng(0, 0, i))
        train_requests.append(ClipRequest(f"clip{i}", v, info.codec, idx, views))
    aug = ClipDecoder(views=2, size=size, mean=list(d.mean), std=list(d.std), batch_size=batch, threads=threads,
                      decoder="dali", ra_steps=int(aug_cfg.data.randaugment.num_ops))
    aug_cps = _time_dali(aug, train_requests, batch, 1)
    aug.close()

    report = {
        "dali_clips_per_s": round(dali_cps, 2),
        "pyav_clips_per_s": round(pyav_cps, 2),
        "dali_speedup": round(dali_cps / pyav_cps, 2),
        "dali_train_aug_clips_per_s": round(aug_cps, 2),
        "clips": len(videos),
        "repeats": repeats,
        "frames_per_clip": T,
        "output_size": size,
        "batch_size": batch,
        "decode_threads": threads,
        "dali_device": "mixed" if gpu else "cpu",
        "source": source,
        "video": {"codec": infos[0].codec, "frames": infos[0].frames, "width": infos[0].width,
                  "height": infos[0].height},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "quick": bool(quick),
    }
    with open(os.path.join(out, "data.json"), "w") as f:
        json.dump(report, f, indent=2)
    _write_markdown(report, os.path.join(out, "data.md"))
    _write_plot(report, os.path.join(out, "data.png"))
    log.info("bench data: DALI %.1f clips/s, PyAV %.1f clips/s -> %s", dali_cps, pyav_cps, out)
    return report


def _write_markdown(r: Dict, path: str) -> None:
    v = r["video"]
    lines = [
        "# Data benchmark: clips per second",
        "",
        f"{r['clips']} clips x {r['repeats']} pass(es); {r['frames_per_clip']} frames sampled per clip (TSN centre) "
        f"from {v['codec']} videos of {v['frames']} frames at {v['width']}x{v['height']}; source: {r['source']}.",
        f"Host: {r['host']['cpus']} CPUs ({r['host']['machine']}); DALI device '{r['dali_device']}', "
        f"{r['decode_threads']} threads, batch {r['batch_size']}.",
        "",
        "| path | what it does | clips/s |",
        "|---|---|---|",
        f"| DALI | decode chosen frames + resize/crop to {r['output_size']} + normalise | {r['dali_clips_per_s']} |",
        f"| PyAV (plain) | decode up to the last chosen frame, RGB arrays, 1 thread | {r['pyav_clips_per_s']} |",
        f"| DALI, training augmentation | + random resized crop, flip, RandAugment n4 m7, 2 views | "
        f"{r['dali_train_aug_clips_per_s']} |",
        "",
        f"DALI / PyAV: {r['dali_speedup']}x.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _write_plot(r: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["DALI", "PyAV (plain)", "DALI + train aug\n(2 views)"]
    values = [r["dali_clips_per_s"], r["pyav_clips_per_s"], r["dali_train_aug_clips_per_s"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bars = ax.bar(names, values, color=["#2a7", "#888", "#6a5"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.1f}", ha="center", va="bottom")
    v = r["video"]
    ax.set_ylabel("clips / s")
    ax.set_title(f"{r['frames_per_clip']} frames/clip from {v['width']}x{v['height']} {v['codec']}, "
                 f"{r['host']['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
