"""Stream every sample of a shard spec and report what is there (`side4video inspect SPEC`).

Every sample is read (any URL kind) and probed (container, codec, frame count, size); with
`decode=True` every video is also decoded through the configured pipeline (DALI or PyAV by codec,
test-time sampling and crops). The report counts samples per class, frame-count and size ranges,
codecs, and lists undecodable samples and damaged shards; and how mixed the shards are (distinct
classes per shard, the largest class's share of a shard), with a warning when shards are nearly
single-class (then training batches mix only through data.interleave and the shuffle buffer).
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Optional

import numpy as np

from side4video.config import DataConfig
from side4video.data import augment as A
from side4video.data.decode import ClipDecoder, ClipRequest
from side4video.data.sampling import eval_indices
from side4video.data.stream import BadLog, RankStream, resolve_shards
from side4video.data.video import VideoError, probe


def _range(values: List[float]) -> Optional[Dict[str, float]]:
    return {"min": min(values), "max": max(values)} if values else None


# a warning when the average shard's largest class holds more than this share of it
SINGLE_CLASS_SHARE = 0.8


def shard_mixing(labels_per_shard: Dict[str, List[int]]) -> Optional[Dict[str, Any]]:
    """Distinct classes per shard and the largest class's share of a shard (min, mean, max over
    labelled shards); `nearly_single_class` when the mean share passes SINGLE_CLASS_SHARE."""
    distinct, share = [], []
    for labels in labels_per_shard.values():
        labelled = [x for x in labels if x >= 0]
        if not labelled:
            continue
        counts = collections.Counter(labelled)
        distinct.append(len(counts))
        share.append(max(counts.values()) / len(labelled))
    if not distinct:
        return None

    def stats(values):
        return {"min": min(values), "mean": round(float(np.mean(values)), 3), "max": max(values)}

    return {
        "distinct_classes": stats(distinct),
        "largest_class_share": stats(share),
        "nearly_single_class": bool(np.mean(share) > SINGLE_CLASS_SHARE),
    }


def inspect_shards(
    spec, data: DataConfig, batch_size: int, decode: bool = False, progress: bool = True
) -> Dict[str, Any]:
    """Report on every sample of `spec` (see module doc). `data`: the config's data section (s3,
    decoder, frames, size, workers, ...); `batch_size`: clips decoded together."""
    from tqdm import tqdm

    d = data
    shardset = resolve_shards(spec, d, what="inspect SPEC")
    bad = BadLog()
    stream = RankStream(
        shardset,
        d,
        epoch=0,
        workers=min(int(d.workers), len(shardset.shards)),
        shuffle_shards=False,
        infinite=False,
        bad=bad,
    )
    classes: Dict[str, int] = collections.Counter()
    labels_per_shard: Dict[str, List[int]] = collections.defaultdict(list)
    codecs: Dict[str, int] = collections.Counter()
    frames, widths, heights = [], [], []
    samples = 0
    total_bytes = 0
    decoder = None
    pending: List[ClipRequest] = []
    batch = max(1, int(batch_size))

    def flush():
        nonlocal pending
        if pending:
            _, failed = decoder.decode(pending)
            for key, reason in failed:
                bad.sample(key, reason)
            pending = []

    if decode:
        decoder = ClipDecoder(
            views=1,
            size=int(d.size),
            mean=list(d.mean),
            std=list(d.std),
            batch_size=batch,
            threads=int(d.decode_threads),
            decoder=d.decoder,
        )
    bar = tqdm(total=shardset.total_samples, desc="inspect", unit="sample", disable=not progress)
    try:
        for sample in stream:
            bar.update(1)
            samples += 1
            total_bytes += len(sample.video)
            name = sample.label_name or (
                shardset.classes[sample.label]
                if shardset.classes and 0 <= sample.label < len(shardset.classes)
                else str(sample.label)
            )
            classes[name] += 1
            labels_per_shard[sample.url].append(int(sample.label))
            try:
                info = probe(sample.video)
            except VideoError as e:
                bad.sample(sample.key, f"undecodable video ({e})")
                continue
            codecs[info.codec] += 1
            frames.append(info.frames)
            widths.append(info.width)
            heights.append(info.height)
            if decoder is not None:
                idx = np.concatenate(eval_indices(info.frames, int(d.frames), d.sampling, int(d.dense_stride), 1))
                pending.append(
                    ClipRequest(
                        sample.key, sample.video, info.codec, idx, A.eval_views(info.height, info.width, d, 1), info
                    )
                )
                if len(pending) >= batch:
                    flush()
        if decoder is not None:
            flush()
    finally:
        bar.close()
        stream.close()
        if decoder is not None:
            decoder.close()
    return {
        "spec": spec if isinstance(spec, str) else list(spec),
        "shards": len(shardset.shards),
        "manifest_samples": shardset.total_samples,
        "samples": samples,
        "decoded": bool(decode),
        "bad_samples": list(bad.samples.keys()),
        "bad_reasons": dict(bad.samples),
        "damaged_shards": dict(bad.shards),
        "classes": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "mixing": shard_mixing(labels_per_shard),
        "codecs": dict(codecs),
        "frames": _range(frames),
        "width": _range(widths),
        "height": _range(heights),
        "bytes": total_bytes,
    }
