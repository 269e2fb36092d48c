"""make-shards: annotation formats -> shards + manifest, round trip, quarantine, transcoding, keys."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from side4video.cli import main as cli_main
from side4video.data.annotations import make_key
from side4video.data.shards import ShardWriter, make_shards, parse_size
from side4video.data.stream import BadLog, iter_shard, resolve_shards
from side4video.errors import UserError
from tests.support.data import encode, load_cfg, video_folder


def read_all(out):
    shardset = resolve_shards(str(out / "manifest.json"))
    bad = BadLog()
    samples = [s for shard in shardset.shards for s in iter_shard(shard, bad=bad)]
    return shardset, samples, bad


def write_annotations(fmt, root, rels, tmp_path):
    """The same videos described in each native format; returns (list file, labels file, expected)."""
    stems = [r.rsplit(".", 1)[0] for r in rels]
    names = ["jumping", "running"]
    expected = {}
    labels = None
    if fmt == "list":
        text = "".join(f"{r} {names[i % 2]}\n" for i, r in enumerate(rels))
        listf = tmp_path / "list.txt"
        listf.write_text("# path label\n" + text)
        for i, s in enumerate(stems):
            expected[make_key(s)] = (sorted(names).index(names[i % 2]), [])
    elif fmt == "k400":
        # Kinetics names files {youtube_id}_{start:06d}_{end:06d} inside {label}/ folders
        rows = ["label,youtube_id,time_start,time_end,split"]
        for i, r in enumerate(rels):
            ext = r.rsplit(".", 1)[1]
            label = names[i % 2]
            (root / label).mkdir(exist_ok=True)
            (root / label / f"yt{i}_{i:06d}_{i + 10:06d}.{ext}").write_bytes((root / r).read_bytes())
            rows.append(f"{label},yt{i},{i},{i + 10},train")
            expected[f"yt{i}_{i:06d}_{i + 10:06d}"] = (sorted(names).index(label), [])
        rows.append("jumping,missing,0,10,val")  # another split: filtered out by --split train
        listf = tmp_path / "k400.csv"
        listf.write_text("\n".join(rows) + "\n")
    elif fmt == "ssv2":
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({"Jumping over something": "0", "Running past something": "1"}))
        items = []
        for i, s in enumerate(stems):
            template = ["Jumping over [something]", "Running past [something]"][i % 2]
            items.append({"id": s, "template": template, "label": template.replace("[", "")})
            expected[make_key(s)] = (i % 2, [])
        listf = tmp_path / "ssv2.json"
        listf.write_text(json.dumps(items))
    elif fmt == "msrvtt":
        videos = [{"video_id": s, "category": i % 2, "split": "train"} for i, s in enumerate(stems)]
        sentences = [{"video_id": s, "caption": f"caption {j} of {s}", "sen_id": j} for s in stems for j in range(2)]
        listf = tmp_path / "msrvtt.json"
        listf.write_text(json.dumps({"videos": videos, "sentences": sentences}))
        for i, s in enumerate(stems):
            expected[make_key(s)] = (i % 2, [f"caption {j} of {s}" for j in range(2)])
    elif fmt == "msvd":
        listf = tmp_path / "msvd.json"
        listf.write_text(json.dumps({s: [f"a clip {s}", f"another {s}"] for s in stems}))
        for s in stems:
            expected[make_key(s)] = (-1, [f"a clip {s}", f"another {s}"])
    elif fmt == "vatex":
        listf = tmp_path / "vatex.json"
        listf.write_text(json.dumps([{"videoID": s, "enCap": [f"en {s}"], "chCap": ["zh"]} for s in stems]))
        for s in stems:
            expected[make_key(s)] = (-1, [f"en {s}"])
    return listf, labels, expected


@pytest.mark.parametrize("fmt", ["list", "k400", "ssv2", "msrvtt", "msvd", "vatex"])
def test_round_trip_keys_labels_captions(tmp_path, fmt):
    root = tmp_path / "videos"
    rels = video_folder(root, n=4, h264=1)
    listf, labels, expected = write_annotations(fmt, root, rels, tmp_path)
    out = tmp_path / "shards"
    manifest = make_shards(
        str(listf),
        fmt,
        str(root),
        str(out),
        labels=str(labels) if labels else None,
        split="train" if fmt == "k400" else None,
        shard_size="10KB",
        progress=False,
    )
    assert manifest["quarantine"] == []
    assert manifest["samples"] == len(expected) == 4
    assert len(manifest["shards"]) > 1  # 10 KB shards roll over
    shardset, samples, bad = read_all(out)
    assert not bad.samples and not bad.shards
    got = {s.key: (s.label, s.captions) for s in samples}
    assert got == expected
    for s in samples:
        assert s.meta["frames"] == 12 and (s.meta["width"], s.meta["height"]) == (48, 32)
        assert s.meta["codec"] in ("vp9", "h264") and s.ext in ("webm", "mp4")
        if s.label >= 0 and manifest["classes"]:
            assert s.label_name == manifest["classes"][s.label]
    assert sum(sh.samples for sh in shardset.shards) == 4
    # shard URLs are relative to the manifest: the folder can move
    assert all("/" not in sh["url"] for sh in manifest["shards"])


def test_quarantine_and_validation(tmp_path):
    root = tmp_path / "videos"
    rels = video_folder(root, n=3, h264=0)
    (root / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not really a video" * 20)
    good = encode(9)
    (root / "cut.webm").write_bytes(good[:300])  # the headers, no complete frame
    (root / "short.webm").write_bytes(good[: 2 * len(good) // 3])  # half of the frames left
    listf = tmp_path / "list.txt"
    listf.write_text("".join(f"{r} 0\n" for r in rels) + "broken.webm 1\ncut.webm 1\nshort.webm 1\nmissing.webm 0\n")
    manifest = make_shards(str(listf), "list", str(root), str(tmp_path / "out"), validate=True, progress=False)
    reasons = {q["path"]: q["reason"] for q in manifest["quarantine"]}
    assert set(reasons) == {"broken.webm", "cut.webm", "missing.webm"}
    assert "not found" in reasons["missing.webm"] and "cannot open" in reasons["broken.webm"]
    assert manifest["samples"] == 4
    _, samples, _ = read_all(tmp_path / "out")
    frames = {s.key: s.meta["frames"] for s in samples}
    assert frames["short"] == 6 and frames["a/clip0"] == 12


def test_transcode_h264_to_vp9_with_short_side(tmp_path):
    root = tmp_path / "videos"
    rels = video_folder(root, n=2, h264=2)
    listf = tmp_path / "list.txt"
    listf.write_text("".join(f"{r} {i}\n" for i, r in enumerate(rels)))
    manifest = make_shards(
        str(listf), "list", str(root), str(tmp_path / "out"), transcode="vp9", short_side=16, progress=False
    )
    assert manifest["samples"] == 2
    _, samples, _ = read_all(tmp_path / "out")
    for s in samples:
        assert s.ext == "webm" and s.meta["codec"] == "vp9"
        assert min(s.meta["width"], s.meta["height"]) == 16 and s.meta["frames"] == 12


def test_keys_never_escape(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    listf = tmp_path / "list.txt"
    listf.write_text("../outside.webm 0\n")
    with pytest.raises(UserError, match="rejected"):
        make_shards(str(listf), "list", str(root), str(tmp_path / "out"), progress=False)
    writer = ShardWriter(str(tmp_path / "w"))
    for bad_key in ("../evil", "/abs/path", "a/../../b"):
        with pytest.raises(UserError, match="rejected"):
            writer.write(bad_key, encode(0), "webm", {"label": 0})


def test_reader_rejects_escaping_key_in_a_shard(tmp_path):
    """A hand-made shard whose member names climb out of the folder: the sample is skipped and
    counted, the others are read."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("good0", "../evil", "good1"):
            for ext, data in (("json", b'{"label": 0}'), ("webm", encode(1))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "crafted.tar"
    path.write_bytes(buf.getvalue())
    bad = BadLog()
    keys = [s.key for s in iter_shard(resolve_shards(str(path)).shards[0], bad=bad)]
    assert keys == ["good0", "good1"]
    assert list(bad.samples) == ["../evil"] and "unsafe key" in bad.samples["../evil"]


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("512MB") == 512 * 10**6 and parse_size("64KiB") == 65536
    assert parse_size("1000") == 1000
    with pytest.raises(UserError):
        parse_size("lots")


def test_cli_make_shards(tmp_path, capsys):
    root = tmp_path / "videos"
    rels = video_folder(root, n=2, h264=0)
    listf = tmp_path / "list.txt"
    listf.write_text("".join(f"{r} {i}\n" for i, r in enumerate(rels)))
    out = tmp_path / "out"
    code = cli_main(
        [
            "make-shards",
            "--list",
            str(listf),
            "--format",
            "list",
            "--root",
            str(root),
            "--out",
            str(out),
            "--no-progress",
            "--validate",
        ]
    )
    assert code == 0 and (out / "manifest.json").is_file()
    assert "2 samples" in capsys.readouterr().out
    code = cli_main(
        [
            "make-shards",
            "--list",
            str(tmp_path / "nope.txt"),
            "--format",
            "list",
            "--root",
            str(root),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "annotation file not found" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_make_shards_uploads_to_s3(tmp_path, s3_server, monkeypatch):
    """Output s3://bucket/prefix: each finished shard is uploaded, then its record in the part's
    progress file, the manifest last; credentials and endpoint from the standard AWS environment
    variables."""
    from side4video.data.inspect import inspect_shards
    from tests.support.data import BUCKET

    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    client = s3_server.client()
    root = tmp_path / "videos"
    rels = video_folder(root, n=4, h264=1)
    listf = tmp_path / "list.txt"
    listf.write_text("".join(f"{r} {i % 2}\n" for i, r in enumerate(rels)))
    manifest = make_shards(str(listf), "list", str(root), f"s3://{BUCKET}/ds", shard_size="8KB", progress=False)
    names = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="ds/")["Contents"])
    progress = "ds/parts/part-0000-of-0001.json"  # what a rerun keeps (data/parts.py)
    assert names == sorted([f"ds/{s['url']}" for s in manifest["shards"]] + ["ds/manifest.json", progress])
    report = inspect_shards(
        f"s3://{BUCKET}/ds/manifest.json", load_cfg().data, batch_size=4, decode=True, progress=False
    )
    assert report["samples"] == 4 and report["bad_samples"] == []
    assert report["codecs"] == {"vp9": 3, "h264": 1}


@pytest.mark.timeout(120)
def test_make_shards_refuses_a_bad_or_missing_bucket_before_any_work(tmp_path, s3_server, monkeypatch, capsys):
    """What a real server refuses is refused up front, in one line: a name S3 does not allow, a
    bucket that does not exist (never created by the upload), credentials the server rejects."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "videos"
    rels = video_folder(root, n=2, h264=0)
    listf = tmp_path / "list.txt"
    listf.write_text("".join(f"{r} {i}\n" for i, r in enumerate(rels)))
    cases = {
        "s3://ab/ds": "'ab' is not a valid S3 bucket name",
        "s3://Side4Video_Test/ds": "not a valid S3 bucket",
        "s3://no-such-bucket/ds": "bucket 'no-such-bucket' does not exist",
    }
    for out, message in cases.items():
        assert (
            cli_main(
                [
                    "make-shards",
                    "--list",
                    str(listf),
                    "--format",
                    "list",
                    "--root",
                    str(root),
                    "--out",
                    out,
                    "--no-progress",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert "no-such-bucket" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    assert (
        cli_main(
            [
                "make-shards",
                "--list",
                str(listf),
                "--format",
                "list",
                "--root",
                str(root),
                "--out",
                "s3://side4video-test/denied",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "denied" in capsys.readouterr().err


def test_cli_make_synthetic(tmp_path, capsys):
    out = tmp_path / "synth"
    code = cli_main(
        [
            "make-synthetic",
            str(out),
            "--videos",
            "6",
            "--classes",
            "3",
            "--frames",
            "4",
            "--size",
            "16",
            "--shard-samples",
            "4",
            "--val-videos",
            "3",
        ]
    )
    assert code == 0 and "6 train and 3 val" in capsys.readouterr().out
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert [s["samples"] for s in train["shards"]] == [4, 2] and len(train["classes"]) == 3
    assert cli_main(["make-synthetic", str(out), "--classes", "12"]) == 2
