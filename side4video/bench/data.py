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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import av
import numpy as np
import torch

from side4video.config import Config, load_config
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


def _from_shards(cfg: Config, clips: int) -> List[bytes]:
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


def _best_rate(one_pass: Callable[[], int], passes: int) -> Tuple[float, List[float]]:
    """Clips/s of the fastest of `passes` timed passes (other processes on a shared host only
    ever slow a pass down), and every pass's rate."""
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        n = one_pass()
        rates.append(n / (time.perf_counter() - start))
    return max(rates), [round(r, 2) for r in rates]


def _dali_pass(decoder: ClipDecoder, requests: List[ClipRequest], batch: int) -> Callable[[], int]:
    def one_pass() -> int:
        n = 0
        for i in range(0, len(requests), batch):
            results, bad = decoder.decode(requests[i : i + batch])
            if bad:
                raise RuntimeError(f"bench data: DALI failed on {bad[0]}")
            n += len(results)
        return n

    return one_pass


def _dali_decode_only_pass(requests: List[ClipRequest], batch: int, threads: int, gpu: bool) -> Callable[[], int]:
    """fn.decoders.video alone (no resize, no normalisation): the decoder against PyAV's."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch,
        num_threads=threads,
        device_id=torch.cuda.current_device() if gpu else None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=indices)

    pipe = graph()
    pipe.build()

    def one_pass() -> int:
        for i in range(0, len(requests), batch):
            chunk = requests[i : i + batch]
            pipe.feed_input("encoded", [np.frombuffer(r.video, dtype=np.uint8) for r in chunk])
            pipe.feed_input("indices", [r.indices for r in chunk])
            pipe.run()
        return len(requests)

    return one_pass


def _pyav_pass(videos: List[bytes], indices: List[np.ndarray]) -> Callable[[], int]:
    def one_pass() -> int:
        for data, idx in zip(videos, indices):
            frames = _pyav_plain(data, idx)
            assert len(frames) == len(set(idx.tolist()))
        return len(videos)

    return one_pass


def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    cfg = load_config(config, list(overrides))
    d = cfg.data
    os.makedirs(out, exist_ok=True)
    if quick:
        clips, frames_in_video, width, height, passes = 8, 24, 128, 96, 2
    else:
        clips, frames_in_video, width, height, passes = 48, 96, 320, 240, 5
    if config is not None and d.train.shards:
        videos, source = _from_shards(cfg, clips), f"data.train.shards={d.train.shards}"
    else:
        t0 = time.perf_counter()
        videos = _generated(clips, frames_in_video, width, height)
        made_s = time.perf_counter() - t0
        source = f"generated VP9 WebM, {frames_in_video} frames at {width}x{height} ({made_s:.1f}s to make)"
    infos = [probe(v) for v in videos]
    size, T = (min(int(d.size), 112) if quick else int(d.size)), int(d.frames)
    batch = max(1, int(cfg.train.batch_size))
    threads = int(d.decode_threads)
    indices = [np.concatenate(eval_indices(info.frames, T, d.sampling, int(d.dense_stride), 1)) for info in infos]
    requests = [
        ClipRequest(f"clip{i}", v, info.codec, idx, A.eval_views(info.height, info.width, d, 1), info)
        for i, (v, info, idx) in enumerate(zip(videos, infos, indices))
    ]
    gpu = gpu_available()

    log.info(
        "bench data: %d clips, %d frames each, DALI (%s, %d threads) vs plain PyAV, best of %d passes",
        len(videos),
        T,
        "mixed" if gpu else "cpu",
        threads,
        passes,
    )
    dali = ClipDecoder(
        views=1, size=size, mean=list(d.mean), std=list(d.std), batch_size=batch, threads=threads, decoder="dali"
    )
    dali.decode(requests[:batch])  # builds the pipeline: not timed
    pyav_pass = _pyav_pass(videos, indices)
    pyav_pass()  # warm-up: codecs loaded, files in cache
    decode_only = _dali_decode_only_pass(requests, batch, threads, gpu)
    decode_only()
    # Interleaved passes: a busy spell of the host hits all paths alike.
    rates: Dict[str, List[float]] = {"dali": [], "pyav": [], "dali_decode_only": []}
    for _ in range(passes):
        for name, fn_pass in (
            ("dali", _dali_pass(dali, requests, batch)),
            ("pyav", pyav_pass),
            ("dali_decode_only", decode_only),
        ):
            rates[name].append(_best_rate(fn_pass, 1)[0])
    dali.close()
    dali_cps, pyav_cps, decode_cps = max(rates["dali"]), max(rates["pyav"]), max(rates["dali_decode_only"])

    # The training path: random resized crop, flip, RandAugment m7-n4-mstd0.5, 2 views per clip.
    aug_cfg = load_config(config, list(overrides) + ["data.randaugment.enabled=true", "data.flip=true"])
    train_requests = []
    for i, (v, info) in enumerate(zip(videos, infos)):
        views = [A.train_view(seeded_rng(0, 0, i, 1 + r), info.height, info.width, aug_cfg.data) for r in range(2)]
        idx = train_indices(info.frames, T, d.sampling, int(d.dense_stride), seeded_rng(0, 0, i))
        train_requests.append(ClipRequest(f"clip{i}", v, info.codec, idx, views, info))
    aug = ClipDecoder(
        views=2,
        size=size,
        mean=list(d.mean),
        std=list(d.std),
        batch_size=batch,
        threads=threads,
        decoder="dali",
        ra_steps=int(aug_cfg.data.randaugment.num_ops),
    )
    aug.decode(train_requests[:batch])
    aug_cps, aug_rates = _best_rate(_dali_pass(aug, train_requests, batch), max(1, passes // 2))
    aug.close()

    report = {
        "dali_clips_per_s": round(dali_cps, 2),
        "pyav_clips_per_s": round(pyav_cps, 2),
        "dali_speedup": round(dali_cps / pyav_cps, 2),
        "dali_decode_only_clips_per_s": round(decode_cps, 2),
        "dali_train_aug_clips_per_s": round(aug_cps, 2),
        "pass_rates": {**{k: [round(r, 2) for r in v] for k, v in rates.items()}, "dali_train_aug": aug_rates},
        "clips": len(videos),
        "passes": passes,
        "frames_per_clip": T,
        "output_size": size,
        "batch_size": batch,
        "decode_threads": threads,
        "dali_device": "mixed" if gpu else "cpu",
        "source": source,
        "video": {
            "codec": infos[0].codec,
            "frames": infos[0].frames,
            "width": infos[0].width,
            "height": infos[0].height,
        },
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
        f"{r['clips']} clips; {r['frames_per_clip']} frames sampled per clip (TSN centre) from {v['codec']} videos of "
        f"{v['frames']} frames at {v['width']}x{v['height']}; source: {r['source']}.",
        f"Host: {r['host']['cpus']} CPUs ({r['host']['machine']}); DALI device '{r['dali_device']}', "
        f"{r['decode_threads']} threads, batch {r['batch_size']}. Each figure is the fastest of {r['passes']} "
        f"interleaved passes over all clips (every pass: `pass_rates` in data.json).",
        "",
        "| path | what it does | clips/s |",
        "|---|---|---|",
        f"| DALI (the loader's path) | decode the chosen frames + resize/crop to {r['output_size']} + normalise | "
        f"{r['dali_clips_per_s']} |",
        f"| PyAV (plain) | decode up to the last chosen frame, RGB arrays, 1 thread | {r['pyav_clips_per_s']} |",
        f"| DALI decoder alone | fn.decoders.video, no resize or normalisation | {r['dali_decode_only_clips_per_s']} |",
        f"| DALI, training augmentation | + random resized crop, flip, RandAugment n4 m7, 2 views | "
        f"{r['dali_train_aug_clips_per_s']} |",
        "",
        f"DALI path / plain PyAV: {r['dali_speedup']}x.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _write_plot(r: Dict, path: str) -> None:
    from side4video.engine.plots import pyplot

    plt = pyplot()
    if plt is None:
        return

    names = ["DALI\n(loader path)", "PyAV\n(plain)", "DALI decoder\nalone", "DALI + train\naug (2 views)"]
    values = [
        r["dali_clips_per_s"],
        r["pyav_clips_per_s"],
        r["dali_decode_only_clips_per_s"],
        r["dali_train_aug_clips_per_s"],
    ]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(names, values, color=["#2a7", "#888", "#7c9", "#6a5"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.1f}", ha="center", va="bottom")
    v = r["video"]
    ax.set_ylabel("clips / s")
    ax.set_title(
        f"{r['frames_per_clip']} frames/clip from {v['width']}x{v['height']} {v['codec']}, {r['host']['cpus']} CPUs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
