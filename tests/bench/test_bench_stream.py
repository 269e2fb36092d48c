"""`side4video bench stream --quick`: the streaming benchmark's own path (generated shards, a folder,
http.server in its own process and a SeaweedFS S3 server, the readers and the raw clients)."""

import json
import subprocess

import pytest

from tests.support.engine import run_cli

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


@pytest.mark.timeout(300)
def test_bench_stream_quick_writes_json_markdown_png(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench", "stream", "--out", str(out), "--quick"], timeout=280)
    report = json.loads((out / "stream.json").read_text())
    d = report["data"]
    cases = {(r["source"], r["kind"], r["threads"]) for r in report["rows"]}
    assert cases == {(s, k, t) for s in ("folder", "http", "s3") for k in ("readers", "raw") for t in (1, 4)}
    for row in report["rows"]:
        assert row["mb_per_s"] > 0 and len(row["pass_seconds"]) == report["passes"]
        if row["kind"] == "readers":  # every sample of every shard delivered, from every source
            assert row["samples"] == d["shards"] * d["samples_per_shard"]
    assert d["total_bytes"] > d["shards"] * d["samples_per_shard"] * d["sample_bytes"]
    assert {(q["source"], q["threads"]) for q in report["ratios"]} == {
        (s, t) for s in ("folder", "http", "s3") for t in (1, 4)
    }
    assert "| s3 | readers | 4 |" in (out / "stream.md").read_text()
    assert (out / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the servers it started are gone (their data folder with them)
    assert (
        "side4video-bench-stream-" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    )
