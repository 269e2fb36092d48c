"""A run continued on another number of ranks (real DeepSpeed engines, ZeRO-2 and ZeRO-3): 2 ranks,
then 1, then 2 again, in one run directory, each stop in the middle of the data epoch. The trained
state comes back bit for bit at each change (checked by the loader itself, which says so), the
global batch is kept by changing grad_accum, the epoch's samples are each used once, and every
step is logged once."""

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.support.engine import DEMO, run_cli, tiny_overrides, train_rows, train_steps

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


def _epoch_keys(manifest: str) -> list:
    return [key for shard in json.loads(Path(manifest).read_text())["shards"] for key in shard["keys"]]


def _config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_then_one_then_two_keep_the_state_and_the_global_batch(motion_data, tmp_path, stage):
    run = tmp_path / "run"
    common = [
        f"deepspeed.zero_stage={stage}",
        "train.max_steps=6",
        "train.save_every=2",
        "train.batch_size=2",
        "train.eval_every=0",
        "train.export=false",
        "logging.tensorboard=false",
        "logging.sample_keys=true",
        "data.workers=2",
    ]
    # stopped at an odd step: the 1-rank run must count its micro-batches at grad_accum 2 from there
    run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *common, "train.stop_at_step=3")], nproc=2)
    layout = json.loads((run / "checkpoints" / "step_0000003" / "layout.json").read_text())
    assert layout == {"world_size": 2, "batch_size": 2, "grad_accum": 1, "zero_stage": stage}

    one = run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *common, "train.stop_at_step=5")], nproc=1)
    assert "resuming 2 ranks -> 1: grad_accum 1 -> 2, global batch 4 kept" in one.stderr
    assert "written by 2 ranks on 1" in one.stderr and "equal the saved ones bit for bit" in one.stderr
    assert _config(run)["train"]["grad_accum"] == 2

    two = run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *common)], nproc=2)
    assert "resuming 1 ranks -> 2: grad_accum 1 -> 1, global batch 4 kept" in two.stderr
    assert "written by 1 ranks on 2" in two.stderr and "equal the saved ones bit for bit" in two.stderr
    assert train_steps(run) == list(range(1, 7))  # every step logged once across the three runs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["steps"] == 6
    # the 6 steps of 4 clips are the data epoch: each of its 24 samples once, on whichever ranks
    used = Counter(key for row in train_rows(run) for key in row["keys"])
    assert used == Counter({key: 1 for key in _epoch_keys(motion_data["train"])}), used
    assert "data: epoch 0 continues on 1 rank(s) x 2 worker(s) (was 2 rank(s) x 2 worker(s))" in one.stderr


def test_a_global_batch_that_cannot_be_kept_is_refused_in_one_line(motion_data, tmp_path):
    run = tmp_path / "run"
    common = ["deepspeed.zero_stage=2", "train.max_steps=4", "train.save_every=1"]
    run_cli(
        ["train", DEMO, *tiny_overrides(motion_data, run, *common, "train.batch_size=3", "train.stop_at_step=1")],
        nproc=2,
    )
    out = run_cli(
        ["train", DEMO, *tiny_overrides(motion_data, run, *common, "train.batch_size=4")], nproc=1, check=False
    )
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert "resuming 2 ranks -> 1: the global batch 6 (2 x 3 x 1) is not a multiple of 1 ranks" in line, out.stderr
    assert "train.keep_global_batch=false" in line and "Traceback" not in out.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "setting",
    [
        ("deepspeed.zero_stage=0", "deepspeed.precision=bf16"),  # DeepSpeed's own files hold the whole state
        ("deepspeed.zero_stage=1", "deepspeed.offload_optimizer=cpu"),
        ("deepspeed.zero_stage=3", "deepspeed.offload_param=cpu", "deepspeed.offload_optimizer=cpu"),
    ],
    ids=["zero0", "zero1-offload-optimizer", "zero3-offload-both"],
)
def test_every_stage_and_offload_continues_on_one_rank(motion_data, tmp_path, setting):
    """2 ranks stopped mid-epoch, continued on 1: the state restored (bit for bit where DeepSpeed
    partitions it), the epoch's samples each used once, every step logged once."""
    run = tmp_path / "run"
    common = [*setting, "train.max_steps=6", "train.save_every=3", "train.batch_size=2", "train.eval_every=0"]
    common += ["train.export=false", "logging.tensorboard=false", "logging.sample_keys=true"]
    run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *common, "train.stop_at_step=3")], nproc=2)
    one = run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *common)], nproc=1)
    assert "resuming 2 ranks -> 1: grad_accum 1 -> 2, global batch 4 kept" in one.stderr
    if setting[0] != "deepspeed.zero_stage=0":
        assert "written by 2 ranks on 1" in one.stderr and "equal the saved ones bit for bit" in one.stderr
    assert train_steps(run) == list(range(1, 7))
    used = Counter(key for row in train_rows(run) for key in row["keys"])
    assert used == Counter({key: 1 for key in _epoch_keys(motion_data["train"])}), used
