"""What only a GPU can verify (run by `make test-gpu` where CUDA is present; never on the CPU
hosts this project is built on, so these were written against DALI 2.4 / DeepSpeed 0.19.8 sources
and are run by the first user with a GPU):

- DALI's 'mixed' (NVDEC) decode gives the CPU decode's frames within a stated tolerance;
- the copy out of DALI's buffers is complete before DALI's next run overwrites them;
- fp16 storage + fp16 compute with dynamic loss scaling trains;
- NCCL ZeRO-3 steps of a tiny EVA on 1 GPU, and on 2 (skipped with one GPU);
- `bench vite` case (c) with max_memory_allocated beside the planner's figure;
- `predict` puts the model and the clips on one device.
"""

import json

import numpy as np
import pytest
import torch

from side4video.data import augment as A
from side4video.data.decode import ClipDecoder, ClipRequest
from side4video.data.video import probe
from tests.support.data import encode, load_cfg
from tests.support.engine import DEMO, run_cli, summary, tiny_overrides

SIZE = 256  # above NVDEC's smallest VP9 frame (128 px)
# NVDEC and libvpx both decode VP9 exactly; the difference is the YUV->RGB conversion and
# resampling on the GPU: at most a few levels of 255 on average.
MEAN_ABS_TOLERANCE = 3 / 255


def _requests(n: int):
    cfg = load_cfg("data.size=224", f"data.resize=[{SIZE}]")
    out = []
    for i in range(n):
        data = encode(i, frames=12, height=SIZE, width=SIZE)
        info = probe(data)
        out.append(
            ClipRequest(
                f"k{i}",
                data,
                info.codec,
                np.array([0, 3, 6, 9], np.int32),
                A.eval_views(info.height, info.width, cfg.data, 1),
                info,
            )
        )
    return cfg, out


def _decoder(cfg, gpu: bool, batch: int) -> ClipDecoder:
    return ClipDecoder(
        views=1,
        size=224,
        mean=cfg.data.mean,
        std=cfg.data.std,
        batch_size=batch,
        threads=2,
        gpu=gpu,
        device_id=0 if gpu else None,
    )


def test_dali_mixed_decode_equals_the_cpu_decode():
    cfg, requests = _requests(4)
    gpu, cpu = _decoder(cfg, True, 4), _decoder(cfg, False, 4)
    assert all(gpu.route(r) == "dali" for r in requests)
    on_gpu, bad_gpu = gpu.decode(requests)
    on_cpu, bad_cpu = cpu.decode(requests)
    assert not bad_gpu and not bad_cpu and not gpu.fallbacks
    std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
    for g, c in zip(on_gpu, on_cpu):
        assert g.is_cuda and g.shape == c.shape
        assert ((g.cpu() - c).abs() * std).mean() < MEAN_ABS_TOLERANCE


def test_a_batch_keeps_its_pixels_after_the_next_run():
    cfg, requests = _requests(4)
    decoder = _decoder(cfg, True, 2)
    first, _ = decoder.decode(requests[:2])
    kept = [t.clone() for t in first]
    decoder.decode(requests[2:])  # DALI reuses its output buffers for this run
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert not torch.equal(first[0], decoder.decode(requests[2:3])[0][0])


def test_fp16_storage_and_compute_with_loss_scaling(motion_data, tmp_path):
    run = tmp_path / "fp16"
    run_cli(
        [
            "train",
            DEMO,
            *tiny_overrides(
                motion_data,
                run,
                "deepspeed.precision=fp16",
                "train.device=cuda",
                "model.backbone.precision=fp16",
                "train.max_steps=3",
                "train.export=false",
                "train.eval_every=0",
                "data.val.shards=",
            ),
        ]
    )
    s = summary(run)
    assert s["steps"] == 3 and s["bad_steps"] == 0 and "peak_gpu_bytes" in s
    from safetensors.torch import load_file

    trained = load_file(str(run / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert {v.dtype for k, v in trained.items() if v.is_floating_point() and "running" not in k} == {torch.float16}


@pytest.mark.parametrize("gpus", [1, 2])
def test_nccl_zero3_steps_of_a_tiny_eva(motion_data, tmp_path, gpus):
    """ZeRO-3 with offload on NCCL, fp16 storage: one process (a process group of one) and, on a
    host with two GPUs, two ranks with the backbone partitioned between them."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"a {gpus}-GPU check: this host has {torch.cuda.device_count()}")
    run = tmp_path / "eva"
    eva = ["model.backbone.name=EVA02-E-14", "model.backbone.width=128", "model.backbone.layers=4"]
    eva += ["model.backbone.heads=2", "model.backbone.patch_size=16", "model.backbone.precision=fp16"]
    zero3 = ["deepspeed.precision=bf16", "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu", "train.device=cuda"]
    short = ["train.max_steps=2", "train.export=false", "train.eval_every=0", "data.val.shards="]
    run_cli(["train", DEMO, *tiny_overrides(motion_data, run, *eva, *zero3, *short)], nproc=gpus)
    s = summary(run)
    assert s["world_size"] == gpus and s["steps"] == 2 and s["bad_steps"] == 0 and "peak_gpu_bytes" in s
    held = [m["backbone_bytes_held"] for m in s["memory_per_rank"]]
    assert gpus == 1 or all(h < sum(held) for h in held)  # partitioned between the two GPUs' ranks


def test_bench_vite_paper_input_beside_the_planner(tmp_path):
    from side4video.bench import vite

    config = vite.find_config(None)
    row = vite._run_case(config, "c: 1 rank, 224 px x 8 frames", 1, 224, 8, 1, tmp_path, cuda=True, quick=False)
    measured = row["per_rank"][0]["peak_gpu_training_bytes"]
    planned = row["planned_peak_per_rank"]
    assert measured > 0 and planned > 0
    print(json.dumps({"measured_gpu_bytes": measured, "planned_gpu_bytes": planned}))
    assert abs(measured - planned) / measured < 0.25


def test_predict_puts_model_and_clips_on_one_device(motion_data, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", DEMO, *tiny_overrides(motion_data, run, "train.max_steps=2", "train.device=cuda")])
    import tarfile
    from pathlib import Path

    shard = sorted(Path(motion_data["root"], "val").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".webm"))
        (tmp_path / "clip.webm").write_bytes(tar.extractfile(member).read())
    out = run_cli(["predict", str(run / "export"), str(tmp_path / "clip.webm"), "--json"])
    assert json.loads(out.stdout)["device"] == "cuda:0"
