"""`side4video bench vite --quick`: the ViT-E benchmark's own path (real `side4video train` runs of
the EVA config, 1 and 2 ranks, ZeRO-3 + offload) on a tiny EVA-shaped backbone."""

import json

import pytest

from tests.support.engine import run_cli

PHASES = ["imports", "model built", "deepspeed.initialize"] + [
    f"{step} {what}" for step in ("first", "second") for what in ("forward", "backward", "optimizer step")
]

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


@pytest.mark.timeout(900)
def test_bench_vite_quick_writes_json_markdown_png(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench", "vite", "--out", str(out), "--quick"], timeout=880)
    report = json.loads((out / "vite.json").read_text())
    one, two = report["cases"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and len(two["per_rank"]) == 2
    for row in report["cases"]:
        assert row["steps"] == 2 and all(s > 0 for s in row["step_s"])
        for m in row["per_rank"]:
            assert m["peak_rss_training_bytes"] >= m["rss_after_build_bytes"] > 0
            # the memory timeline of each rank: every phase once, in order, peaks never falling
            assert [t["at"] for t in m["timeline"]] == PHASES
            peaks = [t["peak_bytes"] for t in m["timeline"]]
            assert peaks == sorted(peaks) and all(0 < t["rss_bytes"] <= t["peak_bytes"] for t in m["timeline"])
        assert row["planned_peak_per_rank"] > 0
    # the backbone is partitioned: one rank holds all of it; each of two ranks half of it, plus the
    # small tensors ZeRO-3 keeps whole (below its persistence threshold; a large part of this tiny model)
    assert one["backbone_held_fraction"] == [pytest.approx(1.0, abs=0.02)]
    assert all(0.45 < f < 0.8 for f in two["backbone_held_fraction"])
    assert "| a: 1 rank" in (out / "vite.md").read_text()
    assert "| b: 2 ranks, 28 px x 2 frames | 1 | " in (out / "vite.md").read_text().split("after each phase")[1]
    assert (out / "vite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
