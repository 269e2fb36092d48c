"""`side4video bench checkpoint --quick`: the checkpoint benchmark's own path (real `side4video train`
runs of the EVA config on 1, 2, 2 and 1 ranks in one run directory) on a tiny EVA-shaped backbone."""

import json

import pytest

from tests.support.engine import run_cli

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


@pytest.mark.timeout(900)
def test_bench_checkpoint_quick_saves_and_loads_across_world_sizes(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench", "checkpoint", "--out", str(out), "--quick"], timeout=880)
    report = json.loads((out / "checkpoint.json").read_text())
    events = report["events"]
    assert [(e["kind"], e.get("written_by"), e["ranks"]) for e in events] == [
        ("saved", None, 1),
        ("loaded", 1, 2),
        ("saved", None, 2),
        ("loaded", 2, 2),
        ("saved", None, 2),
        ("loaded", 2, 1),
        ("saved", None, 1),
    ]
    assert all(e["seconds"] > 0 for e in events)
    # the gathered copy: fp32 master + AdamW's two moments of every trained parameter, and little else
    trained = report["trainable_params"]  # counted on the meta device, not read from the files
    for e in (e for e in events if e["kind"] == "saved"):
        assert 12 * trained <= e["trained_state_bytes"] <= 12 * trained + (1 << 20)
        assert e["deepspeed_bytes"] > 12 * trained  # DeepSpeed's files hold the same, partitioned, and more
    for e in (e for e in events if e["kind"] == "saved"):  # the two parts timed apart
        assert 0 < e["deepspeed_seconds"] and 0 < e["trained_state_seconds"]
        assert e["deepspeed_seconds"] + e["trained_state_seconds"] <= e["seconds"]
    # the universal format of the 2-rank checkpoint: the same state again, one folder per parameter
    universal = report["universal"]
    assert universal["seconds"] > 0 and universal["universal_bytes"] > 12 * trained and universal["files"] > 3
    assert "| loaded | 1 | 2 |" in (out / "checkpoint.md").read_text()
    assert "universal format" in (out / "checkpoint.md").read_text()
    assert (out / "checkpoint.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
