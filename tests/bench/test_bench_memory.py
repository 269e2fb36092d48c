"""`side4video bench memory --quick`: every case measured in its own process, files written."""

import json

import pytest

from tests.support.engine import run_cli


@pytest.mark.timeout(600)
def test_bench_memory_quick_writes_json_markdown_png(tmp_path):
    out = tmp_path / "bench"
    run_cli(["bench", "memory", "--out", str(out), "--quick"])
    report = json.loads((out / "memory.json").read_text())
    methods = {row["method"]: row for row in report["methods"]}
    assert set(methods) == {"Side4Video", "Side4Video light (d=128)", "ST-Adapter", "full fine-tuning", "linear probe"}
    for row in report["methods"] + report["engine_layout"]:
        assert row["peak_rss_bytes"] > row["model_bytes"] > 0 and row["step_s"] > 0
    # the precision policy: frozen backbones stay in their fp16 storage; backpropagated ones train in fp32
    for row in report["engine_layout"] + [methods["Side4Video"], methods["linear probe"]]:
        assert (row["storage_dtype"], row["compute_dtype"]) == ("fp16", "fp32")
    for row in (methods["ST-Adapter"], methods["full fine-tuning"]):
        assert (row["storage_dtype"], row["compute_dtype"]) == ("fp32", "fp32")
    # what is trained differs as the methods say
    assert methods["linear probe"]["trainable_params"] < methods["ST-Adapter"]["trainable_params"]
    assert methods["full fine-tuning"]["trainable_params"] > methods["full fine-tuning"]["backbone_params"] - 1
    assert methods["Side4Video light (d=128)"]["trainable_params"] <= methods["Side4Video"]["trainable_params"]
    assert [r["layout"] for r in report["engine_layout"]] == ["shared, ZeRO-2", "separate, ZeRO-2",
                                                                "shared, ZeRO-3", "separate, ZeRO-3"]
    assert set(report["savings"]) == {"side4video_vs_full", "side4video_vs_adapter", "light_vs_adapter"}
    assert "| Side4Video |" in (out / "memory.md").read_text()
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
