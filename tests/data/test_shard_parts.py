"""make-shards at scale (data/parts.py): a seeded shuffle before the plan, independent parts and
their merge, a part killed mid-way and rerun, parts made with other settings refused, videos read
from S3 and HTTP roots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from side4video.cli.main import main as cli_main
from side4video.data.parts import merge_parts
from side4video.data.shards import make_shards
from tests.support.data import BUCKET, encode

CLASSES = 3
PER_CLASS = 8


def class_sorted_videos(root: Path, tmp_path: Path):
    """24 tiny VP9 videos of 3 classes, listed class by class, and one broken file (quarantined)."""
    lines = []
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            rel = f"c{c}/v{i}.webm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode(c * 100 + i))
            lines.append(f"{rel} {c}")
    (root / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not a video" * 10)
    lines.append("broken.webm 1")
    listf = tmp_path / "list.txt"
    listf.write_text("\n".join(lines) + "\n")
    return listf


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    root = tmp / "videos"
    return root, class_sorted_videos(root, tmp)


def _shard_files(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, {s["url"]: (out / s["url"]).read_bytes() for s in manifest["shards"]}


def _samples(files):
    """key -> (video bytes, metadata bytes) of every shard."""
    import io
    import tarfile

    got = {}
    for data in files.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                got.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return got


def test_shuffled_by_default_and_recorded(videos, tmp_path):
    """The plan shuffles the class-sorted list (seeded): shards of 8 hold several classes; the seed
    is in the manifest; --no-shuffle keeps the list order (single-class shards)."""
    root, listf = videos
    shuffled = make_shards(str(listf), "list", str(root), str(tmp_path / "a"), shard_samples=8, progress=False)
    again = make_shards(str(listf), "list", str(root), str(tmp_path / "b"), shard_samples=8, progress=False)
    ordered = make_shards(
        str(listf), "list", str(root), str(tmp_path / "c"), shard_samples=8, shuffle=False, progress=False
    )
    assert shuffled["shuffle"] is True and shuffled["seed"] == 0 and ordered["shuffle"] is False
    assert [s["keys"] for s in shuffled["shards"]] == [s["keys"] for s in again["shards"]]  # seeded
    classes = lambda m: [len({k.split("/")[0] for k in s["keys"]}) for s in m["shards"]]  # noqa: E731
    assert classes(ordered) == [1, 1, 1] and min(classes(shuffled)[:3]) >= 2  # the 4th: 1 video
    assert [q["path"] for q in shuffled["quarantine"]] == ["broken.webm"]


def test_four_parts_make_the_same_dataset_as_one_process(videos, tmp_path, capsys):
    """Four independent parts and their merge: the same shard files byte for byte, the same keys,
    classes, counts and quarantine as one process; a merge before every part is done is refused."""
    root, listf = videos
    common = ["--list", str(listf), "--format", "list", "--root", str(root), "--shard-samples", "3", "--no-progress"]
    one, four = tmp_path / "one", tmp_path / "four"
    assert cli_main(["make-shards", *common, "--out", str(one), "--workers", "2"]) == 0
    for k in (2, 0, 3):
        assert cli_main(["make-shards", *common, "--out", str(four), "--part", str(k), "--parts", "4"]) == 0
    assert cli_main(["merge-shards", str(four)]) == 2
    assert "part(s) 1 of 4 not finished" in capsys.readouterr().err
    assert not (four / "manifest.json").exists()
    assert cli_main(["make-shards", *common, "--out", str(four), "--part", "1", "--parts", "4"]) == 0
    assert cli_main(["merge-shards", str(four)]) == 0
    m1, files1 = _shard_files(one)
    m4, files4 = _shard_files(four)
    assert files1 == files4 and len(files1) == 9  # 25 listed videos in planned shards of 3
    assert _samples(files1) == _samples(files4) and len(_samples(files1)) == 24
    for key in ("shards", "classes", "samples", "num_classes", "quarantine"):
        assert m1[key] == m4[key], key
    assert m4["samples"] == 24 and m4["parts"] == 4 and m1["parts"] == 1


def test_the_merge_refuses_parts_made_with_other_settings(videos, tmp_path, capsys):
    root, listf = videos
    common = ["--list", str(listf), "--format", "list", "--root", str(root), "--shard-samples", "6", "--no-progress"]
    out = str(tmp_path / "mixed")
    assert cli_main(["make-shards", *common, "--out", out, "--part", "0", "--parts", "2"]) == 0
    assert cli_main(["make-shards", *common, "--out", out, "--part", "1", "--parts", "2", "--seed", "7"]) == 0
    capsys.readouterr()
    assert cli_main(["merge-shards", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "seed: 0 vs 7" in err and len(err.splitlines()) == 1
    # rerunning a part with other settings into the same output is refused too
    assert cli_main(["make-shards", *common, "--out", out, "--part", "0", "--parts", "2", "--no-shuffle"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli_main(["make-shards", *common, "--out", out, "--part", "2", "--parts", "2"]) == 2
    assert "need 0 <= part < parts" in capsys.readouterr().err


class _StallingServer:
    """An HTTP server over a folder whose GET of one file waits until `release()` (HEAD answers):
    a part reading its videos from it stops there, deterministically, until it is killed."""

    def __init__(self, folder: Path, stall: str):
        import functools
        import http.server

        released = self.released = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                if self.path.lstrip("/") == stall:
                    released.wait(120)
                return super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # the killed part's dropped connection
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(180)
def test_a_killed_part_is_rerun_without_rewriting_its_finished_shards(videos, tmp_path):
    """Part 0 of 2 reads its videos over HTTP and is killed (SIGKILL) while a video of its third
    planned shard hangs; the rerun keeps the two finished shards (same inode and mtime) and writes
    the rest; the merged dataset equals one uninterrupted process's."""
    root, listf = videos
    settings = dict(shard_samples=3, seed=5, progress=False)
    straight = make_shards(str(listf), "list", str(root), str(tmp_path / "straight"), **settings)
    # part 0 of 2 writes planned shards 0, 2, 4, 6, 8 (25 listed in 9): its third is planned shard 4
    stall = next(s for s in straight["shards"] if s["url"] == "shard-000004.tar")["keys"][1] + ".webm"
    server = _StallingServer(root, stall)
    out = tmp_path / "resumed"
    argv = ["--list", str(listf), "--format", "list", "--root", server.url, "--out", str(out)]
    argv += ["--shard-samples", "3", "--seed", "5", "--no-progress", "--parts", "2"]
    cmd = [sys.executable, "-m", "side4video.cli", "make-shards", *argv]
    try:
        proc = subprocess.Popen(cmd + ["--part", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        progress = out / "parts" / "part-0000-of-0002.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and len(json.loads(progress.read_text())["units"]) == 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # it is stuck on the stalled video: nothing more gets recorded
        assert proc.poll() is None, proc.stdout.read().decode()
        proc.kill()
        proc.wait()
        record = json.loads(progress.read_text())
        assert sorted(record["units"]) == ["0", "2"] and not record["complete"]
        finished = {name: os.stat(out / name) for name in ("shard-000000.tar", "shard-000002.tar")}
        assert not (out / "shard-000004.tar").exists()
        server.released.set()
        logs = []
        for part in ("0", "1"):
            done = subprocess.run(cmd + ["--part", part], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            logs.append(done.stderr)
        assert "5 planned shards of 13 videos, 2 finished before (kept), 7 videos to write" in logs[0]
        assert "7/7 videos" in logs[0] and "videos/s, ETA" in logs[0] and "quarantined" in logs[0]
    finally:
        server.close()
    for name, before in finished.items():
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    merged = merge_parts(str(out))
    m1, files1 = _shard_files(tmp_path / "straight")
    _, files2 = _shard_files(out)
    assert files1 == files2
    assert [s["keys"] for s in merged["shards"]] == [s["keys"] for s in m1["shards"]]
    assert merged["quarantine"] == m1["quarantine"]


@pytest.mark.timeout(120)
def test_videos_from_s3_make_the_same_shards_as_from_a_folder(videos, tmp_path, s3_server, monkeypatch, caplog):
    """--root s3://: the same shards, byte for byte, as from the folder; written to s3:// and run
    again, every finished shard is found there (by its size) and kept."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    root, listf = videos
    client = s3_server.client()
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"videos24/{path.relative_to(root)}")
    local = make_shards(str(listf), "list", str(root), str(tmp_path / "local"), shard_samples=5, progress=False)
    remote = make_shards(
        str(listf), "list", f"s3://{BUCKET}/videos24", f"s3://{BUCKET}/shards24", shard_samples=5, progress=False
    )
    assert [s["keys"] for s in remote["shards"]] == [s["keys"] for s in local["shards"]]
    assert remote["quarantine"] == local["quarantine"] and remote["classes"] == local["classes"]
    for shard in local["shards"]:
        body = client.get_object(Bucket=BUCKET, Key=f"shards24/{shard['url']}")["Body"].read()
        assert body == (tmp_path / "local" / shard["url"]).read_bytes()
    caplog.clear()
    with caplog.at_level("INFO", logger="side4video"):
        again = make_shards(
            str(listf), "list", f"s3://{BUCKET}/videos24", f"s3://{BUCKET}/shards24", shard_samples=5, progress=False
        )
    assert again["shards"] == remote["shards"]
    assert any("5 finished before (kept), 0 videos to write" in r.getMessage() for r in caplog.records)


def test_a_rerun_rewrites_a_recorded_shard_whose_file_changed(videos, tmp_path):
    """A recorded shard cut short (or with a sample count other than recorded) is written again;
    the intact ones are kept (same inode and mtime)."""
    root, listf = videos
    out = tmp_path / "out"
    first = make_shards(str(listf), "list", str(root), str(out), shard_samples=6, progress=False)
    names = [s["url"] for s in first["shards"]]
    before = {name: os.stat(out / name) for name in names}
    data = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(data[: len(data) // 2])
    again = make_shards(str(listf), "list", str(root), str(out), shard_samples=6, progress=False)
    assert again["shards"] == first["shards"] and (out / names[1]).read_bytes() == data
    for name in names:
        after = os.stat(out / name)
        kept = (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
        assert kept == (name != names[1]), name
