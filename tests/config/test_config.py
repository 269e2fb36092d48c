"""Config composition, overrides, every rejection path, redaction (the CLI's side: tests/cli)."""

from pathlib import Path

import pytest

from side4video.config import load_config, redacted, schema_fields, to_yaml
from side4video.errors import UserError
from tests.support import REPO

CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_merge_in_order_then_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", "train: {lr: 0.1, epochs: 3}\ndata: {frames: 4}\n")
    write(tmp_path / "data" / "a.yaml", "train: {lr: 0.2}\ndata: {frames: 6, size: 32}\n")
    write(tmp_path / "model" / "b.yaml", "train: {lr: 0.3}\n")
    exp = write(tmp_path / "experiments" / "exp.yaml", "defaults: [base, data/a, model/b]\ndata: {size: 48}\n")
    cfg = load_config(exp)
    assert cfg.train.lr == 0.3  # the last base wins over earlier ones
    assert cfg.train.epochs == 3  # untouched by later layers
    assert cfg.data.frames == 6
    assert cfg.data.size == 48  # the file itself wins over its bases
    cfg = load_config(exp, ["train.lr=0.5", "data.size=64"])
    assert cfg.train.lr == 0.5 and cfg.data.size == 64  # overrides apply last


def test_nested_defaults_and_cycles(tmp_path):
    write(tmp_path / "root.yaml", "train: {epochs: 7}\n")
    write(tmp_path / "mid.yaml", "defaults: [root]\ntrain: {lr: 0.01}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "defaults: [mid]\n"))
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.01)
    write(tmp_path / "x.yaml", "defaults: [y]\n")
    write(tmp_path / "y.yaml", "defaults: [x]\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "x.yaml")


def test_overrides_accept_lists_and_types():
    cfg = load_config(CONFIGS / "demo.yaml", ["model.side.layers=[0,2]", "data.resize=[64,80]", "train.epochs=2"])
    assert list(cfg.model.side.layers) == [0, 2]
    assert list(cfg.data.resize) == [64, 80]
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"unknown config key 'train\.lrr' \(did you mean train\.lr\?\)"),
        ("dta.frames=4", r"unknown config key 'dta' \(did you mean data\?\)"),
        ("train.lr=abc", r"'train\.lr' expects float, got 'abc'"),
        ("data.frames=many", r"'data\.frames' expects int"),
        ("model.method=lora", r"'model\.method' is 'lora'; allowed: side4video, adapter, full, linear_probe"),
        ("deepspeed.zero_stage=4", r"'deepspeed\.zero_stage' is 4; allowed: 0, 1, 2, 3"),
        ("model.backbone.precision=fp8", r"allowed: fp16, bf16, fp32"),
        ("model.side.layers=some", r"model\.side\.layers"),
        ("model.side.layers=[1,-2]", r"model\.side\.layers"),
        ("data.frames=0", r"'data\.frames' must be at least 1"),
        ("data.crop_area=[0.9,0.1]", r"data\.crop_area"),
        ("deepspeed.offload_param=cpu", r"needs deepspeed\.zero_stage=3"),
        ("nokeyvalue", r"not of the form key=value"),
    ],
)
def test_rejections_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_rejections_in_yaml_files(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'data\.frame' \(did you mean data\.frames\?\)"):
        load_config(write(tmp_path / "bad.yaml", "data: {frame: 8}\n"))
    with pytest.raises(UserError, match="not found"):
        load_config(write(tmp_path / "nobase.yaml", "defaults: [missing_base]\n"))
    with pytest.raises(UserError, match="not a valid YAML"):
        load_config(write(tmp_path / "syntax.yaml", "data: {frames: [1, 2\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_secrets_are_redacted_but_kept_in_the_config():
    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "data.s3.secret_access_key=hunter2",
            "data.s3.access_key_id=AKIA123",
            "data.s3.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert cfg.data.s3.secret_access_key == "hunter2"  # the program still sees the value
    shown = redacted(cfg)["data"]["s3"]
    assert shown["secret_access_key"] == "***" and shown["access_key_id"] == "***"
    assert shown["endpoint_url"] == "http://127.0.0.1:9000"
    text = to_yaml(cfg)
    assert "hunter2" not in text and "AKIA123" not in text


def test_every_field_has_help_and_every_shipped_config_loads():
    for key, f, _ in schema_fields():
        assert f.metadata.get("help"), key
    shipped = sorted(CONFIGS.rglob("*.yaml"))
    assert len(shipped) >= 15
    for path in shipped:
        load_config(path)  # none of them may have a stale key
