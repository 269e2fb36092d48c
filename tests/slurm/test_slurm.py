"""Training on a real SLURM cluster (slurmctld + two slurmd in network namespaces, see
tests/support/slurm.py): `side4video submit --wait`, preemption + requeue + resume matching an
uninterrupted run, a 2-node job through the sbatch route (also preempted), and the requeue
bookkeeping (bounds, user cancel, failures)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from side4video.config import load_config
from side4video.slurm import follow, submit_job
from tests.support.data import BUCKET, FaultyProxy
from tests.support.engine import train_rows, train_steps
from tests.support.slurm import (
    REPO,
    WaitForStop,
    register_by_value,
    side4video,
    slurm_data,  # noqa: F401
    train_overrides,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ONE_NODE_TWO_TASKS = ("slurm.nodes=1", "slurm.tasks_per_node=2")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def job_id_from(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2].rstrip(":")
    return ""


def assert_same_run(run_dir, reference):
    """Every step logged exactly once, in order (the requeued run resumed right after its
    checkpoint instead of starting over), on the same clips and with the same loss at every step
    as the uninterrupted reference."""
    assert summary(run_dir)["status"] == "finished"
    assert summary(run_dir)["steps"] == summary(reference)["steps"]
    got, want = train_rows(run_dir), train_rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, summary(reference)["steps"] + 1))
    assert [r["keys"] for r in got] == [r["keys"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5, abs=1e-6)


def checkpoint_steps(run_dir) -> list:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, slurm_data, tmp_path_factory):  # noqa: F811
    """1 node x 2 tasks, uninterrupted, through `side4video submit ... --wait`."""
    run_dir = tmp_path_factory.mktemp("slurm-ref") / "run"
    done = side4video(
        slurm_cluster,
        "submit",
        "configs/demo.yaml",
        *train_overrides(slurm_data, run_dir, *ONE_NODE_TWO_TASKS),
        "--wait",
    )
    return run_dir, done


@pytest.mark.timeout(900)
def test_submit_wait_one_node_two_tasks(reference_run, slurm_cluster):  # noqa: F811
    run_dir, done = reference_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = job_id_from(done.stdout)
    assert job_id, done.stdout
    assert f"run directory: {run_dir}" in done.stdout
    assert f"logs:          {run_dir / 'slurm'}" in done.stdout
    # --wait streamed rank 0's log and the job's end
    assert "task 0/2 (local 0/2)" in done.stderr and f"job {job_id}: COMPLETED" in done.stderr
    result = summary(run_dir)
    assert result["status"] == "finished" and result["world_size"] == 2
    assert result["steps"] == result["total_steps"] == 24  # 32 clips / 2 ranks / batch 2 = 8 steps x 3 epochs
    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["NumTasks"] == "2" and info["Restarts"] == "0"


@pytest.mark.timeout(900)
def test_preempted_job_is_requeued_and_matches_uninterrupted_run(reference_run, slurm_cluster, slurm_data, tmp_path):  # noqa: F811
    """USR2 (what SLURM sends before the time limit) after the first checkpoint: all ranks save,
    the job requeues itself, resumes from `latest`, and ends exactly like the reference."""
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    out = (tmp_path / "submit.out").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "side4video.cli",
            "submit",
            "configs/demo.yaml",
            *train_overrides(slurm_data, run_dir, *ONE_NODE_TWO_TASKS),
            "--wait",
        ],
        cwd=REPO,
        env=slurm_cluster.env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job_id = wait_for(lambda: job_id_from((tmp_path / "submit.out").read_text()), 60, "the job id")
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 600, "the first checkpoint")
        signalled = slurm_cluster.run("scancel", "--signal=USR2", job_id)
        assert signalled.returncode == 0, signalled.stderr
        assert proc.wait(timeout=600) == 0, (tmp_path / "submit.out").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "submit.out").read_text()
    assert "requeued (restart 1 of at most 10)" in log
    assert "restart 1 (of at most 10): resuming from the latest checkpoint" in log
    assert slurm_cluster.job_info(job_id)["Restarts"] == "1"
    assert_same_run(run_dir, reference)


@pytest.mark.timeout(900)
def test_two_nodes_sbatch_route_requeues_on_sigterm(
    reference_run,
    slurm_cluster,
    slurm_data,  # noqa: F811
    s3_server,  # noqa: F811
    tmp_path,
):
    """slurm/train.sbatch on 2 nodes x 1 task, reading its shards from the S3 server over the
    nodes' network (a proxy on the bridge address forwards to the server on 127.0.0.1): the ranks
    run on n1 and n2 and meet at n1's namespace address over gloo. SIGTERM to the batch shell alone
    is passed on to the tasks, which save; rank 0 requeues; the rerun resumes and ends exactly like
    the 1-node reference read from local shards (same world size, data split and seeds)."""
    reference, _ = reference_run
    run_dir = tmp_path / "run"
    log = tmp_path / "sbatch.out"
    for split in ("train", "val"):
        s3_server.upload_folder(slurm_data / split, BUCKET, f"slurm-2n/{split}")
    bridge = FaultyProxy(s3_server.endpoint, host=f"{slurm_cluster.subnet}.1")
    env = dict(slurm_cluster.env, SIDE4VIDEO_PYTHON=sys.executable)
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=15",
            f"--output={log}",
            "slurm/train.sbatch",
            "configs/demo.yaml",
            *train_overrides(
                slurm_data,
                run_dir,
                "logging.all_ranks=true",
                *s3_server.overrides(endpoint=bridge.url),
                f"data.train.shards=s3://{BUCKET}/slurm-2n/train/manifest.json",
                f"data.val.shards=s3://{BUCKET}/slurm-2n/val/manifest.json",
            ),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 600, "the first checkpoint")
        assert slurm_cluster.run("scancel", "--batch", "--signal=TERM", job_id).returncode == 0
        wait_for(
            lambda: slurm_cluster.job_info(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
            600,
            "the job to end",
            poll=1,
        )
    finally:
        slurm_cluster.run("scancel", job_id)  # no-op once it ended
        bridge.close()
    info = slurm_cluster.job_info(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1" and info["NumNodes"] == "2"
    master = f"{slurm_cluster.subnet}.11"
    assert f"task 0/2 (local 0/1) on n1; master {master}:" in text
    assert f"task 1/2 (local 0/1) on n2; master {master}:" in text
    assert "stop requested (SIGTERM)" in text and "requeued (restart 1 of at most 10)" in text
    assert summary(run_dir)["world_size"] == 2
    # the shards came from the S3 server: both ranks' GETs of the training shards
    served = [
        path
        for method, path, status in s3_server.logged_requests()
        if method == "GET" and status in (200, 206) and path.startswith(f"/{BUCKET}/slurm-2n/train/train-")
    ]
    assert len(set(served)) == 4, served
    assert_same_run(run_dir, reference)


# ------------------------------------------------------------------------ requeue bookkeeping
@pytest.fixture
def quick_job(slurm_cluster, monkeypatch, tmp_path):  # noqa: F811
    """Submit WaitForStop (no training) in-process; returns (job, run_dir)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    register_by_value()

    def submit(*overrides):
        cfg = load_config(
            None, [f"train.output_dir={tmp_path / 'run'}", "slurm.time_minutes=5", "slurm.tasks_per_node=2", *overrides]
        )
        return submit_job(cfg, "train", task_class=WaitForStop), tmp_path / "run"

    return submit


@pytest.mark.timeout(300)
def test_requeues_are_bounded_by_max_requeues(quick_job, slurm_cluster, capsys):  # noqa: F811
    job, run_dir = quick_job("slurm.max_requeues=1")
    for restart in (0, 1):
        wait_for(
            lambda restart=restart: all((run_dir / f"started-{restart}-{rank}").exists() for rank in (0, 1)),
            120,
            f"both ranks of run {restart}",
        )
        assert slurm_cluster.run("scancel", "--signal=USR2", job.job_id).returncode == 0
    assert follow(job.job_id, job.paths.folder, poll_s=0.5, timeout_s=120) == 1
    err = capsys.readouterr().err
    assert "requeued (restart 1 of at most 1)" in err
    assert "not requeued: it already ran 1 times more (slurm.max_requeues=1)" in err
    assert f"job {job.job_id} COMPLETED: preempted" in err
    assert slurm_cluster.job_info(job.job_id)["Restarts"] == "1"
    assert not list(run_dir.glob("started-2-*"))


@pytest.fixture
def long_training(slurm_cluster, slurm_data, monkeypatch, tmp_path):  # noqa: F811
    """Submit a real training job (1 node x 2 tasks) long enough to be running when signalled;
    it saves only when stopped (no periodic checkpoint)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    run_dir = tmp_path / "run"

    def submit(*overrides):
        cfg = load_config(
            REPO / "configs" / "demo.yaml",
            train_overrides(
                slurm_data,
                run_dir,
                *ONE_NODE_TWO_TASKS,
                "train.epochs=2000",
                "train.save_every=1000000",
                "train.log_every=1",
                *overrides,
            ),
        )
        return submit_job(cfg, "train"), run_dir

    return submit


@pytest.mark.timeout(700)
def test_time_limit_warning_saves_and_requeues(long_training, slurm_cluster, capsys):  # noqa: F811
    """No signal from the test: the job's own `--signal=USR2@60` before its 2-minute limit stops
    the training; every rank saves at the step it reached, rank 0 requeues; the rerun resumes
    right after that checkpoint, meets the same limit, saves again and, with no requeue left,
    ends as preempted. Neither run reaches the limit itself (no TIMEOUT)."""
    job, run_dir = long_training("slurm.time_minutes=2", "slurm.signal_delay_s=60", "slurm.max_requeues=1")
    assert follow(job.job_id, job.paths.folder, poll_s=0.5, timeout_s=600) == 1
    err = capsys.readouterr().err
    assert "stop requested (SIGUSR2)" in err
    assert "requeued (restart 1 of at most 1)" in err
    assert "not requeued: it already ran 1 times more (slurm.max_requeues=1)" in err
    saved = checkpoint_steps(run_dir)
    assert len(saved) == 2, (saved, err[-3000:])  # one checkpoint per signal, nothing else
    first, second = saved
    assert 0 < first < second
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{second:07d}"
    # the rerun resumed right after the first checkpoint: each step logged exactly once
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, second + 1))
    info = slurm_cluster.job_info(job.job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"


@pytest.mark.timeout(300)
def test_user_cancel_saves_but_is_not_requeued(long_training, slurm_cluster, capsys):  # noqa: F811
    """Plain `scancel` also sends SIGTERM, but the job is being cancelled: the ranks save at the
    step they reached, and the job is not requeued."""
    job, run_dir = long_training()
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(train_rows(run_dir)) >= 3, 180, "training steps")
    assert slurm_cluster.run("scancel", job.job_id).returncode == 0
    assert follow(job.job_id, job.paths.folder, poll_s=0.5, timeout_s=120) == 1
    err = capsys.readouterr().err
    assert "stop requested (SIGTERM)" in err and "not requeued: it is COMPLETING (cancelled?)" in err
    (saved,) = checkpoint_steps(run_dir)
    assert saved >= 3 and [r["step"] for r in train_rows(run_dir)] == list(range(1, saved + 1))
    info = slurm_cluster.job_info(job.job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"


@pytest.mark.timeout(120)
def test_sbatch_refusal_is_one_line(slurm_cluster, tmp_path):  # noqa: F811
    done = side4video(
        slurm_cluster,
        "submit",
        "configs/demo.yaml",
        f"train.output_dir={tmp_path}",
        "slurm.partition=no-such-partition",
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: sbatch refused the job:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(300)
def test_failed_job_exit_status_and_reason(slurm_cluster, tmp_path):  # noqa: F811
    missing = tmp_path / "no-such-data" / "manifest.json"
    done = side4video(
        slurm_cluster,
        "submit",
        "configs/demo.yaml",
        f"data.train.shards={missing}",
        f"data.val.shards={missing}",
        f"train.output_dir={tmp_path / 'run'}",
        "slurm.tasks_per_node=2",
        "--wait",
        timeout=300,
    )
    assert done.returncode == 1
    job_id = job_id_from(done.stdout)
    assert f"job {job_id} failed: side4video.errors.UserError:" in done.stderr and str(missing) in done.stderr
    assert slurm_cluster.job_info(job_id)["JobState"] == "FAILED"


@pytest.mark.timeout(900)
def test_a_stopped_two_node_job_continues_as_one_task(slurm_cluster, slurm_data, tmp_path):  # noqa: F811
    """2 nodes x 1 task (ZeRO-2) stopped after a save, the same config resubmitted as 1 node x 1
    task: the run continues from the 2-rank checkpoint with the global batch kept and logs every
    step once."""
    run_dir = tmp_path / "run"
    two_nodes = ("slurm.nodes=2", "slurm.tasks_per_node=1", "deepspeed.zero_stage=2")
    side4video(
        slurm_cluster,
        "submit",
        "configs/demo.yaml",
        *train_overrides(slurm_data, run_dir, *two_nodes, "train.stop_at_step=6"),
        "--wait",
    )
    assert checkpoint_steps(run_dir)[-1] == 6 and train_steps(run_dir) == list(range(1, 7))
    one_task = ("slurm.nodes=1", "slurm.tasks_per_node=1", "deepspeed.zero_stage=2")
    done = side4video(
        slurm_cluster, "submit", "configs/demo.yaml", *train_overrides(slurm_data, run_dir, *one_task), "--wait"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming 2 ranks -> 1: grad_accum 1 -> 2, global batch 4 kept" in done.stderr
    assert "written by 2 ranks on 1" in done.stderr
    result = summary(run_dir)
    assert result["status"] == "finished" and result["world_size"] == 1 and result["steps"] == 24
    assert train_steps(run_dir) == list(range(1, 25))  # every step once, across the two jobs
    # steps 1-8 are the first data epoch, stopped at 6: its 32 samples each once across the jobs
    assert "data: epoch 0 continues on 1 rank(s) x 1 worker(s) (was 2 rank(s) x 1 worker(s))" in done.stderr
    used = Counter(key for row in train_rows(run_dir)[:8] for key in row["keys"])
    assert len(used) == 32 and set(used.values()) == {1}, used
