"""Text-video retrieval through the same engine as recognition (`task: retrieval`), through the
CLI on tiny captioned motion clips: train, resume mid-epoch, evaluate under ZeRO-3 on 2 ranks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.engine import (
    DEMO_RETRIEVAL,
    VAL_VIDEOS,
    retrieval_overrides,
    run_cli,
    summary,
    train_rows,
    train_steps,
)

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)

RECALL_KEYS = {"R1", "R5", "R10", "MedianR", "MeanR"}


@pytest.mark.timeout(900)
def test_retrieval_trains_resumes_mid_epoch_and_evaluates(caption_data, tmp_path):
    """12 steps straight == 5 steps, stop (mid-epoch), resume, 7 steps: same captions drawn, same
    losses and weights; the run directory holds the retrieval report; `eval` gives the same R@K."""
    common = ["train.save_every=3", "train.eval_every=0", "logging.sample_keys=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(["train", DEMO_RETRIEVAL, *retrieval_overrides(caption_data, straight, *common)])
    run_cli(
        [
            "train",
            DEMO_RETRIEVAL,
            *retrieval_overrides(caption_data, split, *common, "train.stop_at_step=5", "train.export=false"),
        ]
    )
    run_cli(["train", DEMO_RETRIEVAL, *retrieval_overrides(caption_data, split, *common)])
    assert train_steps(straight) == train_steps(split) == list(range(1, 13))
    full, resumed = train_rows(straight), train_rows(split)
    assert [r["keys"] for r in resumed] == [r["keys"] for r in full]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    a = load_file(str(straight / "checkpoints" / "step_0000012" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_0000012" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("backbone.") for k in a) and "logit_scale.value" in a
    assert a["logit_scale.value"].item() <= torch.log(torch.tensor(100.0)).item() + 1e-6

    s = summary(straight)
    assert s["task"] == "retrieval" and s["steps"] == 12
    assert RECALL_KEYS <= set(s["t2v"]) and RECALL_KEYS <= set(s["v2t"])
    assert s["chance_R1"] == pytest.approx(100 / VAL_VIDEOS)
    report = json.loads((straight / "final_eval.json").read_text())
    assert report["videos"] == VAL_VIDEOS and report["captions"] >= VAL_VIDEOS
    assert (straight / "final_eval_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [
        json.loads(line)
        for line in (straight / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "eval"
    ]
    assert evals and "t2v_R1" in evals[-1]

    out = run_cli(
        [
            "eval",
            DEMO_RETRIEVAL,
            *retrieval_overrides(caption_data, straight),
            f"checkpoint={straight / 'export'}",
            "--json",
        ]
    )
    again = json.loads(out.stdout)
    assert again["t2v"] == report["t2v"] and again["v2t"] == report["v2t"]


@pytest.mark.timeout(900)
def test_retrieval_two_ranks_zero3_train_and_eval(caption_data, tmp_path):
    """2 ranks under ZeRO-3 + offload: the gathered batch trains, every caption and video is
    scored once, and a 2-rank ZeRO-3 evaluation equals a 1-process plain one."""
    run = tmp_path / "zero3"
    overrides = retrieval_overrides(
        caption_data, run, "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu", "train.eval_every=0"
    )
    run_cli(["train", DEMO_RETRIEVAL, *overrides], nproc=2)
    s = summary(run)
    assert s["world_size"] == 2 and s["steps"] == 6  # 24 clips / (2 ranks x 4) x 2 epochs

    def eval_json(nproc, *extra):
        out = run_cli(["eval", DEMO_RETRIEVAL, *overrides, *extra, f"checkpoint={run}", "--json"], nproc=nproc)
        return json.loads(out.stdout)

    sharded = eval_json(2)
    plain = eval_json(1, "deepspeed.zero_stage=1", "deepspeed.offload_param=none")
    assert sharded["videos"] == plain["videos"] == VAL_VIDEOS
    for direction in ("t2v", "v2t"):
        for key in RECALL_KEYS:
            assert sharded[direction][key] == pytest.approx(plain[direction][key], abs=1e-6), (direction, key)
