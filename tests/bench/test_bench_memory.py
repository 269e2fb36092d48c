"""`side4video bench memory --quick`: every case measured in its own process, growth per clip, the
planner's figure beside each measured one, files written."""

import json

import pytest

from side4video.bench.memory import BATCHES, allocated
from tests.support.engine import run_cli

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


@pytest.mark.timeout(900)
def test_bench_memory_quick_writes_json_markdown_png(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench", "memory", "--out", str(out), "--quick"], timeout=900)
    report = json.loads((out / "memory.json").read_text())
    methods = {row["method"]: row for row in report["methods"]}
    assert set(methods) == {"Side4Video", "Side4Video light (d=128)", "ST-Adapter", "full fine-tuning", "linear probe"}
    frames = int(report["setup"]["data.frames"])
    for row in report["methods"]:
        # clips 1, 2, 4 at the setup's frames, then 1 clip at twice the frames; each with the planner's figure
        assert [(r["batch"], r["frames"]) for r in row["runs"]] == [(b, frames) for b in BATCHES] + [(1, 2 * frames)]
        for run in row["runs"]:
            assert run["peak_rss_bytes"] > run["model_bytes"] > 0 and run["step_s"] > 0
            assert run["freed_memory_released"] and 0 < allocated(run) <= run["peak_above_model_bytes"]
            assert run["predicted"]["peak_above_model"] > 0
        assert {"per_clip_bytes", "fixed_bytes", "per_frames_doubled_bytes", "plan_check"} <= set(row)
    for row in report["engine_layout"]:
        assert row["peak_rss_bytes"] > row["model_bytes"] > 0 and row["step_s"] > 0
    assert not report["glibc_default"]["freed_memory_released"]
    # the precision policy: frozen backbones stay in their fp16 storage; backpropagated ones train in fp32
    for row in report["engine_layout"] + [methods["Side4Video"]["runs"][0], methods["linear probe"]["runs"][0]]:
        assert (row["storage_dtype"], row["compute_dtype"]) == ("fp16", "fp32")
    for row in (methods["ST-Adapter"]["runs"][0], methods["full fine-tuning"]["runs"][0]):
        assert (row["storage_dtype"], row["compute_dtype"]) == ("fp32", "fp32")
    # what is trained differs as the methods say
    trained = {m: row["runs"][0]["trainable_params"] for m, row in methods.items()}
    assert trained["linear probe"] < trained["ST-Adapter"] < trained["full fine-tuning"]
    assert trained["Side4Video light (d=128)"] <= trained["Side4Video"]
    assert [r["layout"] for r in report["engine_layout"]] == [
        "shared, ZeRO-2",
        "separate, ZeRO-2",
        "shared, ZeRO-3",
        "separate, ZeRO-3",
    ]
    assert set(report["goals"]) == {"side4video_vs_adapter", "side4video_vs_full"}
    assert set(report["plan_within_tolerance"]) == {"Side4Video", "ST-Adapter", "full fine-tuning", "linear probe"}
    text = (out / "memory.md").read_text()
    assert "| Side4Video | 2 x" in text and "per added clip" in text and "planner error" in text
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
