"""The rest of an interrupted training epoch, read exactly when the rank layout changed.

A rank's stream is a pure function of (seed, epoch, rank, world size, workers, interleave, shuffle
buffer, shard order) and of the shards' key lists (stream.py), so the samples a run consumed before it
stopped follow from every rank's saved stream position alone, without reading a video:

    layer 0: the epoch's streams in the first layout; rank r consumed the first positions[r]
             samples of its stream (keys, replayed through the same shuffle and merge)
    rest:    every key of the epoch not consumed, in the epoch's shard order
    layer 1: the rest split in contiguous, equal runs over the new ranks (shards read in order,
             a rank's shards shared by its workers, each keeping only its run's keys); its
             streams shuffle and merge like any other
    layer L: a further change of layout while layer L-1 was read; the same again

A checkpoint's data state holds the layers before the current one (`Layer`: its layout and every
rank's position); the current layer's stream is replayed and skipped as in a plain resume. The
next epoch starts from its beginning in the current layout. Nothing of this is in webdataset,
torchdata or DALI: their streamed readers resume approximately or only in the same layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from side4video.config import DataConfig
from side4video.data.stream import (
    PASS_END,
    BadLog,
    ShardSet,
    WorkerPlan,
    epoch_shard_order,
    interleave,
    iter_shard,
    merge_round_robin,
    plan_workers,
    shuffle_pass,
)
from side4video.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ShardKeys:
    """Every shard's sample keys in tar order, and the shard of each key."""

    of_shard: Sequence[Tuple[str, ...]]
    shard_of: Dict[str, int]

    @classmethod
    def of(cls, per_shard: Sequence[Tuple[str, ...]]) -> "ShardKeys":
        return cls(per_shard, {key: shard for shard, keys in enumerate(per_shard) for key in keys})


@dataclass(frozen=True)
class StreamLayout:
    """What the order of a rank's training stream depends on besides the epoch."""

    world_size: int
    workers: int
    seed: int
    shuffle_buffer: int
    shuffle_shards: bool
    interleave: int = 1  # shards a reader streams from at once (states before it read one at a time)

    @classmethod
    def of(cls, data: DataConfig, world_size: int) -> "StreamLayout":
        return cls(
            int(world_size),
            int(data.workers),
            int(data.seed),
            int(data.shuffle_buffer),
            bool(data.shuffle_shards),
            int(data.interleave),
        )

    @classmethod
    def saved(cls, state: Dict[str, Any], current: "StreamLayout") -> "StreamLayout":
        """The layout a loader state was written in (fields older states lack: the current ones,
        except `interleave`: 1, how they were read)."""
        fields = {**asdict(current), "interleave": 1}
        return cls(**{name: type(value)(state.get(name, value)) for name, value in fields.items()})

    def describe(self) -> str:
        return f"{self.world_size} rank(s) x {self.workers} worker(s)"


@dataclass(frozen=True)
class Layer:
    """A layout an epoch was read in before the current one, and how far each rank got."""

    layout: StreamLayout
    positions: Tuple[int, ...]  # stream position of every rank, in rank order

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self.layout), "positions": list(self.positions)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Layer":
        fields = {k: d[k] for k in ("world_size", "workers", "seed", "shuffle_buffer", "shuffle_shards")}
        return cls(
            StreamLayout(**fields, interleave=int(d.get("interleave", 1))), tuple(int(p) for p in d["positions"])
        )


def shard_keys(shardset: ShardSet, data_cfg: Optional[DataConfig]) -> ShardKeys:
    """Every shard's keys: from the manifest, or (a manifest without keys) by reading the shards'
    member names: a read of the whole dataset, no decoding."""
    if all(s.keys is not None for s in shardset.shards):
        return ShardKeys.of([s.keys for s in shardset.shards])
    log.warning(
        "the manifest lists no sample keys: reading %d shards to find the samples consumed before the resume "
        "(make-shards writes the keys)",
        len(shardset.shards),
    )
    bad = BadLog()
    return ShardKeys.of([tuple(sample.key for sample in iter_shard(shard, data_cfg, bad)) for shard in shardset.shards])


# ------------------------------------------------------------------------------- the plans
def rank_plans(
    shardset: ShardSet, keys: ShardKeys, epoch: int, layout: StreamLayout, rank: int, rest: Optional[List[str]]
) -> List[WorkerPlan]:
    """The workers of `rank` in `layout`: the epoch's plain split (rest None), or its run of
    `rest` (the epoch's unconsumed keys in shard order)."""
    if rest is None:
        return plan_workers(
            shardset,
            epoch=epoch,
            seed=layout.seed,
            shuffle=layout.shuffle_shards,
            rank=rank,
            world=layout.world_size,
            workers=layout.workers,
        )
    mine = _run_of(rest, rank, layout.world_size)
    touched = list(dict.fromkeys(keys.shard_of[key] for key in mine))  # in order, each once
    workers = max(1, min(layout.workers, len(touched)))
    kept = frozenset(mine)
    return [
        WorkerPlan(tuple((i, shardset.shards[i]) for i in touched[w::workers]), keep_keys=kept) for w in range(workers)
    ]


def _run_of(rest: List[str], rank: int, world: int) -> List[str]:
    """Rank's contiguous share of `rest` (sizes differ by one at most). With fewer keys than
    ranks a rank repeats one, as a short last batch is padded in any epoch."""
    if not rest:
        return []
    mine = rest[rank * len(rest) // world : (rank + 1) * len(rest) // world]
    return mine or [rest[rank % len(rest)]]


def unconsumed(keys: ShardKeys, epoch: int, layout: StreamLayout, consumed: Set[str]) -> List[str]:
    """The epoch's keys not consumed, in the epoch's shard order (in `layout`'s seed)."""
    order = epoch_shard_order(len(keys.of_shard), layout.seed, epoch, layout.shuffle_shards)
    return [key for i in order for key in keys.of_shard[i] if key not in consumed]


# --------------------------------------------------------------------------- the simulation
def stream_keys(plans: List[WorkerPlan], keys: ShardKeys, epoch: int, layout: StreamLayout, rank: int, layer: int):
    """The keys of a rank's training stream in order, endless (stream.RankStream without reading:
    the same plans, shuffle buffers and merge, over the manifest's keys)."""

    def worker_items(w: int) -> Iterator[object]:
        plan = plans[w]
        for pass_ in range(1 << 62):
            shards = (
                [key for i, key in enumerate(keys.of_shard[shard_index]) if plan.keeps(shard_index, i, key)]
                for shard_index, _ in plan.shards
            )
            items = interleave(shards, layout.interleave)
            yield from shuffle_pass(items, layout.shuffle_buffer, layout.seed, epoch, rank, w, pass_, layer)
            yield PASS_END

    takes = [worker_items(w).__next__ for w in range(len(plans))]
    return merge_round_robin(takes, on_empty_pass=_nothing_in_a_pass)


def _nothing_in_a_pass() -> None:
    raise ValueError("a rank's stream holds no sample")


def consumed_keys(
    shardset: ShardSet, keys: ShardKeys, epoch: int, layers: Sequence[Layer]
) -> Tuple[Set[str], Optional[List[str]]]:
    """(keys consumed by all `layers`, the rest the last of them was reading: None for layer 0)."""
    consumed: Set[str] = set()
    rest: Optional[List[str]] = None
    for depth, layer in enumerate(layers):
        for rank, position in enumerate(layer.positions):
            if position <= 0:
                continue
            plans = rank_plans(shardset, keys, epoch, layer.layout, rank, rest)
            stream = stream_keys(plans, keys, epoch, layer.layout, rank, depth)
            consumed.update(next(stream) for _ in range(position))
        rest = unconsumed(keys, epoch, layer.layout, consumed)
    return consumed, rest


@dataclass(frozen=True)
class Remainder:
    """What one rank reads of an interrupted epoch in the current layout."""

    plans: List[WorkerPlan]
    layer: int  # the current layer's depth (its shuffle seeds)
    left: int  # samples of the epoch not consumed before it, over all ranks


def remainder(
    shardset: ShardSet,
    data_cfg: Optional[DataConfig],
    epoch: int,
    layers: Sequence[Layer],
    layout: StreamLayout,
    rank: int,
) -> Remainder:
    keys = shard_keys(shardset, data_cfg)
    _, rest = consumed_keys(shardset, keys, epoch, layers)
    return Remainder(rank_plans(shardset, keys, epoch, layout, rank, rest), len(layers), len(rest or []))
