"""Class mixing of training batches on a class-sorted dataset: shards written by make-shards
(shuffled), and the same videos written in class order (--no-shuffle) mixed at read time by
data.interleave; `side4video inspect` reports how mixed the shards are.

The README's 'Mixing' figures come from this test: `pytest -s tests/data/test_mixing.py` prints
them."""

from __future__ import annotations

import pytest

from side4video.cli.data import format_report
from side4video.data.inspect import inspect_shards
from side4video.data.shards import make_shards
from side4video.engine.factory import loader_from_config as build_loader
from tests.support.data import data_cfg_for, encode

CLASSES, PER_CLASS, BATCH = 8, 32, 8
BUFFER = 13  # about 0.4 of a class


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """8 classes x 32 tiny videos listed class by class; shards of one class's size (32 videos)
    written shuffled (the default) and in list order."""
    tmp = tmp_path_factory.mktemp("mixing")
    root = tmp / "videos"
    lines = []
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            rel = f"class{c}/v{i:02d}.webm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode(c * 1000 + i, frames=4, height=32, width=32))
            lines.append(f"{rel} {c}")
    listf = tmp / "list.txt"
    listf.write_text("\n".join(lines) + "\n")
    out = {}
    for name, shuffle in (("shuffled", True), ("class_order", False)):
        out[name] = tmp / name
        make_shards(
            str(listf), "list", str(root), str(out[name]), shard_samples=PER_CLASS, shuffle=shuffle, progress=False
        )
    return out


def mean_distinct_classes(shards, *overrides: str) -> float:
    """Distinct labels per training batch of 8 over one epoch of the real loader (1 rank, 2 readers)."""
    cfg = data_cfg_for(
        str(shards),
        None,
        f"train.batch_size={BATCH}",
        "data.workers=2",
        f"data.shuffle_buffer={BUFFER}",
        f"data.num_classes={CLASSES}",
        *overrides,
    )
    loader = build_loader(cfg, "train", rank=0, world_size=1)
    try:
        loader.set_epoch(0)
        counts = [len(set(batch["label"].tolist())) for batch in loader]
    finally:
        loader.close()
    assert len(counts) == CLASSES * PER_CLASS // BATCH
    return sum(counts) / len(counts)


@pytest.mark.timeout(240)
def test_batches_mix_classes_from_shuffled_and_class_ordered_shards(class_sorted):
    shuffled = mean_distinct_classes(class_sorted["shuffled"])
    shuffled_one = mean_distinct_classes(class_sorted["shuffled"], "data.interleave=1")
    ordered = {n: mean_distinct_classes(class_sorted["class_order"], f"data.interleave={n}") for n in (1, 2, 4, 8)}
    print(f"\nmean distinct classes per batch of {BATCH} (8 classes x 32 videos, buffer {BUFFER}, 2 readers):")
    print(f"  make-shards (shuffled), data.interleave=4: {shuffled:.2f}; data.interleave=1: {shuffled_one:.2f}")
    for n, value in ordered.items():
        print(f"  --no-shuffle (class order), data.interleave={n}: {value:.2f}")
    assert shuffled >= 4.5 and shuffled_one >= 4.5
    assert ordered[4] >= 4.5  # the default (config.py) mixes shards written in class order
    assert ordered[1] < 4.0  # one shard at a time: the buffer alone leaves batches of few classes


def test_inspect_reports_how_mixed_the_shards_are(class_sorted):
    cfg = data_cfg_for(str(class_sorted["shuffled"]), None, f"data.num_classes={CLASSES}")
    mixed = inspect_shards(str(class_sorted["shuffled"]), cfg.data, batch_size=4, progress=False)
    single = inspect_shards(str(class_sorted["class_order"]), cfg.data, batch_size=4, progress=False)
    assert single["mixing"]["distinct_classes"] == {"min": 1, "mean": 1.0, "max": 1}
    assert single["mixing"]["largest_class_share"]["mean"] == 1.0 and single["mixing"]["nearly_single_class"]
    assert mixed["mixing"]["distinct_classes"]["min"] >= 6 and not mixed["mixing"]["nearly_single_class"]
    warnings = [line for line in format_report(single).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "nearly single-class" in warnings[0]
    assert not any(line.startswith("warning:") for line in format_report(mixed).splitlines())
