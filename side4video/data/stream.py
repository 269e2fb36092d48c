"""From a shard spec to a deterministic stream of compressed samples for one rank.

    spec -> ShardSet (urls + sample counts + class names)
         -> epoch order of shards: permutation from the integers (seed, epoch)
         -> split by rank, then by worker (every worker a thread reading its own shards)
         -> tar members grouped into samples (key, video bytes, metadata); a worker streams from
            `interleave` of its shards at once, one sample from each in turn (`interleave`)
         -> shuffle buffer of compressed samples, seeded by (seed, epoch, rank, worker, pass)
         -> the workers' streams merged round-robin in worker order

Everything above is a pure function of (seed, epoch, rank, world size, workers, interleave), never of
timing or `hash()`, so an epoch can be replayed exactly: resuming mid-epoch replays the rank's
compressed stream and skips what was already consumed. Training streams are endless: after a
rank's shards are exhausted the next pass over them starts (each sample once per pass), so that
every rank can deliver the same number of batches.
"""

from __future__ import annotations

import itertools
import os
import random
import tarfile
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple

import braceexpand
import numpy as np
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import base_plus_ext

from side4video.config import DataConfig
from side4video.data import sources
from side4video.data.manifest import MANIFEST_NAME, parse_manifest
from side4video.data.sample import BadSample, Sample, sample_from_members
from side4video.data.threads import END, Handoff
from side4video.errors import UserError
from side4video.logs import get_logger
from side4video.patterns import split_outside_brackets

log = get_logger(__name__)


# ------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None
    bytes: Optional[int] = None
    # the sample keys in tar order, when the manifest lists them (make-shards writes them): where
    # an interrupted epoch's samples are is then known without reading a shard (data/remainder.py)
    keys: Optional[Tuple[str, ...]] = field(default=None, compare=False, repr=False)


@dataclass
class ShardSet:
    shards: List[Shard]
    classes: Optional[List[str]] = None
    manifest_url: Optional[str] = None

    @property
    def total_samples(self) -> Optional[int]:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else int(sum(counts))


def expand_spec(spec) -> List[str]:
    """Brace patterns, '::' or ',' separated strings, and lists of those -> a flat URL list."""
    items = list(spec) if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig" else [spec]
    urls: List[str] = []
    for item in items:
        item = str(item).strip()
        parts = [p for chunk in item.split("::") for p in split_outside_brackets(chunk)]
        for part in parts:
            if part:
                urls.extend(braceexpand.braceexpand(part))
    return urls


def _load_manifest(url: str, data_cfg: Optional[DataConfig]) -> ShardSet:
    try:
        text = sources.read_bytes(url, data_cfg)
    except (FileNotFoundError, PermissionError) as e:
        raise UserError(f"cannot read manifest {url}: {e}") from None
    manifest = parse_manifest(text, url)
    shards = [
        Shard(sources.join_url(url, s["url"]), s.get("samples"), s.get("bytes"), _keys(s.get("keys")))
        for s in manifest["shards"]
    ]
    if not shards:
        raise UserError(f"manifest {url} lists no shards")
    return ShardSet(shards, manifest.get("classes"), url)


def _keys(keys: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    return None if keys is None else tuple(keys)


def resolve_shards(spec, data_cfg: Optional[DataConfig] = None, what: str = "shard spec") -> ShardSet:
    """A shard spec (manifest URL, dataset folder, brace pattern, list) -> ShardSet.

    Sample counts come from the manifest; for a pattern or list they are looked up in a
    manifest.json beside the first shard when one exists. `data_cfg` None: the schema's defaults
    (sources.SourceOptions).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"{what} is empty: give a manifest.json URL, a brace pattern or a list of shard URLs")
    urls = expand_spec(spec)
    if not urls:
        raise UserError(f"{what} {spec!r} names no shards")
    allow_pipe = sources.SourceOptions.of(data_cfg).allow_pipe
    for url in urls:
        sources.check_url(url, allow_pipe)
    if len(urls) == 1 and urls[0].endswith(".json"):
        return _load_manifest(urls[0], data_cfg)
    if len(urls) == 1 and sources.url_kind(urls[0]) == "local" and _is_dir(urls[0]):
        folder = sources.local_path(urls[0])
        manifest = os.path.join(folder, MANIFEST_NAME)
        return resolve_shards(manifest if os.path.isfile(manifest) else _local_tars(folder), data_cfg, what)
    shards = [Shard(u) for u in urls]
    beside = _manifest_beside(urls[0], data_cfg)
    if beside is not None:
        by_url = {s.url: s for s in beside.shards}
        shards = [by_url.get(u, Shard(u)) for u in urls]
        return ShardSet(shards, beside.classes, beside.manifest_url)
    return ShardSet(shards)


def _is_dir(path: str) -> bool:
    return os.path.isdir(sources.local_path(path))


def _local_tars(folder: str) -> List[str]:
    tars = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    if not tars:
        raise UserError(f"folder {folder} holds neither {MANIFEST_NAME} nor .tar shards")
    return tars


def _manifest_beside(url: str, data_cfg: Optional[DataConfig]) -> Optional[ShardSet]:
    if sources.url_kind(url) == "pipe":
        return None
    candidate = sources.join_url(url, MANIFEST_NAME)
    try:
        if not sources.exists(candidate, data_cfg):
            return None
        return _load_manifest(candidate, data_cfg)
    except (UserError, OSError):
        return None


# --------------------------------------------------------------------------------- determinism
def seeded_rng(*ints: int) -> np.random.Generator:
    """A numpy Generator seeded from integers only (never hash())."""
    return np.random.default_rng([int(i) % (1 << 63) for i in ints])


def stable_hash(text: str) -> int:
    """A process-independent 32-bit hash of a string (for per-key seeds)."""
    return zlib.crc32(text.encode("utf-8"))


def epoch_shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    if not shuffle:
        return list(range(n))
    return [int(i) for i in seeded_rng(seed, epoch, 0x5A4D).permutation(n)]


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker thread reads: (global shard index, shard) pairs; for the sample-level
    split (too few shards for every rank) which rank keeps which sample; for the rest of an
    interrupted epoch (data/remainder.py) the keys it keeps."""

    shards: Tuple[Tuple[int, Shard], ...]
    keep_rank: Optional[int] = None
    world: int = 1
    keep_keys: Optional[FrozenSet[str]] = None

    @property
    def filters(self) -> bool:
        return self.keep_rank is not None or self.keep_keys is not None

    def keeps(self, shard_index: int, sample_index: int, key: str) -> bool:
        if self.keep_keys is not None and key not in self.keep_keys:
            return False
        return self.keep_rank is None or (shard_index + sample_index) % self.world == self.keep_rank


def plan_workers(
    shardset: ShardSet,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world: int,
    workers: int,
    allow_sample_split: bool = False,
) -> List[WorkerPlan]:
    """Split the epoch's shard order by rank, then by worker.

    Training needs at least world x workers shards (UserError otherwise). Evaluation
    (`allow_sample_split`) with fewer shards than ranks falls back to every rank reading every
    shard and keeping every world-th sample, so each sample is still seen exactly once.
    """
    n = len(shardset.shards)
    order = epoch_shard_order(n, seed, epoch, shuffle)
    indexed = [(i, shardset.shards[i]) for i in order]
    if n >= world * workers:
        mine = indexed[rank::world]
        return [WorkerPlan(tuple(mine[w::workers])) for w in range(workers)]
    if not allow_sample_split:
        raise UserError(
            f"{n} shard(s) cannot feed {world} rank(s) x {workers} worker(s) = {world * workers} readers: "
            f"make more, smaller shards (make-shards --shard-size / make-synthetic --shard-samples) "
            f"or lower data.workers"
        )
    if n >= world:
        mine = indexed[rank::world]
        used = max(1, min(workers, len(mine)))
        return [WorkerPlan(tuple(mine[w::used])) for w in range(used)]
    used = max(1, min(workers, n))
    return [WorkerPlan(tuple(indexed[w::used]), keep_rank=rank, world=world) for w in range(used)]


# ------------------------------------------------------------------------------------ bad input
class BadLog:
    """Keys of unusable samples and names of damaged shards, seen on this rank (thread-safe,
    each entry once even when an epoch is replayed)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.samples: "OrderedDict[str, str]" = OrderedDict()
        self.shards: "OrderedDict[str, str]" = OrderedDict()

    def sample(self, key: str, reason: str) -> None:
        with self._lock:
            if key not in self.samples:
                self.samples[key] = reason
                log.warning("skipping sample %s: %s", key, reason)

    def shard(self, url: str, reason: str) -> None:
        with self._lock:
            if url not in self.shards:
                self.shards[url] = reason
                log.warning("shard %s: %s", url, reason)


# ----------------------------------------------------------------------------------- one shard
_BLOCK = tarfile.BLOCKSIZE
_END_BLOCK = tarfile.NUL * _BLOCK


def _read_exact(fileobj, n: int, what: str) -> bytes:
    data = fileobj.read(n) if n else b""
    if len(data) != n:
        raise tarfile.ReadError(f"unexpected end of data in {what}")
    return data


def _pax_path(records: bytes) -> Optional[str]:
    """The `path` of a pax extended header ("LEN key=value\n" records), if it has one."""
    path, pos = None, 0
    while pos < len(records) and records[pos : pos + 1] != tarfile.NUL:
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
# Members without data blocks whatever their size field says (as tarfile reads them).
_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)
_USTAR_MAGIC = b"ustar\x00"  # POSIX ustar (GNU tar's own magic is "ustar  \0", without a name prefix)


def _octal(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or base-256 (first byte 0x80, GNU's large sizes)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(tarfile.NUL, 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid header field {field!r} in {what}") from None


def _parse_header(block: bytes) -> Tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte tar header, its checksum checked.

    Parsed here rather than by `tarfile.TarInfo.frombuf`, which builds every field and took
    two thirds of the reader's time per sample (`side4video bench stream`)."""
    name = block[:100].split(tarfile.NUL, 1)[0].decode("utf-8", "surrogateescape")
    stored = _octal(block[148:156], name or "a header")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in block if b > 127):  # old signed sums
        raise tarfile.ReadError(f"bad header checksum at {name!r}")
    if block[257:263] == _USTAR_MAGIC and block[345] != 0:
        prefix = block[345:500].split(tarfile.NUL, 1)[0].decode("utf-8", "surrogateescape")
        name = f"{prefix}/{name}"
    return name, _octal(block[124:136], name), block[156:157]


def _tar_members(fileobj) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, checked for truncation.

    Written by hand: tarfile's stream mode hands a member out in 10 KB pieces (every byte copied
    four times; the readers streamed at half a raw client's speed, `side4video bench stream`), and
    webdataset's tar_file_iterator lets a broken header escape its error handler. Here a member is
    one read; long names come from GNU 'L' entries and pax `path` records; a member cut short or a
    header with a wrong checksum raises ReadError.
    """
    long_name: Optional[str] = None
    while True:
        header = fileobj.read(_BLOCK)
        if not header or header == _END_BLOCK:
            return
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data in a header")
        name, size, kind = _parse_header(header)
        data = _read_exact(fileobj, size, name) if kind not in _NO_DATA else b""
        _read_exact(fileobj, -len(data) % _BLOCK, name)  # padding to the next block
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(tarfile.NUL).decode("utf-8", "surrogateescape")
        elif kind == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif kind in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):
            continue
        else:
            name, long_name = long_name or name, None
            if kind in _REGULAR and not name.endswith("/"):
                yield name, data


def iter_shard(
    shard: Shard,
    data_cfg: Optional[DataConfig] = None,
    bad: Optional[BadLog] = None,
    keep: Optional[Callable[[int, str], bool]] = None,
) -> Iterator[Sample]:
    """Samples of one shard in order (those `keep(position in the shard, key)` accepts). Damaged
    samples are logged in `bad` and skipped; a truncated or corrupt tar ends the shard early
    (logged); a missing shard is a UserError."""
    bad = bad if bad is not None else BadLog()
    try:
        fileobj = sources.open_url(shard.url, data_cfg)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise UserError(f"cannot read shard {shard.url}: {e}") from None
    count = 0
    position = -1
    key, members_of_key = None, {}

    def finish(k, members):
        nonlocal count, position
        position += 1
        if keep is not None and not keep(position, k):
            return None
        try:
            sample = sample_from_members(k, shard.url, members)
        except BadSample as e:
            bad.sample(e.key, e.reason)
            return None
        count += 1
        return sample

    try:
        with fileobj:
            for name, data in _tar_members(fileobj):
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if key is not None and prefix != key:
                    sample = finish(key, members_of_key)
                    if sample is not None:
                        yield sample
                    members_of_key = {}
                key = prefix
                if suffix in members_of_key:
                    bad.sample(prefix, f"duplicate member {name}")
                    continue
                members_of_key[suffix] = data
    except (tarfile.TarError, EOFError, zlib.error) as e:
        # The sample being read when the tar broke is lost: report its key with the shard.
        bad.shard(shard.url, f"damaged tar after {count} samples ({e}); the rest of the shard is skipped")
        if key is not None and members_of_key:
            bad.sample(key, "cut short by a damaged shard")
        return
    if key is not None:
        sample = finish(key, members_of_key)
        if sample is not None:
            yield sample
    if shard.samples is not None and position + 1 < shard.samples:
        bad.shard(shard.url, f"truncated: {position + 1} of {shard.samples} samples")


# ------------------------------------------------------------------------------- rank stream
PASS_END = object()  # a worker's pass over its shards is over (then the next pass, or END)


def interleave(sources: Iterable[Iterator], open_at_once: int) -> Iterator:
    """Items of several iterators (a worker's shards, in plan order) read `open_at_once` at a time,
    one item from each open one in turn; an exhausted one gives its turn to the next source.

    A pure function of the sources' lengths (never of timing), so the same call over key lists
    gives the same order (data/remainder.py simulates the stream with it). `open_at_once` 1 is
    one source after another. Shards written in class order reach the shuffle buffer already
    mixed from `open_at_once` classes (README 'Mixing')."""
    pending = iter(sources)
    slots: List[Iterator] = [iter(s) for s in itertools.islice(pending, max(1, int(open_at_once)))]
    turn = 0
    try:
        while slots:
            try:
                item = next(slots[turn])
            except StopIteration:
                following = next(pending, None)
                if following is None:
                    del slots[turn]
                    turn = turn if turn < len(slots) else 0
                else:
                    slots[turn] = iter(following)
                continue
            yield item
            turn = (turn + 1) % len(slots)
    finally:
        for slot in slots:
            close = getattr(slot, "close", None)
            if close is not None:
                close()


def shuffle_pass(items: Iterable, buffer: int, seed: int, epoch: int, rank: int, worker: int, pass_: int, layer: int):
    """One worker's pass through its shuffle buffer, seeded by integers. Layer 0 is an epoch read
    from its start; layer L > 0 the rest of an epoch after the L-th change of rank layout
    (data/remainder.py). The buffer draws depend on positions only, never on the items, so the
    same call over keys instead of samples gives the same order (remainder.py simulates it)."""
    if buffer <= 1:
        return iter(items)
    ints = (seed, epoch, rank, worker, pass_) + ((layer,) if layer else ())
    rng = random.Random(int(seeded_rng(*ints).integers(1 << 62)))
    return wds_shuffle(buffer, buffer, rng=rng)(iter(items))


def merge_round_robin(takes: Sequence[Callable[[], object]], on_empty_pass: Optional[Callable[[], None]] = None):
    """The workers' items merged one from each in worker order. `takes[w]()` returns worker w's
    next item, PASS_END after each pass, END after its last. A worker at PASS_END waits until
    all have reached theirs, so passes never mix; an all-empty pass calls `on_empty_pass`."""
    workers = len(takes)
    parked, done = [False] * workers, [False] * workers
    in_pass = 0
    while not all(done):
        for w in range(workers):
            if done[w] or parked[w]:
                continue
            item = takes[w]()
            if item is PASS_END:
                parked[w] = True
            elif item is END:
                done[w] = True
            else:
                in_pass += 1
                yield item
        if all(p or d for p, d in zip(parked, done)):
            if in_pass == 0 and on_empty_pass is not None and not all(done):
                on_empty_pass()
            parked = [False] * workers
            in_pass = 0


class RankStream:
    """The compressed samples of one rank for one epoch, merged from `workers` reader threads.

    `infinite=True` (training) starts another pass over the rank's shards when all workers have
    finished one; every sample carries its position `index` in this stream and its pass
    `occurrence`. `resampled=True` draws shards with replacement instead (always endless).
    `plans` (with `layer` > 0) reads the rest of an interrupted epoch instead (data/remainder.py).
    `interleave`: shards each reader streams from at once (`interleave()`).

    Each reader hands its samples over through its own `Handoff` (threads.py): a reader's
    exception is raised by the iteration, and `stop` (the consumer's event) or `close()` ends it
    with `threads.Closed` rather than a quiet end that would look like the end of the shards.
    """

    def __init__(
        self,
        shardset: ShardSet,
        data_cfg: Optional[DataConfig],
        *,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        interleave: int = 1,
        seed: int = 0,
        infinite: bool = False,
        resampled: bool = False,
        allow_sample_split: bool = False,
        bad: Optional[BadLog] = None,
        queue_size: int = 8,
        stop: Optional[threading.Event] = None,
        plans: Optional[List[WorkerPlan]] = None,
        layer: int = 0,
    ):
        self.shardset, self.data_cfg = shardset, data_cfg
        self.epoch, self.rank, self.world, self.seed = int(epoch), int(rank), int(world), int(seed)
        self.shuffle_buffer, self.infinite, self.resampled = int(shuffle_buffer), infinite or resampled, resampled
        self.layer = int(layer)
        self.interleave = max(1, int(interleave))
        self.bad = bad if bad is not None else BadLog()
        if plans is not None:
            self.plans = list(plans)
        elif resampled:
            self.plans = [WorkerPlan(()) for _ in range(max(1, workers))]
        else:
            self.plans = plan_workers(
                shardset,
                epoch=epoch,
                seed=seed,
                shuffle=shuffle_shards,
                rank=rank,
                world=world,
                workers=max(1, workers),
                allow_sample_split=allow_sample_split,
            )
        # `stop` is the consumer's: once it is set, the merge raises and the readers give up
        self._handoffs = [Handoff(queue_size, what="shard data", stop=stop) for _ in self.plans]
        self._started = False

    @property
    def workers(self) -> int:
        return len(self.plans)

    # -- one worker ------------------------------------------------------------------------
    def _pass_shards(self, worker: int, pass_: int) -> Sequence[Tuple[int, Shard]]:
        plan = self.plans[worker]
        if not self.resampled:
            return plan.shards
        n = len(self.shardset.shards)
        per = max(1, n // max(1, self.world * self.workers))
        picks = seeded_rng(self.seed, self.epoch, self.rank, worker, pass_, 0x2E5A).integers(0, n, size=per)
        return [(int(i), self.shardset.shards[int(i)]) for i in picks]

    def _pass_samples(self, worker: int, pass_: int) -> Iterator[Sample]:
        plan = self.plans[worker]

        def shards() -> Iterator[Iterator[Sample]]:
            for shard_index, shard in self._pass_shards(worker, pass_):
                if self._handoffs[worker].closed:
                    return
                keep = (lambda i, key, si=shard_index, p=plan: p.keeps(si, i, key)) if plan.filters else None
                yield iter_shard(shard, self.data_cfg, self.bad, keep=keep)  # opened at its first sample

        return interleave(shards(), self.interleave)

    def _produce(self, worker: int) -> None:
        """One reader: its passes, each ended by PASS_END (the hand-off adds END or the failure)."""
        out = self._handoffs[worker]
        passes = itertools.count() if self.infinite else range(1)
        for pass_ in passes:
            samples = shuffle_pass(
                self._pass_samples(worker, pass_),
                self.shuffle_buffer,
                self.seed,
                self.epoch,
                self.rank,
                worker,
                pass_,
                self.layer,
            )
            for sample in samples:
                sample.occurrence = pass_
                if not out.put(sample):
                    return
            if not out.put(PASS_END):
                return

    # -- the merge ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Sample]:
        if self._started:
            raise RuntimeError("a RankStream is iterated once")
        self._started = True
        for w, handoff in enumerate(self._handoffs):
            handoff.start(lambda w=w: self._produce(w), name=f"shard-reader-{self.rank}-{w}")
        try:
            merged = merge_round_robin([h.get for h in self._handoffs], self._empty_pass if self.infinite else None)
            for index, sample in enumerate(merged):
                sample.index = index
                yield sample
        finally:
            self.close()

    def _empty_pass(self) -> None:
        raise UserError(
            f"rank {self.rank}: its shards yielded no usable sample in a whole pass "
            f"({len(self.bad.samples)} bad samples, {len(self.bad.shards)} damaged shards)"
        )

    def close(self) -> None:
        """Stop the readers: close every hand-off first (no reader stays blocked), then join."""
        for handoff in self._handoffs:
            handoff.close(join_s=0)
        for handoff in self._handoffs:
            handoff.close(join_s=5)
