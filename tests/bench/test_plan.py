"""`side4video plan`: parameter counts of real modules built on `meta` (docs/model.md figures)."""

import json
from pathlib import Path

from side4video.cli.configs import format_plan
from side4video.engine.plan import plan
from side4video.cli import main
from side4video.config import load_config

from tests.support import REPO
DEMO = str(REPO / "configs" / "demo.yaml")


def run_plan(capsys, *overrides):
    assert main(["plan", DEMO, *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout


def test_vit_b16_side_network_is_21_06_m(capsys):
    report = run_plan(capsys, "model.backbone.name=ViT-B-16", "model.side.dim=320", "data.size=224")
    assert report["side_params"] == 21_056_832  # 21.06 M
    assert report["backbone_params"] == 85_797_888  # the vision tower without ln_post / proj
    assert report["head_params"] == 320 * 8 + 8
    assert report["trainable_params"] == report["side_params"] + report["head_params"]
    assert report["side_blocks"] == 12 and report["tap_layers"] == list(range(12)) and report["side_variant"] == "clip"
    for key in ("backbone_params", "side_params", "head_params", "trainable_params"):
        assert isinstance(report[key], int)


def test_vit_l14_side_network_is_102_0_m(capsys):
    report = run_plan(capsys, "model.backbone.name=ViT-L-14", "model.side.dim=512", "data.size=224")
    assert round(report["side_params"] / 1e6, 1) == 102.0
    assert report["side_blocks"] == 24


def test_eva02_e14_side_network_is_183_m_over_a_4_35_b_backbone(capsys):
    report = run_plan(capsys, "model.backbone.name=EVA02-E-14", "model.side.dim=576", "data.size=224",
                      "model.backbone.precision=bf16")
    assert report["side_variant"] == "eva" and report["side_blocks"] == 32
    assert report["tap_layers"] == list(range(1, 64, 2))
    assert round(report["side_params"] / 1e6) == 183
    assert round(report["backbone_params"] / 1e9, 2) == 4.35
    mem = report["memory"]
    assert mem["backbone_weights_bytes"] == 2 * report["backbone_params"]  # bf16 storage
    assert mem["backbone_weights_bytes_by_precision"]["fp32"] == 4 * report["backbone_params"]


def test_baselines_count_what_they_train():
    base = ["model.backbone.name=ViT-B-16", "data.size=224", "data.num_classes=174"]
    probe = plan(load_config(DEMO, [*base, "model.method=linear_probe"]))
    assert probe["trainable_params"] == probe["head_params"] == 768 * 174 + 174
    adapter = plan(load_config(DEMO, [*base, "model.method=adapter", "model.adapter.dim=64"]))
    assert adapter["adapter_params"] == 12 * ((768 * 64 + 64) + (64 * 3 + 64) + (64 * 768 + 768))
    assert adapter["trainable_params"] == adapter["adapter_params"] + adapter["head_params"]
    full = plan(load_config(DEMO, [*base, "model.method=full"]))
    assert full["trainable_params"] == full["backbone_params"] + full["head_params"]
    assert full["storage_precision"] == "fp32"


def test_text_plan_and_bad_input(capsys):
    assert main(["plan", DEMO]) == 0
    text = capsys.readouterr().out
    assert "side params" in text and "ViT-T-8" in text
    assert main(["plan", DEMO, "model.side.layers=[7]"]) == 2
    assert "model.side.layers" in capsys.readouterr().err
    assert main(["plan", DEMO, "data.size=50"]) == 2  # not a multiple of the patch size
    assert format_plan(plan(load_config(DEMO))).count("\n") > 5
