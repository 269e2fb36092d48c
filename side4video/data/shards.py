"""Writing WebDataset shards (`side4video make-shards`, make-synthetic).

Each sample is `{key}.{webm|mp4|...}` (the video bytes) + `{key}.json` (label index and name,
captions, frame count, fps, width, height, codec). make-shards plans its shards before writing
(data/parts.py: a seeded shuffle, planned shards of a sample count, part K of N); a planned
shard rolls over into a second file at a byte cap; each finished shard file is renamed into
place, or uploaded when the output is `s3://bucket/prefix`, then recorded in the part's progress
file, and `manifest.json` (shard URLs relative to it) is written by the merge. Videos are read
from a folder, s3:// or http(s):// (data/sources.py). Inputs that cannot be read, probed (or,
with validation, decoded) go to the quarantine list with the reason instead of into the shards;
progress (videos/s, ETA, quarantined) goes to the log. ShardWriter also writes a plain set of
shards + manifest in one go (make-synthetic, benchmarks).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from webdataset import TarWriter

from side4video.config import DataConfig
from side4video.data import sources, video
from side4video.data.annotations import CAPTION_FORMATS, read_annotations
from side4video.data.manifest import MANIFEST_NAME, build_manifest, dumps
from side4video.data.parts import PartProgress, merge_parts, plan_shards, shard_name
from side4video.data.sample import VIDEO_EXTS, check_key
from side4video.errors import UserError, first_line
from side4video.logs import get_logger

log = get_logger(__name__)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(text) -> int:
    """'1GB', '512MB', '64KiB', '100000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"shard size {text!r}: expected a number of bytes with an optional unit (KB, MB, GB, MiB, ...)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise UserError(f"shard size {text!r} must be positive")
    return size


class ShardWriter:
    """Tar shards of at most `max_bytes` (and/or `max_samples`) into a folder or s3:// prefix."""

    def __init__(
        self,
        out: str,
        *,
        max_bytes: Optional[int] = None,
        max_samples: Optional[int] = None,
        prefix: str = "shard",
        data_cfg: Optional[DataConfig] = None,
        name_of: Optional[Callable[[int], str]] = None,
    ):
        self.out = out.rstrip("/")
        self.kind = sources.url_kind(self.out)
        if self.kind not in ("local", "s3"):
            raise UserError(f"output {out!r}: must be a local folder or s3://bucket/prefix")
        self.max_bytes, self.max_samples, self.prefix, self.data_cfg = max_bytes, max_samples, prefix, data_cfg
        self.name_of = name_of or (lambda i: f"{prefix}-{i:06d}.tar")
        if self.kind == "local":
            os.makedirs(sources.local_path(self.out), exist_ok=True)
            self.staging = sources.local_path(self.out)
            self._tmp = None
        else:
            sources.check_s3_output(self.out, data_cfg)
            self._tmp = tempfile.TemporaryDirectory(prefix="side4video-shards-")
            self.staging = self._tmp.name
        self.shards: List[Dict[str, Any]] = []
        self.keys = set()
        self._shard_keys: List[str] = []  # the open shard's, in order (the manifest lists them)
        self._tar = None
        self._file = None
        self._count = 0
        self._bytes = 0

    def _name(self) -> str:
        return self.name_of(len(self.shards))

    def _open(self) -> None:
        self._partial = os.path.join(self.staging, self._name() + ".partial")
        self._file = open(self._partial, "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=0)
        self._shard_keys = []
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        name = self._name()
        final = os.path.join(self.staging, name)
        os.replace(self._partial, final)
        size = os.path.getsize(final)
        if self.kind == "s3":
            try:
                sources.put_file(final, f"{self.out}/{name}", self.data_cfg)
            except Exception as e:
                raise UserError(f"cannot upload {name} to {self.out}: {e}") from None
            os.remove(final)
        self.shards.append({"url": name, "samples": self._count, "bytes": size, "keys": self._shard_keys})
        self._tar = self._file = None

    def write(self, key: str, video_bytes: bytes, ext: str, meta: Dict[str, Any]) -> None:
        check_key(key)
        if key in self.keys:
            raise UserError(f"duplicate sample key {key!r}")
        if ext not in VIDEO_EXTS:
            raise UserError(f"{key}: video extension {ext!r} not one of {', '.join(VIDEO_EXTS)}")
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        size = len(video_bytes) + len(meta_bytes) + 3 * 512
        if (
            self._tar is not None
            and self._count
            and (
                (self.max_bytes and self._bytes + size > self.max_bytes)
                or (self.max_samples and self._count >= self.max_samples)
            )
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, ext: video_bytes, "json": meta_bytes})
        self.keys.add(key)
        self._shard_keys.append(key)
        self._count += 1
        self._bytes += size

    def finish(self) -> List[Dict[str, Any]]:
        """Finish the last shard (no manifest: make-shards records shards per part); the shards."""
        self._finish()
        if self._tmp is not None:
            self._tmp.cleanup()
        return self.shards

    def close(
        self, classes: Optional[Sequence[str]], quarantine: Sequence[Dict[str, str]], fmt: str, **extra: Any
    ) -> Dict[str, Any]:
        """Finish the last shard and write manifest.json; returns the manifest."""
        self._finish()
        manifest = build_manifest(self.shards, classes, quarantine, fmt, **extra)
        text = dumps(manifest)
        if self.kind == "local":
            path = os.path.join(self.staging, MANIFEST_NAME)
            with open(path + ".partial", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(path + ".partial", path)
        else:
            path = os.path.join(self.staging, MANIFEST_NAME)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            try:
                sources.put_file(path, f"{self.out}/{MANIFEST_NAME}", self.data_cfg)
            except Exception as e:
                raise UserError(f"cannot upload {MANIFEST_NAME} to {self.out}: {e}") from None
            self._tmp.cleanup()
        return manifest


def sample_metadata(
    info: video.VideoInfo, label: int, label_name: Optional[str], captions: Sequence[str]
) -> Dict[str, Any]:
    return {
        "label": int(label),
        "label_name": label_name,
        "captions": list(captions),
        "frames": info.frames,
        "fps": round(info.fps, 3),
        "width": info.width,
        "height": info.height,
        "codec": info.codec,
    }


def prepare_entry(args) -> Dict[str, Any]:
    """Read (and optionally transcode and validate) one input video; runs in worker processes."""
    entry, validate, transcode, short_side = args
    if entry.path is None:
        return {"key": entry.key, "path": entry.rel, "error": "video file not found"}
    try:
        if sources.url_kind(entry.path) == "local":
            with open(entry.path, "rb") as f:
                data = f.read()
        else:  # s3:// or http(s)://: the loader's retrying readers
            data = sources.read_bytes(entry.path)
    except (OSError, UserError) as e:
        return {"key": entry.key, "path": entry.rel, "error": f"cannot read: {first_line(e)}"}
    try:
        if transcode and transcode != "none":
            data = video.transcode(data, transcode, short_side=short_side)
        info = video.probe(data)
        if validate:
            decoded = video.decode_all(data)
            if decoded < info.frames:
                info.frames = decoded  # packets that do not decode are not frames
    except video.VideoError as e:
        return {"key": entry.key, "path": entry.rel, "error": str(e)}
    ext = video.CODECS[transcode][2] if transcode and transcode != "none" else video.guess_extension(info, entry.path)
    return {
        "key": entry.key,
        "path": entry.rel,
        "video": data,
        "ext": ext,
        "meta": sample_metadata(info, entry.label, entry.label_name, entry.captions),
    }


def _map(fn, items: Sequence, workers: int) -> Iterable:
    """In-order results, in worker processes when workers > 1.

    Forked: the workers only run PyAV and numpy (no torch, no CUDA, no boto3: uploads stay in the
    parent), and forking costs milliseconds where spawning re-imports the stack for seconds."""
    if workers <= 1 or len(items) <= 1:
        return map(fn, items)
    pool = mp.get_context("fork").Pool(processes=workers, initializer=sources.forget_clients)

    def gen():
        try:
            yield from pool.imap(fn, items, chunksize=1)
        finally:
            pool.terminate()
            pool.join()

    return gen()


class _Meter:
    """Progress lines in the task's log: videos done, videos/s, ETA, quarantined (every `every_s`)."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.done = self.quarantined = 0
        self.t0 = self.last = time.monotonic()

    def update(self, quarantined: bool) -> None:
        self.done += 1
        self.quarantined += int(quarantined)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.t0)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = "?" if eta == float("inf") else f"{int(eta) // 3600}:{int(eta) // 60 % 60:02d}:{int(eta) % 60:02d}"
        return (
            f"{self.what}: {self.done}/{self.total} videos, {rate:.2f} videos/s, ETA {eta_text}, "
            f"{self.quarantined} quarantined"
        )


def make_shards(
    list_file: str,
    fmt: str,
    root: str,
    out: str,
    labels: Optional[str] = None,
    split: Optional[str] = None,
    shard_size="1GB",
    workers: int = 1,
    validate: bool = False,
    transcode: str = "none",
    short_side: int = 0,
    progress: bool = True,
    data_cfg: Optional[DataConfig] = None,
    captions: Optional[str] = None,
    allow_missing: bool = False,
    shard_samples: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    part: Optional[int] = None,
    parts: int = 1,
) -> Dict[str, Any]:
    """Annotation list + video root (folder, s3:// or http(s)://) -> shards + manifest.json in
    `out` (folder or s3://).

    The entries are shuffled (seeded; `shuffle=False` keeps list order) and planned into shards of
    `shard_samples` before anything is written (data/parts.py); `shard_size` caps a shard's bytes
    (a planned shard over it continues in a second file). `part`/`parts`: write only part `part`
    of `parts` (independent tasks; `merge_parts` then writes the manifest) and return its record;
    without `part` the whole plan is written and merged. A rerun keeps every finished shard.

    Caption datasets (retrieval) refuse a list naming videos that are not under `root`, since a
    test set with videos left out ranks differently; `allow_missing` quarantines them instead, as
    the other formats always do.
    """
    from tqdm import tqdm

    if transcode not in ("none", "vp9", "h264"):
        raise UserError(f"--transcode {transcode!r}: allowed none, vp9, h264")
    if short_side and transcode == "none":
        raise UserError("--short-side needs --transcode vp9 or h264 (resizing re-encodes the video)")
    parts = int(parts)
    if parts < 1 or (part is not None and not 0 <= int(part) < parts):
        raise UserError(f"--part {part} --parts {parts}: need 0 <= part < parts")
    whole = part is None
    part = 0 if whole else int(part)
    max_bytes = parse_size(shard_size)
    if sources.url_kind(out) not in ("local", "s3"):
        raise UserError(f"output {out!r}: must be a local folder or s3://bucket/prefix")
    if sources.url_kind(out) == "s3":
        sources.check_s3_output(out, data_cfg)
    entries, classes = read_annotations(fmt, list_file, root, labels, split, captions)
    if not entries:
        raise UserError(f"{list_file}: no videos listed" + (f" for split {split!r}" if split else ""))
    missing = [e.rel for e in entries if e.path is None]
    if missing and fmt in CAPTION_FORMATS and not allow_missing:
        raise UserError(
            f"{list_file} names {len(missing)} videos not found under {root} (e.g. "
            f"{', '.join(missing[:3])}); pass --allow-missing to leave them out"
        )
    plan = plan_shards(entries, int(shard_samples), int(seed), bool(shuffle))
    prefix = split or "shard"
    settings = {
        "format": fmt,
        "split": split,
        "prefix": prefix,
        "classes": list(classes) if classes is not None else None,
        "plan": plan.digest(),
        "planned_shards": len(plan.units),
        "duplicates": plan.duplicates,
        "shard_samples": int(shard_samples),
        "shard_bytes": max_bytes,
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "transcode": transcode,
        "short_side": int(short_side),
        "validate": bool(validate),
    }
    record = PartProgress(out, part, parts, settings, data_cfg)
    mine = plan.of_part(part, parts)
    todo = [u for u in mine if not record.finished(u)]
    what = "make-shards" if whole else f"make-shards part {part} of {parts}"
    total = sum(len(plan.units[u]) for u in todo)
    log.info(
        "%s: %d planned shards of %d videos, %d finished before (kept), %d videos to write",
        what,
        len(mine),
        sum(len(plan.units[u]) for u in mine),
        len(mine) - len(todo),
        total,
    )
    jobs = [(e, validate, transcode, short_side) for u in todo for e in plan.units[u]]
    results = iter(_map(prepare_entry, jobs, max(1, int(workers))))
    bar = tqdm(total=total, desc=what, unit="video", disable=not progress)
    meter = _Meter(what, total)
    for u in todo:
        writer = ShardWriter(
            out, max_bytes=max_bytes, prefix=prefix, data_cfg=data_cfg, name_of=lambda i, u=u: shard_name(prefix, u, i)
        )
        quarantine: List[Dict[str, str]] = []
        for _ in plan.units[u]:
            result = next(results)
            bar.update(1)
            meter.update("error" in result)
            if "error" in result:
                log.warning("quarantined %s: %s", result["path"], result["error"])
                quarantine.append({"key": result["key"], "path": result["path"], "reason": result["error"]})
                continue
            writer.write(result["key"], result["video"], result["ext"], result["meta"])
        record.record(u, writer.finish(), quarantine)
    bar.close()
    record.complete()
    log.info("%s (finished)", meter.line())
    if whole:
        try:
            return merge_parts(out, data_cfg)
        except UserError as e:
            if "no usable video" not in str(e):
                raise
            first = next((q for r in record.units.values() for q in r["quarantine"]), plan.duplicates[:1] or [{}])
            raise UserError(
                f"no usable video among {len(entries)} listed (first quarantined: "
                f"{first.get('path')}: {first.get('reason')})"
            ) from None
    units = {u: record.units[u] for u in mine}
    return {
        "part": part,
        "parts": parts,
        "shards": [s for u in mine for s in units[u]["shards"]],
        "quarantine": [q for u in mine for q in units[u]["quarantine"]],
    }
