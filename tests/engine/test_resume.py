"""Stopping and resuming, through the CLI on the tiny config (real DeepSpeed, real DALI).

Every test counts the logged training rows across the restart: a resumed run logs exactly the
steps after its checkpoint, once (metrics.jsonl is appended to, so a resume that started again
from step 1 shows as repeated steps), and the data it reads after the restart is the data an
uninterrupted run reads at those steps (the clips' keys are logged).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from side4video.distributed import launch_command
from tests.support.data import FaultyProxy
from tests.support.engine import DEMO, REPO, run_cli, summary, tiny_overrides, train_rows, train_steps

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)


def _latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])


def _trained(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "trainable.safetensors"))


@pytest.mark.timeout(900)
def test_resume_continues_with_the_same_data_optimizer_and_losses(motion_data, tmp_path):
    """12 steps straight == 5 steps, stop, resume, 7 steps: the resumed run starts at step 6, reads
    the clips the straight run read at steps 6..12, and gives bit-equal losses and weights (the
    optimizer's moments came back too: without them the losses after step 5 differ)."""
    common = [
        "train.epochs=2",
        "train.save_every=3",
        "data.shuffle_buffer=8",
        "train.export=false",
        "logging.sample_keys=true",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(["train", DEMO, *tiny_overrides(motion_data, straight, *common)])
    run_cli(["train", DEMO, *tiny_overrides(motion_data, split, *common, "train.stop_at_step=5")])
    assert _latest_step(split) == 5 and not (split / "summary.json").exists()
    assert train_steps(split) == [1, 2, 3, 4, 5]
    run_cli(["train", DEMO, *tiny_overrides(motion_data, split, *common)])  # train.resume=auto: from latest

    assert train_steps(straight) == list(range(1, 13))
    assert train_steps(split) == list(range(1, 13))  # steps 6..12 after the restart, each once
    full, resumed = train_rows(straight), train_rows(split)
    assert [r["keys"] for r in resumed] == [r["keys"] for r in full]  # the data position came back
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit-equal on CPU
    a, b = _trained(straight, 12), _trained(split, 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(split)["steps"] == 12


@pytest.mark.timeout(600)
def test_kill_while_saving_keeps_latest_on_the_previous_checkpoint(motion_data, tmp_path):
    """SIGKILL after the checkpoint files of step 4 are written but before they are committed:
    `latest` still names step 2, and the restart continues from step 3."""
    run = tmp_path / "run"
    overrides = tiny_overrides(motion_data, run, "train.save_every=2", "train.export=false", "logging.sample_keys=true")
    driver = (
        "import os, signal, sys\n"
        "from side4video.engine import checkpoint\n"
        "commit = checkpoint._commit\n"
        "def dying_commit(root, tmp_tag, tag):\n"
        "    if tag == 'step_0000004':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    commit(root, tmp_tag, tag)\n"
        "checkpoint._commit = dying_commit\n"
        "from side4video.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", driver, "train", DEMO, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert (root / ".tmp-step_0000004").is_dir()  # the half-made checkpoint never became visible
    first = train_rows(run)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    run_cli(["train", DEMO, *overrides])
    assert summary(run)["steps"] == 12
    rows = train_rows(run)[4:]
    assert [r["step"] for r in rows] == list(range(3, 13))  # from the committed step 2, each step once
    assert [r["keys"] for r in rows[:2]] == [r["keys"] for r in first[2:]]  # steps 3-4 read again, the same clips
    assert not (root / ".tmp-step_0000004").exists()


def _train_until(run: Path, overrides, steps: int, env=None) -> subprocess.Popen:
    """Start `side4video train` and return once it has logged `steps` training rows."""
    proc = subprocess.Popen(
        launch_command(1, ["train", DEMO, *overrides]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len([line for line in metrics.read_text().splitlines() if '"train"' in line]) >= steps:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"training never logged {steps} steps:\n{proc.communicate()[0][-3000:]}")


@pytest.mark.timeout(600)
def test_sigterm_finishes_the_step_saves_and_resumes(motion_data, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(motion_data, run, "train.epochs=4", "train.export=false", "train.eval_every=0")
    proc = _train_until(run, overrides, 3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested (SIGTERM)" in output
    stopped_at = _latest_step(run)
    assert 3 <= stopped_at < 24 and not (run / "summary.json").exists()
    assert train_steps(run) == list(range(1, stopped_at + 1))  # the checkpoint holds the last logged step
    run_cli(["train", DEMO, *overrides])
    assert summary(run)["steps"] == 24 and train_steps(run) == list(range(1, 25))


@pytest.mark.timeout(600)
def test_sigterm_while_the_loader_is_stalled_saves_and_exits(motion_data, http_server, tmp_path):
    """The shard server stops answering in the second epoch: the main thread waits for data. A
    SIGTERM then ends the wait, the last completed step is saved and the process exits at once
    (the stalled read would only time out after data.timeout = 10 minutes)."""
    folder = Path(motion_data["train"]).parent
    proxy = FaultyProxy(http_server(folder), stall_after=4)  # 4 shards: the first epoch, then silence
    run = tmp_path / "run"
    overrides = tiny_overrides(
        motion_data,
        run,
        "train.epochs=4",
        "train.export=false",
        "train.eval_every=0",
        f"data.train.shards={proxy.url}/manifest.json",
        "data.timeout=600",
        "data.prefetch=1",
        "train.save_every=1000",
    )
    try:
        proc = _train_until(run, overrides, 6)  # the whole first epoch (6 steps) has been trained
        time.sleep(5)  # the loader has run into the stalled shard reads; the trainer waits
        assert proc.poll() is None and len(train_steps(run)) == 6
        signalled = time.time()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        took = time.time() - signalled
    finally:
        proxy.close()
    assert proc.returncode == 0, output[-3000:]
    assert took < 60, took
    assert "stop requested (SIGTERM)" in output
    assert _latest_step(run) == 6 and (run / "checkpoints" / "step_0000006" / "trainable.safetensors").is_file()


@pytest.mark.timeout(600)
def test_resume_over_another_frozen_backbone_is_refused_in_one_line(motion_data, tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            DEMO,
            *tiny_overrides(
                motion_data,
                run,
                "train.max_steps=2",
                "train.save_every=1",
                "train.stop_at_step=1",
                "train.export=false",
            ),
        ]
    )
    assert _latest_step(run) == 1
    # another seed: another random backbone than the one the checkpoint was trained over
    out = run_cli(
        ["train", DEMO, *tiny_overrides(motion_data, run, "train.max_steps=2", "train.seed=7", "train.export=false")],
        check=False,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "another frozen backbone" in last and "Traceback" not in out.stderr
    assert train_steps(run) == [1]  # nothing trained on
