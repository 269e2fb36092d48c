"""An epoch interrupted in one rank layout and continued in another (data/remainder.py): the
consumed samples follow from every rank's saved position, the rest is shared by the new ranks,
and every sample of the epoch is used once."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter

import pytest

from side4video.data.remainder import Layer, StreamLayout, consumed_keys, rank_plans, shard_keys, stream_keys
from side4video.data.stream import RankStream, resolve_shards
from side4video.engine.factory import loader_from_config as build_loader
from tests.support.data import data_cfg_for

EPOCH = 5


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


def _read_keys(stream, n):
    """The keys of the first `n` samples a real stream reads (shards opened, tar members parsed)."""
    keys = [s.key for s in _take(stream, n)]
    stream.close()
    return keys


def _layout(world, workers, buffer=4, interleave=1):
    return StreamLayout(
        world_size=world, workers=workers, seed=0, shuffle_buffer=buffer, shuffle_shards=True, interleave=interleave
    )


@pytest.mark.parametrize("world,workers,interleave", [(1, 1, 3), (2, 2, 1), (1, 2, 2), (4, 1, 1)])
def test_the_keys_alone_replay_a_rank_stream_as_read(synthetic_data, world, workers, interleave):
    """The simulation over the manifest's keys is the real stream (shards read, `interleave` of
    them at once), wrap-around passes included; and so is a stream over the rest of an epoch
    (layer 1)."""
    cfg = data_cfg_for(str(synthetic_data["train"]), None)
    shardset = resolve_shards(cfg.data.train.shards, cfg.data)
    keys = shard_keys(shardset, cfg.data)
    assert sum(len(k) for k in keys.of_shard) == 24  # the manifest lists every shard's keys
    layout = _layout(world, workers, interleave=interleave)
    n = 2 * 24 // world  # two passes over the rank's shards
    streams = dict(world=world, workers=workers, shuffle_buffer=4, interleave=interleave)
    for rank in range(world):
        got = _read_keys(RankStream(shardset, cfg.data, epoch=EPOCH, rank=rank, infinite=True, **streams), n)
        plans = rank_plans(shardset, keys, EPOCH, layout, rank, None)
        assert _take(stream_keys(plans, keys, EPOCH, layout, rank, 0), n) == got

    consumed, rest = consumed_keys(shardset, keys, EPOCH, [Layer(_layout(2, 2), (5, 3))])
    assert len(consumed) == 8 and len(rest) == 16 and not consumed & set(rest)
    plans = rank_plans(shardset, keys, EPOCH, layout, 0, rest)
    real = RankStream(shardset, cfg.data, epoch=EPOCH, infinite=True, plans=plans, layer=1, **streams)
    got = _read_keys(real, 16 // world)
    assert _take(stream_keys(plans, keys, EPOCH, layout, 0, 1), 16 // world) == got


def _loaders(cfg, world):
    return [build_loader(cfg, "train", rank=r, world_size=world) for r in range(world)]


def _read(loaders, batches=None):
    """Keys of `batches[rank]` batches of every rank (all that is left of the epoch when None)
    and the states a checkpoint then holds, rank by rank."""
    keys = []
    for rank, loader in enumerate(loaders):
        it = iter(loader)
        got = list(it) if batches is None else _take(it, batches[rank])
        it.close()
        keys += [k for b in got for k in b["key"]]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    for loader in loaders:
        loader.close()
    return keys, states


def _resume(cfg, world, states):
    loaders = _loaders(cfg, world)
    for rank, loader in enumerate(loaders):
        loader.load_state_dict(states[rank] if len(states) == world else states[0], every_rank=states)
    return loaders


@pytest.mark.timeout(240)
@pytest.mark.parametrize("keys_in_manifest", [True, False])
def test_an_epoch_continued_on_other_layouts_uses_each_sample_once(synthetic_data, tmp_path, keys_in_manifest, caplog):
    """2 ranks x 2 workers read 1 and 2 batches (a rank that skipped bad samples is further on),
    1 rank x 1 worker one more, then 2 ranks x 1 worker finish the epoch: its keys are its 24
    samples, each once. Continued on 3 ranks at its end, the next epoch is whole again."""
    folder = tmp_path / "train"
    shutil.copytree(synthetic_data["train"], folder)
    if not keys_in_manifest:  # a manifest from before keys: the shards' names are read instead
        manifest = json.loads((folder / "manifest.json").read_text())
        for shard in manifest["shards"]:
            shard.pop("keys")
        (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg_of = {w: data_cfg_for(str(folder), None, f"data.workers={w}") for w in (1, 2)}

    first = _loaders(cfg_of[2], 2)
    for loader in first:
        loader.set_epoch(EPOCH)
    used, states = _read(first, batches=[1, 2])
    assert [s["stream_pos"] for s in states] == [4, 8]

    one = _resume(cfg_of[1], 1, states)
    assert len(one[0]) == 6 and one[0].position == 3  # 12 samples left: 3 batches of its 6
    more, states = _read(one, batches=[1])
    used += more
    assert len(states[0]["layers"]) == 1 and states[0]["layers"][0]["positions"] == [4, 8]

    two = _resume(cfg_of[1], 2, states)
    assert [len(loader) - loader.position for loader in two] == [1, 1]  # 8 left: a batch each
    rest, states = _read(two)
    used += rest
    assert Counter(used) == Counter({key: 1 for key in shard_keys_of(folder)})
    assert any("reading 4 shards" in r.getMessage() for r in caplog.records) != keys_in_manifest

    # continued on 3 ranks at the epoch's end: nothing is left of it, the next one is whole
    after = _resume(cfg_of[1], 3, states)
    assert [list(loader) for loader in after] == [[], [], []]
    for loader in after:
        loader.set_epoch(EPOCH + 1)
    assert [len(loader) for loader in after] == [2, 2, 2]
    keys, states = _read(after)
    assert all(s["layers"] == [] for s in states) and len(keys) == 24 and set(keys) <= set(shard_keys_of(folder))


def shard_keys_of(folder):
    cfg = data_cfg_for(str(folder), None)
    return [k for keys in shard_keys(resolve_shards(cfg.data.train.shards, cfg.data), cfg.data).of_shard for k in keys]


def test_a_resume_in_the_same_layout_after_a_change_replays_the_rest(synthetic_data):
    """A run resumed on 1 rank (the rest of the epoch), saved, and resumed again on 1 rank reads
    exactly what the uninterrupted 1-rank run would have read."""
    cfg2, cfg1 = (data_cfg_for(str(synthetic_data["train"]), None, f"data.workers={w}") for w in (2, 1))
    first = _loaders(cfg2, 2)
    for loader in first:
        loader.set_epoch(EPOCH)
    _, states = _read(first, batches=[1, 1])
    straight, _ = _read(_resume(cfg1, 1, states))
    head, again = _read(_resume(cfg1, 1, states), batches=[2])
    tail, _ = _read(_resume(cfg1, 1, again))
    assert head + tail == straight and len(straight) == 16


def test_states_saved_before_interleave_read_one_shard_at_a_time():
    """A loader state or layer written before data.interleave existed was read one shard at a
    time: it resumes in that order (interleave 1), not in the current default's."""
    current = _layout(2, 2, interleave=4)
    old = {"world_size": 2, "workers": 2, "seed": 0, "shuffle_buffer": 4, "shuffle_shards": True}
    assert StreamLayout.saved(old, current).interleave == 1
    assert StreamLayout.saved({**old, "interleave": 4}, current) == current
    assert Layer.from_dict({**old, "positions": [3, 5]}).layout.interleave == 1
    assert Layer.from_dict(Layer(current, (3, 5)).as_dict()) == Layer(current, (3, 5))
