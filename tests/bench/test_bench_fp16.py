"""`side4video bench fp16 --quick`: the fp16 overflow check of EVA ViT-E blocks on a few small blocks
(the benchmark itself builds EVA02-E-14's 64 blocks at 224 px one at a time)."""

import json

import torch

from side4video.bench import fp16
from side4video.cli import main


def test_bench_fp16_reports_the_largest_activation_per_block(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "fp16", "--out", str(out), "--quick"]) == 0
    report = json.loads((out / "fp16.json").read_text())
    assert (report["backbone"], report["width"], report["layers"]) == ("EVA02-E-14", 1792, 4)
    assert report["fp16_max"] == 65504.0 and not report["overflow"]
    rows = report["blocks"]
    assert [r["block"] for r in rows] == [0, 1, 2, 3]
    for r in rows:  # the block output is one of the tensors looked at
        assert 0 < r["max_abs_output"] <= r["max_abs_inside"] < 65504
        assert 0 < r["max_deviation_vs_fp32"] < 1e-2  # computed in fp16 for real: close to fp32, not equal
    assert report["compute"].startswith("fp16")
    assert report["max_abs"] == max(r["max_abs_inside"] for r in rows)
    assert report["headroom"] == 65504.0 / report["max_abs"]
    assert "| 3 |" in (out / "fp16.md").read_text() and "headroom" in capsys.readouterr().out


def test_bench_fp16_finds_an_overflow(monkeypatch):
    """Weights 300x the init scale in block 2: its activations pass 65504 and the report says so."""
    import side4video.model.backbone as backbone

    init = backbone.random_init
    blocks = []

    def scaled(module, **kwargs):
        init(module, **kwargs)
        blocks.append(module)
        if len(blocks) == 4:  # stem, blocks 0, 1, then block 2
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(300.0)

    monkeypatch.setattr(backbone, "random_init", scaled)
    report = fp16.block_maxima(image_size=56, layers=4)
    assert report["overflow"] and report["max_abs_block"] == 2 and report["max_abs"] > 65504
