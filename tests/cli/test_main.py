"""The command line: every command has help with an example, bad input of any kind is one line
and exit status 2, `config` prints the composed YAML, predictions print as a table."""

import subprocess
import sys

import pytest
import yaml

from side4video.cli.run import format_predictions
from tests.support import REPO


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "side4video.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_config_prints_yaml_with_override():
    out = run_cli("config", "configs/demo.yaml", "train.lr=0.5")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["train"]["lr"] == 0.5


@pytest.mark.parametrize(
    "args, needle",
    [
        (("config", "configs/demo.yaml", "train.lrr=1"), "train.lr"),
        (("config", "configs/demo.yaml", "train.lr=abc"), "train.lr"),
        (("config", "configs/nope.yaml"), "nope.yaml"),
        (("trian",), "invalid choice"),
        (("plan",), "config"),
        (("make-shards", "--format", "k400"), "--list"),
        (("predict", "/no-such-export", "/no-such-video.webm"), "not found"),  # imports DeepSpeed: no notice lines
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert lines[0].startswith("side4video: error: ") and not lines[0].startswith("side4video: error: side4video")
    assert "Traceback" not in out.stderr


def test_cli_help_for_every_command():
    from side4video.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    expected = {
        "make-shards",
        "inspect",
        "make-synthetic",
        "train",
        "eval",
        "predict",
        "submit",
        "plan",
        "bench",
        "convert-official",
        "config",
        "demo",
    }
    assert expected <= set(commands)
    assert run_cli("--help").returncode == 0
    for name in sorted(expected):
        out = run_cli(name, "--help")
        assert out.returncode == 0 and "example:" in out.stdout, name


def test_predictions_print_classes_or_captions_one_per_line():
    classes = {
        "video": "a.mp4",
        "views": 6,
        "top": [{"class": "push", "index": 2, "probability": 0.75}, {"class": "pull", "index": 0, "probability": 0.25}],
    }
    assert format_predictions(classes).splitlines() == [
        "a.mp4 (6 views)",
        "  1. push                          75.00%",
        "  2. pull                          25.00%",
    ]
    captions = {"video": "b.mp4", "views": 1, "captions": [{"caption": "a dog runs", "similarity": 0.3125}]}
    assert format_predictions(captions).splitlines() == ["b.mp4 (1 views)", "  1. +0.3125  a dog runs"]
