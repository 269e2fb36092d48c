"""`side4video bench stream`: shard streaming throughput from a folder, an HTTP server and an S3
server, through the loader's readers (no decoding) beside a raw client on the same objects.

Sources, all on this host: a folder; Python's http.server serving it from its own process; a
SeaweedFS S3 server (`weed server -s3`, see bench/servers.py) holding the same shards. Clients:
- readers: `RankStream` (what the loader runs: shard reader threads, tar parsing, retries and
           resume at the byte reached), 1 and 4 reader threads, every sample consumed;
- raw:     the plainest full read of the same shard objects with as many threads: a file read,
           an HTTP GET (urllib), boto3's get_object.
MB/s counts the shard bytes read (1 MB = 1e6 bytes); samples/s the samples delivered. The best of
`passes` interleaved passes is kept (every pass in the JSON). Without --config the shards are
generated: 16 shards of 96 samples of 256 KiB of random bytes (384 MiB, passes of a few tenths
of a second; --quick: 4 x 8 x 64 KiB);
the folder is read from the page cache, as a warm local disk would be.
Writes OUT/stream.json, OUT/stream.md and OUT/stream.png.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from side4video.bench.servers import FolderHTTPServer, SeaweedS3
from side4video.config import DataConfig, load_config
from side4video.data.manifest import MANIFEST_NAME
from side4video.data.shards import ShardWriter
from side4video.data.stream import RankStream, resolve_shards
from side4video.logs import get_logger

log = get_logger(__name__)

BUCKET = "side4video-bench"
READERS = (1, 4)
GOAL = 0.8  # readers' MB/s at 4 threads, as a fraction of the raw client's


def _write_shards(folder: Path, shards: int, samples: int, sample_bytes: int) -> None:
    writer = ShardWriter(str(folder), max_samples=samples, prefix="bench")
    rng = np.random.default_rng(0)
    for i in range(shards * samples):
        writer.write(f"clip{i:06d}", rng.bytes(sample_bytes), "mp4", {"label": i % 8})
    writer.close([f"class{c}" for c in range(8)], [], "bench")


def _shard_files(folder: Path) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tar"))


# --------------------------------------------------------------------------------- the clients
def _readers_pass(url: str, data_cfg: DataConfig, readers: int) -> Callable[[], Tuple[int, int]]:
    shardset = resolve_shards(url, data_cfg)
    total = sum(s.bytes or 0 for s in shardset.shards)

    def one_pass() -> Tuple[int, int]:
        stream = RankStream(shardset, data_cfg, epoch=0, workers=readers, shuffle_shards=False)
        samples = sum(1 for _ in stream)
        return total, samples

    return one_pass


def _threaded(read_one: Callable[[str], int], names: Sequence[str], threads: int) -> Callable[[], Tuple[int, int]]:
    def one_pass() -> Tuple[int, int]:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read_one, names)), 0

    return one_pass


def _raw_file(folder: Path) -> Callable[[str], int]:
    def read_one(name: str) -> int:
        with open(folder / name, "rb", buffering=0) as f:
            n = 0
            while chunk := f.read(8 << 20):
                n += len(chunk)
        return n

    return read_one


def _raw_http(base: str) -> Callable[[str], int]:
    def read_one(name: str) -> int:
        with urllib.request.urlopen(f"{base}/{name}", timeout=60) as resp:
            n = 0
            while chunk := resp.read(8 << 20):
                n += len(chunk)
        return n

    return read_one


def _raw_s3(server: SeaweedS3, prefix: str) -> Callable[[str], int]:
    client = server.client()  # boto3 clients are thread-safe

    def read_one(name: str) -> int:
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"]
        n = 0
        while chunk := body.read(8 << 20):
            n += len(chunk)
        return n

    return read_one


def _timed(one_pass: Callable[[], Tuple[int, int]]) -> Dict:
    start = time.perf_counter()
    nbytes, samples = one_pass()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": nbytes, "samples": samples}


# ------------------------------------------------------------------------------------------ run
def run(out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False) -> Dict:
    os.makedirs(out, exist_ok=True)
    cfg = load_config(config, list(overrides))
    shards, samples, sample_bytes, passes = (4, 8, 64 << 10, 2) if quick else (16, 96, 256 << 10, 3)
    work = Path(tempfile.mkdtemp(prefix="side4video-bench-stream-"))
    s3 = SeaweedS3(work / "seaweedfs")
    http = None
    try:
        folder = work / "shards"
        _write_shards(folder, shards, samples, sample_bytes)
        names = _shard_files(folder)
        total_bytes = sum(os.path.getsize(folder / n) for n in names)
        http = FolderHTTPServer(folder)
        http.start()
        s3.start()
        s3.upload_folder(folder, BUCKET, "shards")
        s3_cfg = load_config(config, [*overrides, *s3.overrides()]).data
        sources = {
            "folder": (str(folder / MANIFEST_NAME), cfg.data, _raw_file(folder), "file read"),
            "http": (f"{http.url}/{MANIFEST_NAME}", cfg.data, _raw_http(http.url), "urllib GET"),
            "s3": (f"s3://{BUCKET}/shards/{MANIFEST_NAME}", s3_cfg, _raw_s3(s3, "shards"), "boto3 get_object"),
        }
        cases: Dict[Tuple[str, str, int], Callable] = {}
        for source, (url, data_cfg, raw_one, _) in sources.items():
            for threads in READERS:
                cases[(source, "readers", threads)] = _readers_pass(url, data_cfg, threads)
                cases[(source, "raw", threads)] = _threaded(raw_one, names, threads)
        runs: Dict[Tuple[str, str, int], List[Dict]] = {k: [] for k in cases}
        for p in range(passes):  # interleaved: a slow moment of the machine touches every case alike
            for key, one_pass in cases.items():
                runs[key].append(_timed(one_pass))
                log.info("pass %d %s: %.1f MB/s", p, key, runs[key][-1]["bytes"] / runs[key][-1]["seconds"] / 1e6)
    finally:
        if http is not None:
            http.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        _row(source, client, threads, runs[(source, client, threads)], samples * shards, sources[source][3])
        for (source, client, threads) in cases
    ]
    report = {
        "what": "shard streaming MB/s and samples/s: the loader's readers (no decoding) vs a raw client",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {
            "shards": shards,
            "samples_per_shard": samples,
            "sample_bytes": sample_bytes,
            "total_bytes": total_bytes,
            "read_chunk": int(cfg.data.read_chunk),
        },
        "passes": passes,
        "rows": rows,
        "ratios": _ratios(rows),
        "goal": f"readers >= {GOAL:.0%} of the raw client's MB/s with 4 readers",
    }
    with open(os.path.join(out, "stream.json"), "w") as f:
        json.dump(report, f, indent=2)
    _write_markdown(report, os.path.join(out, "stream.md"))
    _write_plot(report, os.path.join(out, "stream.png"))
    return report


def _row(source: str, client: str, threads: int, passes: List[Dict], samples: int, raw_name: str) -> Dict:
    best = min(passes, key=lambda r: r["seconds"])
    return {
        "source": source,
        "client": "readers" if client == "readers" else f"raw ({raw_name})",
        "kind": client,
        "threads": threads,
        "mb_per_s": best["bytes"] / best["seconds"] / 1e6,
        "samples_per_s": samples / best["seconds"],
        "seconds": best["seconds"],
        "pass_seconds": [r["seconds"] for r in passes],
        "samples": best["samples"] if client == "readers" else samples,
    }


def _ratios(rows: List[Dict]) -> List[Dict]:
    by = {(r["source"], r["kind"], r["threads"]): r for r in rows}
    out = []
    for (source, kind, threads), row in by.items():
        if kind == "readers":
            raw = by[(source, "raw", threads)]
            ratio = row["mb_per_s"] / raw["mb_per_s"]
            out.append(
                {
                    "source": source,
                    "threads": threads,
                    "readers_over_raw": ratio,
                    "meets_goal": ratio >= GOAL if threads == max(READERS) else None,
                }
            )
    return out


def _write_markdown(r: Dict, path: str) -> None:
    d = r["data"]
    lines = [
        "# Shard streaming: the loader's readers vs a raw client",
        "",
        f"{d['shards']} shards x {d['samples_per_shard']} samples of {d['sample_bytes'] >> 10} KiB "
        f"({d['total_bytes'] / 1e6:.1f} MB), servers on 127.0.0.1, best of {r['passes']} interleaved passes; "
        f"{r['host']['cpus']} CPUs. Readers: RankStream (tar parsing, retries, resume), no decoding.",
        "",
        "| source | client | threads | MB/s | samples/s |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['source']} | {row['client']} | {row['threads']} | {row['mb_per_s']:.0f} | "
            f"{row['samples_per_s']:.0f} |"
        )
    lines += ["", "| source | threads | readers / raw |", "|---|---|---|"]
    for q in r["ratios"]:
        mark = "" if q["meets_goal"] is None else (" (goal met)" if q["meets_goal"] else " (below goal)")
        lines.append(f"| {q['source']} | {q['threads']} | {q['readers_over_raw']:.2f}{mark} |")
    lines += ["", f"Goal: {r['goal']}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _write_plot(r: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(row["source"] for row in r["rows"]))
    series = [(kind, threads) for kind in ("readers", "raw") for threads in READERS]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(series)
    for i, (kind, threads) in enumerate(series):
        values = [
            next(
                row["mb_per_s"]
                for row in r["rows"]
                if row["source"] == s and row["kind"] == kind and row["threads"] == threads
            )
            for s in sources
        ]
        ax.bar(
            np.arange(len(sources)) + (i - (len(series) - 1) / 2) * width,
            values,
            width,
            label=f"{kind}, {threads} thread{'s' if threads > 1 else ''}",
        )
    ax.set_xticks(np.arange(len(sources)), sources)
    ax.set_ylabel("MB/s")
    ax.set_title("shard streaming on 127.0.0.1 (no decoding)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
