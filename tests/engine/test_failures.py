"""Runs that cannot go on end at once, with one line, on every rank; a non-finite loss on one rank
skips the step on all of them."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from side4video.data.manifest import MANIFEST_NAME
from side4video.distributed import free_port
from tests.support.engine import DEMO, REPO, run_cli, summary, tiny_overrides, train_rows

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> str:
    from side4video.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("one-shard")
    make_synthetic(str(out), videos=8, classes=4, val_videos=0, frames=8, size=32, shard_samples=8)
    return str(out / "train" / MANIFEST_NAME)


@pytest.mark.timeout(180)
def test_a_reader_thread_error_ends_the_run_in_one_line(one_shard, motion_data, tmp_path):
    """One shard cannot feed two reader threads: the error raised in the loader's thread reaches
    the training loop, which ends with its line (exit 2) in seconds instead of waiting forever."""
    started = time.time()
    out = run_cli(
        [
            "train",
            DEMO,
            *tiny_overrides(
                motion_data, tmp_path / "run", f"data.train.shards={one_shard}", "data.val.shards=", "data.workers=2"
            ),
        ],
        check=False,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("side4video: error: 1 shard(s) cannot feed 1 rank(s) x 2 worker(s)")
    )
    assert "Traceback" not in out.stderr
    assert time.time() - started < 90


@pytest.mark.timeout(300)
def test_one_ranks_loader_failing_ends_both_ranks(motion_data, tmp_path):
    """Rank 1's second shard is missing: rank 1 stops with that line, rank 0 learns it at the same
    step (every micro-batch starts with an agreement) and stops naming rank 1; nobody hangs."""
    folder = Path(motion_data["train"]).parent
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        entry["url"] = str(folder / entry["url"])
    manifest["shards"][3]["url"] = str(tmp_path / "gone.tar")  # in shard order: rank 1 reads shards 1 and 3
    broken = tmp_path / MANIFEST_NAME
    broken.write_text(json.dumps(manifest))
    started = time.time()
    out = run_cli(
        [
            "train",
            DEMO,
            *tiny_overrides(
                motion_data,
                tmp_path / "run",
                f"data.train.shards={broken}",
                "data.val.shards=",
                "data.shuffle_shards=false",
                "train.epochs=2",
            ),
        ],
        nproc=2,
        check=False,
        timeout=240,
    )
    assert out.returncode != 0
    assert time.time() - started < 200
    assert f"cannot read shard {tmp_path / 'gone.tar'}" in out.stderr
    assert "rank 1 stopped the run: UserError: cannot read shard" in out.stderr  # rank 0's line


NAN_ON_RANK_1 = textwrap.dedent("""
    import os, sys, types
    import torch.nn.functional as F
    import side4video.engine.tasks as tasks

    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):  # rank 1's third loss is not finite
        loss = F.cross_entropy(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if os.environ["RANK"] == "1" and calls["n"] == 3 else loss

    tasks.F = types.SimpleNamespace(cross_entropy=cross_entropy)
    from side4video.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.timeout(300)
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_both(motion_data, tmp_path):
    driver = tmp_path / "nan_on_rank1.py"
    driver.write_text(NAN_ON_RANK_1)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(driver),
        "train",
        DEMO,
        *tiny_overrides(
            motion_data,
            run,
            "train.epochs=2",
            "train.eval_every=0",
            "data.val.shards=",
            "train.export=false",
            "train.max_bad_steps=2",
        ),
    ]
    out = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = {r["step"]: r for r in train_rows(run)}
    assert sorted(rows) == list(range(1, 7))  # 24 clips / (2 ranks x 4) x 2 epochs
    assert rows[3]["skipped"] is True and all(not rows[s]["skipped"] for s in (1, 2, 4, 5, 6))
    assert rows[3]["loss"] == rows[3]["loss"]  # rank 0's own loss was finite: rank 1's NaN skipped it
    s = summary(run)
    assert (s["bad_steps"], s["skipped_steps"], s["steps"]) == (1, 1, 6)
