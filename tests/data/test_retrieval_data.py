"""Retrieval data: make-shards on the reference's own annotation layouts (MSR-VTT, MSVD, VATEX),
bad input refused in one line with nothing written, caption draws and tokens, and the synthetic
caption set."""

import csv
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from side4video.cli.main import main as cli_main
from side4video.data.annotations import read_plain_pickle
from side4video.data.captions import evaluation_captions, tokenize, training_caption, training_captions
from side4video.data.shards import make_shards
from side4video.data.stream import BadLog, iter_shard, resolve_shards
from side4video.data.synthetic import TRAIN_FRAMES, VAL_FRAMES, make_synthetic, motion_captions
from side4video.errors import UserError
from tests.support import REPO
from tests.support.data import encode

IDS = ["video7", "video10", "video12", "video2"]


def videos(root, ids, ext="webm"):
    root.mkdir(parents=True, exist_ok=True)
    for i, vid in enumerate(ids):
        (root / f"{vid}.{ext}").write_bytes(encode(i, frames=6))
    return root


def captions_of(out):
    shardset = resolve_shards(str(out / "manifest.json"))
    bad = BadLog()
    got = {s.key: (s.label, s.captions) for sh in shardset.shards for s in iter_shard(sh, bad=bad)}
    assert not bad.samples
    return got


# ---------------------------------------------------------------------------------- layouts
def msrvtt_files(tmp_path, train_ids=IDS[:3], test_ids=IDS[3:]):
    """MSRVTT_data.json, MSRVTT_train.9k.csv and MSRVTT_JSFUSION_test.csv as the reference reads them."""
    data = {
        "videos": [
            {"video_id": v, "category": i, "url": f"https://youtube.com/watch?v={v}", "split": "train"}
            for i, v in enumerate(IDS)
        ],
        "sentences": [
            {"video_id": v, "caption": f"{v} caption {j}", "sen_id": 10 * i + j}
            for i, v in enumerate(IDS)
            for j in range(3)
        ],
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    with open(tmp_path / "MSRVTT_train.9k.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video_id"], *[[v] for v in train_ids]])
    with open(tmp_path / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        rows = [["key", "vid_key", "video_id", "sentence"]]
        rows += [[f"ret{i}", f"msr{v[5:]}", v, f"the one test sentence of {v}"] for i, v in enumerate(test_ids)]
        csv.writer(f).writerows(rows)


def test_msrvtt_train_csv_with_data_json_and_jsfusion_test(tmp_path):
    root = videos(tmp_path / "videos", IDS)
    msrvtt_files(tmp_path)
    make_shards(
        str(tmp_path / "MSRVTT_train.9k.csv"),
        "msrvtt",
        str(root),
        str(tmp_path / "train"),
        captions=str(tmp_path / "MSRVTT_data.json"),
        progress=False,
    )
    assert captions_of(tmp_path / "train") == {
        v: (IDS.index(v), [f"{v} caption {j}" for j in range(3)]) for v in IDS[:3]
    }
    make_shards(str(tmp_path / "MSRVTT_JSFUSION_test.csv"), "msrvtt", str(root), str(tmp_path / "test"), progress=False)
    assert captions_of(tmp_path / "test") == {"video2": (-1, ["the one test sentence of video2"])}


def test_msvd_lists_and_raw_captions_pickle(tmp_path):
    root = videos(tmp_path / "videos", IDS)
    (tmp_path / "train_list.txt").write_text("\n".join(IDS[:2]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(IDS[2:]) + "\n\n")
    raw = {v: [["a", "man", "is", "cooking", str(i)], ["someone", "cooks"]] for i, v in enumerate(IDS)}
    with open(tmp_path / "raw-captions.pkl", "wb") as f:
        pickle.dump(raw, f)
    make_shards(
        str(tmp_path / "test_list.txt"),
        "msvd",
        str(root),
        str(tmp_path / "test"),
        captions=str(tmp_path / "raw-captions.pkl"),
        progress=False,
    )
    assert captions_of(tmp_path / "test") == {
        v: (-1, [f"a man is cooking {IDS.index(v)}", "someone cooks"]) for v in IDS[2:]
    }


def test_vatex_lists_and_data_json(tmp_path):
    root = videos(tmp_path / "videos", IDS)
    data = {v: {"enCap": [f"en {v} {j}" for j in range(10)], "chCap": ["zh"] * 10} for v in IDS}
    (tmp_path / "vatex_data.json").write_text(json.dumps(data))
    (tmp_path / "test_list.txt").write_text("\n".join(IDS[1:]) + "\n")
    make_shards(
        str(tmp_path / "test_list.txt"),
        "vatex",
        str(root),
        str(tmp_path / "test"),
        captions=str(tmp_path / "vatex_data.json"),
        progress=False,
    )
    got = captions_of(tmp_path / "test")
    assert got == {v: (-1, [f"en {v} {j}" for j in range(10)]) for v in IDS[1:]}


# -------------------------------------------------------------------------------- bad input
class Payload:
    """Unpickling this runs a shell command: the restricted unpickler must never get there."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "side4video.cli", *map(str, args)], capture_output=True, text=True, cwd=REPO
    )


def bad_inputs(tmp_path):
    """(name, make-shards arguments) of annotation inputs that must be refused."""
    root = videos(tmp_path / "videos", IDS)
    msrvtt_files(tmp_path)
    (tmp_path / "list.txt").write_text("\n".join(IDS) + "\n")
    (tmp_path / "with_missing_video.txt").write_text("\n".join(IDS + ["video99"]) + "\n")
    raw = {v: [["a", "clip"]] for v in IDS + ["video99"]}
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(raw, f)
    with open(tmp_path / "code.pkl", "wb") as f:
        pickle.dump({IDS[0]: [["a"]], "x": Payload(tmp_path / "pwned")}, f)
    with open(tmp_path / "numbers.pkl", "wb") as f:
        pickle.dump({v: [["a", 1]] for v in IDS}, f)
    with open(tmp_path / "odict.pkl", "wb") as f:
        from collections import OrderedDict

        pickle.dump(OrderedDict((v, [["a"]]) for v in IDS), f)
    (tmp_path / "no_video_id.csv").write_text("vid,sentence\nvideo7,a\n")
    (tmp_path / "vatex_wrong.json").write_text(json.dumps({"videos": [1, 2]}))
    (tmp_path / "short.pkl").write_bytes(pickle.dumps({"a": ["b"]})[:-5])
    common = ["--root", root]
    return [
        ("csv without video_id", ["--list", tmp_path / "no_video_id.csv", "--format", "msrvtt", *common], "video_id"),
        (
            "train csv without captions",
            ["--list", tmp_path / "MSRVTT_train.9k.csv", "--format", "msrvtt", *common],
            "--captions",
        ),
        (
            "vatex json of another shape",
            [
                "--list",
                tmp_path / "list.txt",
                "--format",
                "vatex",
                "--captions",
                tmp_path / "vatex_wrong.json",
                *common,
            ],
            "VATEX",
        ),
        (
            "pickle holding numbers",
            [
                "--list",
                tmp_path / "with_missing_video.txt",
                "--format",
                "msvd",
                "--captions",
                tmp_path / "numbers.pkl",
                *common,
            ],
            "int",
        ),
        (
            "videos missing under root",
            [
                "--list",
                tmp_path / "with_missing_video.txt",
                "--format",
                "msvd",
                "--captions",
                tmp_path / "raw.pkl",
                *common,
            ],
            "not found under",
        ),
        (
            "captions missing for a listed video",
            [
                "--list",
                tmp_path / "with_missing_video.txt",
                "--format",
                "vatex",
                "--captions",
                tmp_path / "vatex_data_partial.json",
                *common,
            ],
            "no captions",
        ),
        (
            "pickle that runs code",
            ["--list", tmp_path / "list.txt", "--format", "msvd", "--captions", tmp_path / "code.pkl", *common],
            "refuses posix.system",
        ),
        (
            "pickle of another class",
            ["--list", tmp_path / "list.txt", "--format", "msvd", "--captions", tmp_path / "odict.pkl", *common],
            "refuses collections.OrderedDict",
        ),
        (
            "truncated pickle",
            ["--list", tmp_path / "list.txt", "--format", "msvd", "--captions", tmp_path / "short.pkl", *common],
            "not a readable pickle",
        ),
    ]


def test_bad_annotations_are_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    (tmp_path / "vatex_data_partial.json").write_text(json.dumps({v: {"enCap": ["x"]} for v in IDS}))
    for name, args, needle in bad_inputs(tmp_path):
        out = tmp_path / "out" / name.replace(" ", "_")
        argv = ["make-shards", *map(str, args), "--out", str(out), "--no-progress"]
        if name == "pickle that runs code":  # this one as a real command line
            result = run_cli(*argv)
            code, stderr = result.returncode, result.stderr
        else:
            code, stderr = cli_main(argv), capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert code == 2, (name, stderr)
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in stderr, (name, stderr)
        assert not out.exists(), name  # nothing written half-way
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_allow_missing_quarantines_instead(tmp_path):
    root = videos(tmp_path / "videos", IDS)
    (tmp_path / "list.txt").write_text("\n".join(IDS + ["video99"]) + "\n")
    (tmp_path / "caps.json").write_text(json.dumps({v: ["c"] for v in IDS + ["video99"]}))
    manifest = make_shards(
        str(tmp_path / "list.txt"),
        "msvd",
        str(root),
        str(tmp_path / "out"),
        captions=str(tmp_path / "caps.json"),
        allow_missing=True,
        progress=False,
    )
    assert manifest["samples"] == 4 and [q["key"] for q in manifest["quarantine"]] == ["video99"]


def test_restricted_unpickler_accepts_plain_data_only(tmp_path):
    path = tmp_path / "p.pkl"
    plain = {"v": [("a", "b"), ["c"]], "w": []}
    path.write_bytes(pickle.dumps(plain, protocol=4))
    assert read_plain_pickle(str(path)) == plain
    for value in ({"v": {1, 2}}, {"v": b"bytes"}, {"v": 1.5}, {"v": None}):
        path.write_bytes(pickle.dumps(value))
        with pytest.raises(UserError, match="only dict, list, str and tuple"):
            read_plain_pickle(str(path))


# ------------------------------------------------------------------------ captions in the loop
def test_tokens_and_mask_follow_the_reference():
    ids, mask = tokenize(["a red square !?!!", "word " * 40, ""], 8)
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == mask.dtype == torch.int64
    sot, eot = 49406, 49407
    assert ids[0, 0] == sot and ids[0, 4] == 0 and ids[0, 6] == eot  # "!" is token 0, like the padding
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert ids[1, -1] == eot and mask[1].sum() == 8  # cut to max_words, EOT kept last
    assert ids[2, :2].tolist() == [sot, eot] and mask[2].sum() == 2


def test_training_caption_is_a_pure_function_of_seed_epoch_key_and_pass():
    caps = [f"caption {i}" for i in range(20)]
    first = [training_caption(caps, 0, 3, f"key{i}") for i in range(40)]
    assert first == [training_caption(caps, 0, 3, f"key{i}") for i in range(40)]  # resumable: same draws
    assert len(set(first)) > 5  # and actually spread over the captions
    assert first != [training_caption(caps, 0, 4, f"key{i}") for i in range(40)]  # a new draw every epoch
    assert first != [training_caption(caps, 1, 3, f"key{i}") for i in range(40)]
    assert first != [training_caption(caps, 0, 3, f"key{i}", occurrence=1) for i in range(40)]
    assert training_caption([], 0, 0, "k") == ""
    assert training_captions([caps, ["only"]], ["key0", "b"], [0, 0], 0, 3) == [first[0], "only"]
    assert evaluation_captions([["a", "b"], ["c"]], ["x", "y"]) == [("x", 0, "a"), ("x", 1, "b"), ("y", 0, "c")]


# ----------------------------------------------------------------------- synthetic caption set
def test_make_synthetic_captions_pairs_forwards_and_backwards(tmp_path):
    from side4video.data.video import decode_frames

    counts = make_synthetic(
        str(tmp_path), videos=8, classes=4, val_videos=4, frames=6, size=32, shard_samples=4, captions=True
    )
    assert counts == {"train": 8, "val": 4}
    for split, frames in (("train", TRAIN_FRAMES), ("val", VAL_FRAMES)):
        shardset = resolve_shards(str(tmp_path / split / "manifest.json"))
        samples = sorted((s for sh in shardset.shards for s in iter_shard(sh, bad=BadLog())), key=lambda s: s.key)
        for fwd, bwd in zip(samples[::2], samples[1::2]):
            assert (fwd.label, bwd.label) in ((0, 1), (2, 3))
            assert len(fwd.captions) == len(bwd.captions) == len(frames)
            direction = {0: ("right", "left"), 2: ("down", "up")}[fwd.label]
            assert all(direction[0] in c for c in fwd.captions) and all(direction[1] in c for c in bwd.captions)
            # the same shape and colour named, the same frames played the other way
            assert fwd.captions[0].split()[1:4] == bwd.captions[0].split()[1:4]
            a, b = decode_frames(fwd.video, range(6)), decode_frames(bwd.video, range(6))
            reversed_gap = np.abs(a.astype(int) - b[::-1].astype(int)).mean()  # VP9 at 32 px is lossy
            assert reversed_gap < 8 and np.abs(a.astype(int) - b.astype(int)).mean() > 2 * reversed_gap
            for s in (fwd, bwd):  # every sentence frame of the split, with the named colour and shape
                colour, shape = s.captions[0].split()[3:5] if split == "val" else s.captions[0].split()[1:3]
                assert s.captions == motion_captions(s.label, colour, shape, split)
    train_frames = {f.format(a="a", colour="C", shape="S", motion="M") for f in TRAIN_FRAMES}
    val_frames = {f.format(a="a", colour="C", shape="S", motion="M") for f in VAL_FRAMES}
    assert not train_frames & val_frames  # held-apart sentence frames
