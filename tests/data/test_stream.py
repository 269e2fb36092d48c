"""Streaming shards: URL kinds (folder, HTTP, S3), outages, rank/worker split, resume, bad shards."""

from __future__ import annotations

import http.server
import io
import json
import logging
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch

from side4video.data import sources
from side4video.data.shards import ShardWriter
from side4video.data.stream import BadLog, RankStream, expand_spec, iter_shard, resolve_shards
from side4video.engine.factory import loader_from_config as build_loader
from side4video.errors import UserError
from tests.support.data import BUCKET, FaultyProxy, data_cfg_for, encode, load_cfg


def keys_of(stream):
    return [s.key for s in stream]


def epoch_batches(loader):
    return [(b["key"], b["label"].tolist(), b["video"].clone()) for b in loader]


class _RetryLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ------------------------------------------------------------------------------- URL kinds
@pytest.mark.timeout(120)
def test_same_pipeline_from_folder_http_and_s3(synthetic_data, http_server, s3_server):
    root = synthetic_data["root"]
    base = http_server(root)
    s3_val = s3_server.upload_folder(synthetic_data["val"], BUCKET, "synth/val")
    s3_train = s3_server.upload_folder(synthetic_data["train"], BUCKET, "synth/train")
    specs = {
        "folder": (str(synthetic_data["train"] / "manifest.json"), str(synthetic_data["val"])),
        "http": (f"{base}/train/manifest.json", f"{base}/val/manifest.json"),
        "s3": (s3_train + "/train-{000000..000003}.tar", f"{s3_val}/manifest.json"),
    }
    results = {}
    for name, (train_spec, val_spec) in specs.items():
        cfg = data_cfg_for(train_spec, val_spec, "eval.batch_size=3", *s3_server.overrides())
        val = build_loader(cfg, "val")
        train = build_loader(cfg, "train")
        try:
            assert val.class_names == train.class_names and len(train.class_names) == 4
            assert len(train) == 6  # 24 samples / batch 4, counts from the manifest (beside the pattern for s3)
            results[name] = (epoch_batches(val), [b["key"] for b in train])
        finally:
            val.close()
            train.close()
    # the S3 reads went to the SeaweedFS server: its log has the GETs of every shard
    served = {path for method, path, status in s3_server.logged_requests() if method == "GET" and status in (200, 206)}
    assert {f"/{BUCKET}/synth/train/train-00000{i}.tar" for i in range(4)} <= served
    ref_val, ref_train = results["folder"]
    assert sum(len(k) for k, _, _ in ref_val) == 8
    for name in ("http", "s3"):
        val, train = results[name]
        assert train == ref_train, name
        assert [(k, lab) for k, lab, _ in val] == [(k, lab) for k, lab, _ in ref_val], name
        for (_, _, v), (_, _, ref) in zip(val, ref_val):
            assert torch.equal(v, ref), name


@pytest.mark.timeout(120)
def test_s3_outage_mid_shard_costs_no_sample_and_repeats_none(tmp_path, s3_server):
    """The whole S3 server stops in the middle of a shard (SIGTERM, waited for) and starts again
    on its data on disk: the stream retries, resumes at the byte reached, loses and repeats nothing.
    The shard (30 x 1 MB, not decoded here) is far larger than what loopback sockets buffer, so the
    stream really is cut: the retries are checked."""
    writer = ShardWriter(str(tmp_path / "big"))
    expected = [f"clip{i:03d}" for i in range(30)]
    payloads = [np.random.default_rng(i).bytes(1 << 20) for i in range(30)]
    for i, key in enumerate(expected):
        writer.write(key, payloads[i], "webm", {"label": i % 3})
    writer.close(None, [], "test")
    url = s3_server.upload_folder(tmp_path / "big", BUCKET, "outage") + "/manifest.json"
    cfg = load_cfg(
        *s3_server.overrides(), "data.read_chunk=4096", "data.retries=12", "data.retry_backoff=0.1", "data.timeout=5"
    )
    shard = resolve_shards(url, cfg.data).shards[0]
    assert shard.samples == 30
    retry_log = _RetryLog()
    logger = logging.getLogger("side4video.data.sources")
    logger.addHandler(retry_log)
    bad = BadLog()
    try:
        samples = iter_shard(shard, cfg.data, bad)
        got = [next(samples) for _ in range(5)]
        s3_server.stop()  # the server goes away in the middle of the shard (stop returns once it exited) ...
        assert not s3_server.running
        restart = threading.Timer(1.0, s3_server.start)  # ... and comes back a second later
        restart.start()
        got += list(samples)
        restart.join()
    finally:
        logger.removeHandler(retry_log)
        if not s3_server.running:
            s3_server.start()
    assert any("retry" in m for m in retry_log.messages), "the outage was never hit"
    assert [s.key for s in got] == expected  # every sample once, in order
    assert all(s.video == payloads[i] for i, s in enumerate(got))  # byte for byte across the cut
    assert not bad.samples and not bad.shards


def _keys_and_bytes(url: str, cfg) -> list:
    stream = RankStream(resolve_shards(url, cfg.data), cfg.data, epoch=0, workers=2, shuffle_shards=False)
    return [(sample.key, sample.video) for sample in stream]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["http", "s3"])
def test_5xx_bursts_are_retried_with_no_sample_lost_or_repeated(kind, synthetic_data, http_server, s3_server):
    """Bursts of three 503s (SlowDown) every fourth ranged read of a shard, from an HTTP server and
    from a proxy in front of the S3 server: every sample once, in order, bytes equal to the local read."""
    local = load_cfg("data.read_chunk=2048")
    expected = _keys_and_bytes(str(synthetic_data["train"] / "manifest.json"), local)
    if kind == "http":
        upstream, prefix = http_server(synthetic_data["train"]), ""
    else:
        prefix = s3_server.upload_folder(synthetic_data["train"], BUCKET, "bursts")
        upstream = s3_server.endpoint
    proxy = FaultyProxy(upstream, burst_every=4, burst=3)
    try:
        if kind == "http":
            url, extra = f"{proxy.url}/manifest.json", []
        else:
            url = f"{prefix}/manifest.json"
            extra = s3_server.overrides(endpoint=proxy.url)
        cfg = load_cfg(*extra, "data.read_chunk=2048", "data.retries=4", "data.retry_backoff=0.01")
        got = _keys_and_bytes(url, cfg)
    finally:
        proxy.close()
    assert proxy.failed >= 12, "no burst was ever injected"
    assert [k for k, _ in got] == [k for k, _ in expected] and len({k for k, _ in got}) == len(got) == 24
    assert all(a == b for (_, a), (_, b) in zip(got, expected))


@pytest.mark.timeout(60)
def test_http_dropped_connection_resumes_at_the_byte_reached(tmp_path):
    payload = bytes(range(256)) * 400  # 100 KB
    requests = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            requests.append(self.headers.get("Range"))
            self.send_response(200)  # ignores Range, like python's http.server
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if len(requests) == 1:
                self.wfile.write(payload[:30000])  # then the connection dies
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_cfg("data.retry_backoff=0.01", "data.read_chunk=8192")
        with sources.open_url(f"http://127.0.0.1:{server.server_address[1]}/x.tar", cfg.data) as f:
            data = f.read()
    finally:
        server.shutdown()
        server.server_close()
    assert data == payload
    assert len(requests) == 2 and requests[1] is not None and requests[1].startswith("bytes=")


@pytest.mark.timeout(60)
def test_pipe_urls_refused_unless_allowed(synthetic_data):
    shard = synthetic_data["train"] / "train-000000.tar"
    spec = f"pipe:cat {shard}"
    with pytest.raises(UserError, match="allow_pipe"):
        resolve_shards(spec, load_cfg().data)
    with pytest.raises(UserError, match="allow_pipe"):
        sources.open_url(spec, load_cfg().data)
    cfg = load_cfg("data.allow_pipe=true")
    keys = keys_of(iter_shard(resolve_shards(spec, cfg.data).shards[0], cfg.data))
    assert len(keys) == 6


def test_source_settings_come_from_the_config_schema_alone(monkeypatch):
    """No config (library callers, tests) means the schema's defaults, read in one place; the S3
    settings fall back to the AWS environment."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert sources.SourceOptions.of(None) == sources.SourceOptions.of(load_cfg().data)
    cfg = load_cfg("data.timeout=5", "data.retries=2", "data.read_chunk=4096", "data.s3.region=eu-west-1")
    opts = sources.SourceOptions.of(cfg.data)
    assert (opts.timeout, opts.retries, opts.read_chunk, opts.s3_region) == (5.0, 2, 4096, "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert sources.SourceOptions.of(None).s3_region == "us-west-2" and opts.s3_region == "eu-west-1"


def test_spec_forms(synthetic_data):
    train = synthetic_data["train"]
    assert expand_spec("a-{0..2}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert expand_spec("x.tar,y-{a,b}.tar::z.tar") == ["x.tar", "y-a.tar", "y-b.tar", "z.tar"]
    by_manifest = resolve_shards(str(train / "manifest.json"))
    by_folder = resolve_shards(str(train))
    by_pattern = resolve_shards(str(train / "train-{000000..000003}.tar"))
    by_list = resolve_shards([str(train / f"train-00000{i}.tar") for i in range(4)])
    for s in (by_folder, by_pattern, by_list):
        assert s.shards == by_manifest.shards and s.total_samples == 24 and s.classes == by_manifest.classes
    with pytest.raises(UserError, match="unsupported scheme"):
        resolve_shards("ftp://host/x.tar")
    with pytest.raises(UserError, match="empty"):
        resolve_shards("")


# ------------------------------------------------------------------------- order and split
def test_two_ranks_two_workers_disjoint_union(synthetic_data):
    cfg = data_cfg_for(str(synthetic_data["train"]), None, "data.workers=2")
    shardset = resolve_shards(cfg.data.train.shards, cfg.data)
    all_keys = {s.key for shard in shardset.shards for s in iter_shard(shard)}
    assert len(all_keys) == 24
    per_rank = [
        set(keys_of(RankStream(shardset, cfg.data, epoch=3, rank=r, world=2, workers=2, shuffle_buffer=4)))
        for r in range(2)
    ]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == all_keys
    # the same through the training loaders, with decoding: equal batch counts, disjoint ranks
    loaders = [build_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    try:
        assert len(loaders[0]) == len(loaders[1]) == 3
        seen = []
        for loader in loaders:
            loader.set_epoch(3)
            batches = [b["key"] for b in loader]
            assert len(batches) == 3 and all(len(k) == 4 for k in batches)
            seen.append({k for ks in batches for k in ks})
        assert not seen[0] & seen[1] and seen[0] | seen[1] == all_keys
    finally:
        for loader in loaders:
            loader.close()


def test_order_is_a_function_of_seed_and_epoch(synthetic_data):
    cfg = data_cfg_for(str(synthetic_data["train"]), None)
    shardset = resolve_shards(cfg.data.train.shards, cfg.data)

    def order(epoch, seed=0):
        return keys_of(RankStream(shardset, cfg.data, epoch=epoch, workers=2, shuffle_buffer=5, seed=seed))

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0, seed=1) != order(0)


def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path):
    writer = ShardWriter(str(tmp_path / "uneven"))
    sizes = [9, 3, 5, 7]
    n = 0
    for shard_size in sizes:
        for _ in range(shard_size):
            writer.write(f"v{n:03d}", encode(n % 4, frames=6), "webm", {"label": n % 4})
            n += 1
        writer._finish()
    writer.close([f"c{i}" for i in range(4)], [], "test")
    cfg = data_cfg_for(str(tmp_path / "uneven"), None, "data.shuffle_shards=true")
    for epoch in range(2):
        counts = []
        for rank in range(2):
            loader = build_loader(cfg, "train", rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = [b["key"] for b in loader]
            loader.close()
            counts.append(len(batches))
            assert all(len(k) == 4 for k in batches)
        assert counts == [3, 3]  # ceil(24 / (2 ranks x 4)); the rank with fewer samples wraps around


def test_too_few_shards(synthetic_data):
    cfg = data_cfg_for(str(synthetic_data["val"]), str(synthetic_data["val"]), "data.workers=2")
    with pytest.raises(UserError, match="cannot feed"):
        RankStream(resolve_shards(cfg.data.train.shards, cfg.data), cfg.data, epoch=0, rank=0, world=2, workers=2)
    # evaluation falls back to a per-sample split: each sample on exactly one rank
    one_shard = resolve_shards(str(synthetic_data["val"] / "val-000000.tar"), cfg.data)
    seen = [
        keys_of(RankStream(one_shard, cfg.data, epoch=0, rank=r, world=3, workers=2, allow_sample_split=True))
        for r in range(3)
    ]
    flat = [k for ks in seen for k in ks]
    assert len(flat) == len(set(flat)) == one_shard.total_samples == 6


def test_epoch_length_must_be_known(synthetic_data, tmp_path):
    folder = tmp_path / "nomanifest"
    shutil.copytree(synthetic_data["train"], folder)
    (folder / "manifest.json").unlink()
    cfg = data_cfg_for(str(folder / "train-{000000..000003}.tar"), None)
    with pytest.raises(UserError, match="epoch_samples"):
        build_loader(cfg, "train")
    cfg = data_cfg_for(str(folder / "train-{000000..000003}.tar"), None, "data.train.epoch_samples=8")
    loader = build_loader(cfg, "train")
    try:
        assert len(loader) == 2 and len([b for b in loader]) == 2
    finally:
        loader.close()


def test_resampled_stream_is_endless_and_deterministic(synthetic_data):
    cfg = data_cfg_for(str(synthetic_data["train"]), None)
    shardset = resolve_shards(cfg.data.train.shards, cfg.data)

    def take(n, epoch):
        stream = RankStream(shardset, cfg.data, epoch=epoch, resampled=True, workers=2)
        out = []
        for s in stream:
            out.append(s.key)
            if len(out) == n:
                break
        stream.close()
        return out

    first = take(60, 0)
    assert len(first) == 60 and len(set(first)) <= 24  # more than the dataset: drawn with replacement
    assert first == take(60, 0) and first != take(60, 1)


# ---------------------------------------------------------------------------------- resume
@pytest.mark.timeout(180)
def test_restoring_state_mid_epoch_yields_exactly_the_remaining_batches(synthetic_data):
    cfg = data_cfg_for(
        str(synthetic_data["train"]),
        None,
        "data.workers=2",
        "data.repeated_views=2",
        "data.randaugment.enabled=true",
        "data.randaugment.num_ops=2",
        "data.flip=true",
        "data.flip_label_pairs=[[0,1]]",
    )
    straight = build_loader(cfg, "train")
    straight.set_epoch(2)
    reference = epoch_batches(straight)
    straight.close()
    assert len(reference) == 6 and all(len(k) == 8 for k, _, _ in reference)  # 4 clips x 2 views

    first = build_loader(cfg, "train")
    first.set_epoch(2)
    it = iter(first)
    consumed = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    it.close()
    first.close()
    assert state["epoch"] == 2 and state["batches"] == 2
    assert [b["key"] for b in consumed] == [k for k, _, _ in reference[:2]]

    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed)
    assert len(rest) == 4
    for (k, lab, v), (rk, rlab, rv) in zip(rest, reference[2:]):
        assert k == rk and lab == rlab
        assert torch.equal(v, rv)  # same samples, same augmentation
    # restored at the very end of the epoch: nothing is left of it; the next epoch is whole
    end_state = resumed.state_dict()
    assert end_state["batches"] == 6
    again = build_loader(cfg, "train")
    again.load_state_dict(end_state)
    assert list(again) == []
    again.set_epoch(3)
    assert len([b for b in again]) == 6
    again.close()
    resumed.close()


# ------------------------------------------------------------------------------ bad shards
def _copy_of_val(synthetic_data, folder):
    """A copy of the val split to damage: (folder, its first shard, that shard's tar members)."""
    shutil.copytree(synthetic_data["val"], folder)
    shard = folder / "val-000000.tar"
    with tarfile.open(shard) as tar:
        return folder, shard, tar.getmembers()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_reads(fmt):
    """The shard reader's own tar parsing gives tarfile's regular members, names and bytes, in
    every tar format (GNU long names, pax records, directories, empty members); a member cut
    short is an error, never a silently short sample."""
    from side4video.data.stream import _tar_members

    # ustar keeps a name over 100 characters in its 155-character prefix field
    long_name = "x" * 90 + "/" + "y" * (120 if fmt != tarfile.USTAR_FORMAT else 60) + ".mp4"
    members = [("a.json", b"{}"), (long_name, b"v" * 1000), ("\u00e9.txt", b""), ("c.bin", bytes(range(256)) * 40)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "z" * 300}
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    assert list(_tar_members(io.BytesIO(raw))) == members
    with pytest.raises(tarfile.ReadError, match="unexpected end of data in c.bin"):
        list(_tar_members(io.BytesIO(raw[: raw.index(bytes(range(256))) + 100])))
    flipped = bytearray(raw)
    flipped[raw.index(b"a.json") + 1] ^= 1  # one bit of a name: the header's checksum no longer holds
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(_tar_members(io.BytesIO(bytes(flipped))))


def test_tar_header_sizes_in_octal_and_base_256():
    """Sizes over 8 GiB are stored base-256 (GNU); both encodings read as tarfile writes them."""
    from side4video.data.stream import _parse_header

    for size in (0, 7, 1 << 20, (1 << 33) + 5):
        info = tarfile.TarInfo("v.mp4")
        info.size = size
        assert _parse_header(info.tobuf(tarfile.GNU_FORMAT)) == ("v.mp4", size, tarfile.REGTYPE)


def test_truncated_shard_is_skipped_and_counted(synthetic_data, tmp_path):
    folder, shard, members = _copy_of_val(synthetic_data, tmp_path / "damaged")
    victim = members[5]  # the 3rd sample's video: json, video per sample, in name order
    assert victim.name.endswith(".webm")
    shard.write_bytes(shard.read_bytes()[: victim.offset_data + victim.size // 2])
    victim_key = victim.name.rsplit(".", 1)[0]

    intact = keys_of(iter_shard(resolve_shards(str(synthetic_data["val"] / "val-000000.tar")).shards[0]))
    other = keys_of(iter_shard(resolve_shards(str(folder / "val-000001.tar")).shards[0]))

    bad = BadLog()
    shardset = resolve_shards(str(folder))
    keys = keys_of(RankStream(shardset, None, epoch=0, shuffle_shards=False, bad=bad))
    assert keys == intact[:2] + other  # the samples before the cut, then the next shard
    assert list(bad.samples) == [victim_key] == [intact[2]]
    assert list(bad.shards) == [str(shard)] and "damaged" in bad.shards[str(shard)]

    # the loader reports the same, and decodes the rest
    cfg = data_cfg_for(str(folder), str(folder), "eval.batch_size=3")
    loader = build_loader(cfg, "val")
    try:
        got = [k for b in loader for k in b["key"]]
    finally:
        loader.close()
    assert got == keys
    assert loader.bad_samples == [victim_key] and str(shard) in loader.bad_shards


def test_shard_shorter_than_its_manifest_is_flagged(synthetic_data, tmp_path):
    """A shard cut exactly between samples loses no partial sample, but the count gives it away."""
    folder, shard, members = _copy_of_val(synthetic_data, tmp_path / "short")
    shard.write_bytes(shard.read_bytes()[: members[4].offset])  # 2 whole samples, then nothing
    bad = BadLog()
    keys = keys_of(iter_shard(resolve_shards(str(folder)).shards[0], bad=bad))
    assert len(keys) == 2 and not bad.samples
    assert "truncated: 2 of 6" in bad.shards[str(shard)]
