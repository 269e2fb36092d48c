"""Training end to end through the CLI, on the tiny config: real DeepSpeed engines (one process,
or two through torchrun), real DALI decoding of generated VP9 clips."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.engine import DEMO, REPO, VAL_VIDEOS, run_cli, summary, tiny_overrides, train_losses


@pytest.mark.timeout(600)
def test_train_writes_the_run_directory_then_eval_and_predict(motion_data, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", DEMO, *tiny_overrides(motion_data, run, "train.epochs=1", "train.export=true")])
    s = summary(run)
    assert s["status"] == "finished" and s["steps"] == 6  # 24 clips / batch 4
    for key in ("top1", "top5", "clips_per_s", "data_wait_fraction", "peak_rss_bytes", "bad_samples", "trainable_params"):
        assert key in s, key
    assert 0.0 <= s["top1"] <= 1.0 and s["eval_samples"] == VAL_VIDEOS and s["bad_samples"] == []
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "final_eval.json", "final_eval_confusion.png",
                 "checkpoints/latest", "export/model.safetensors", "export/model.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_0000006" and (run / "checkpoints" / tag / "trainable.safetensors").is_file()
    # checkpoints hold trainable weights only
    trained = load_file(str(run / "checkpoints" / tag / "trainable.safetensors"))
    assert trained and not any(k.startswith("backbone.") for k in trained)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))

    # multi-view evaluation of the export: 3 crops x 2 clips, every val video once
    out = run_cli(["eval", DEMO, *tiny_overrides(motion_data, run), f"checkpoint={run / 'export'}", "eval.crops=3",
                   "eval.clips=2", "--json"])
    report = json.loads(out.stdout)
    assert report["views"] == 6 and report["samples"] == VAL_VIDEOS
    assert json.loads((run / "eval.json").read_text())["samples"] == VAL_VIDEOS

    # predict one generated video file
    import tarfile

    shard = sorted(Path(motion_data["root"], "val").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".webm"))
        video = tmp_path / "clip.webm"
        video.write_bytes(tar.extractfile(member).read())
    out = run_cli(["predict", str(run / "export"), str(video), "--json", "--top-k", "3"])
    preds = json.loads(out.stdout)
    classes = json.loads((run / "export" / "model.json").read_text())["class_names"]
    assert len(preds["top"]) == 3 and all(p["class"] in classes for p in preds["top"])
    probs = [p["probability"] for p in preds["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


@pytest.mark.timeout(900)
def test_resume_gives_the_same_losses_and_parameters(motion_data, tmp_path):
    """2N steps straight == N steps, stop, resume, N steps (same world size): equal on CPU."""
    common = ["train.epochs=2", "train.save_every=3", "data.shuffle_buffer=8", "train.export=false"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(["train", DEMO, *tiny_overrides(motion_data, straight, *common)])
    first = run_cli(["train", DEMO, *tiny_overrides(motion_data, split, *common, "train.stop_at_step=5")])
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    assert not (split / "summary.json").exists()
    run_cli(["train", DEMO, *tiny_overrides(motion_data, split, *common)])  # auto-resume from latest
    full, resumed = train_losses(straight), train_losses(split)
    assert sorted(full) == list(range(1, 13)) and sorted(resumed) == list(range(1, 13))
    assert resumed == full  # bit-equal on CPU
    a = load_file(str(straight / "checkpoints" / "step_0000012" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_0000012" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(split)["steps"] == 12


def _backbone_unchanged(run_dir: Path, overrides) -> bool:
    """The exported (random-init) backbone equals a freshly built one: no update ever reached it."""
    from side4video.config import load_config
    from side4video.engine.factory import model_from_config as build_model

    fresh = build_model(load_config(DEMO, overrides)).backbone.state_dict()
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    return all(torch.equal(exported[f"backbone.{k}"], v.to(exported[f"backbone.{k}"].dtype)) for k, v in fresh.items())


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage, extra", [(1, []), (2, []), (3, ["deepspeed.offload_param=cpu"])])
def test_two_rank_zero_stages_train_the_side_network_only(motion_data, tmp_path, stage, extra):
    run = tmp_path / f"zero{stage}"
    overrides = tiny_overrides(motion_data, run, f"deepspeed.zero_stage={stage}", *extra, "train.epochs=6",
                               "train.lr=3e-3", "train.eval_every=0", "data.shuffle_buffer=8")
    run_cli(["train", DEMO, *overrides], nproc=2)
    s = summary(run)
    assert s["world_size"] == 2 and s["steps"] == 18  # 24 clips / (2 ranks x 4) x 6 epochs
    losses = [v for _, v in sorted(train_losses(run).items())]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses  # the loss went down
    # every val video scored once, though 13 do not split evenly over 2 ranks (ZeRO-3: dummy passes)
    assert s["eval_samples"] == VAL_VIDEOS
    assert _backbone_unchanged(run, overrides)
    files = os.listdir(run / "checkpoints" / "step_0000018")
    assert any("optim_states" in f for f in files)
    if stage == 3:
        _zero3_eval_matches_plain_eval(run, overrides)


def _zero3_eval_matches_plain_eval(run, overrides):
    """`side4video eval` of the latest checkpoint on 2 ranks under ZeRO-3 (frozen weights
    partitioned and offloaded) scores every video once, exactly as a plain 1-process eval."""
    def eval_json(nproc, *extra):
        out = run_cli(["eval", DEMO, *overrides, *extra, f"checkpoint={run}", "--json"], nproc=nproc)
        return json.loads(out.stdout)

    sharded = eval_json(2)
    plain = eval_json(1, "deepspeed.zero_stage=0", "deepspeed.offload_param=none")
    assert sharded["samples"] == plain["samples"] == VAL_VIDEOS
    for key in ("top1", "top5", "per_class"):
        assert sharded[key] == plain[key], key


@pytest.mark.timeout(600)
def test_kill_while_saving_keeps_latest_on_the_previous_checkpoint(motion_data, tmp_path):
    """SIGKILL after the checkpoint files are written but before they are committed."""
    run = tmp_path / "run"
    overrides = tiny_overrides(motion_data, run, "train.save_every=2", "train.export=false")
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
    killed = subprocess.run([sys.executable, "-c", driver, "train", DEMO, *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert (root / ".tmp-step_0000004").is_dir()  # the half-made checkpoint never became visible
    run_cli(["train", DEMO, *overrides])
    assert summary(run)["steps"] == 12
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 13))
    assert not (root / ".tmp-step_0000004").exists()


@pytest.mark.timeout(600)
def test_sigterm_finishes_the_step_saves_and_resumes(motion_data, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(motion_data, run, "train.epochs=4", "train.export=false", "train.eval_every=0")
    from side4video.distributed import launch_command

    proc = subprocess.Popen(launch_command(1, ["train", DEMO, *overrides]), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested (SIGTERM)" in output
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < 24 and not (run / "summary.json").exists()
    run_cli(["train", DEMO, *overrides])
    assert summary(run)["steps"] == 24 and sorted(train_losses(run)) == list(range(1, 25))


def _half_precision_run(motion_data, run: Path, precision: str, check: bool = True):
    return run_cli(["train", DEMO, *tiny_overrides(motion_data, run, f"deepspeed.precision={precision}",
                                                 "model.backbone.precision=fp16", "train.max_steps=3",
                                                 "train.export=false", "train.eval_every=0", "data.val.shards=")],
                   check=check)


def _assert_trained_in(run: Path, dtype: torch.dtype) -> None:
    s = summary(run)
    assert s["steps"] == 3 and s["bad_steps"] == 0
    losses = train_losses(run)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses.values())
    trained = load_file(str(run / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert {v.dtype for k, v in trained.items() if v.is_floating_point() and "running" not in k} == {dtype}
    # BatchNorm statistics stay fp32 whatever the training precision
    assert {v.dtype for k, v in trained.items() if "running" in k} == {torch.float32}


@pytest.mark.timeout(600)
def test_bf16_training(motion_data, tmp_path):
    """Half precision is slow on CPUs: a few steps keep the path correct."""
    _half_precision_run(motion_data, tmp_path / "bf16", "bf16")
    _assert_trained_in(tmp_path / "bf16", torch.bfloat16)


@pytest.mark.timeout(600)
def test_fp16_training_with_loss_scaling(motion_data, tmp_path):
    """fp16 with dynamic loss scaling where DeepSpeed supports fp16 (GPUs, CPUs with fp16 units);
    elsewhere DeepSpeed refuses fp16, and so do we, up front, in one line."""
    from side4video.engine.deepspeed_engine import fp16_supported

    run = tmp_path / "fp16"
    if fp16_supported():
        _half_precision_run(motion_data, run, "fp16")
        _assert_trained_in(run, torch.float16)
        return
    out = _half_precision_run(motion_data, run, "fp16", check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].endswith("(no GPU, no CPU fp16 units): use bf16 or fp32")
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(300)
def test_diverging_loss_stops_with_one_line(motion_data, tmp_path):
    run = tmp_path / "run"
    out = run_cli(["train", DEMO, *tiny_overrides(motion_data, run, "train.lr=1e12", "train.warmup_epochs=0",
                                                "train.max_bad_steps=2", "train.export=false", "data.val.shards=",
                                                "train.label_smoothing=0")], check=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "consecutive non-finite losses" in last and "Traceback" not in out.stderr
