"""The engine's own DeepSpeed initialisation (engine/deepspeed_engine.py), for real, on CPU.

- The frozen backbone is bit-identical to the loaded weights after `deepspeed.initialize`, in its
  storage precision, for every storage x training precision x ZeRO stage (DeepSpeed casts every
  parameter to its training precision unless kept from it).
- Under ZeRO-3 with parameter offload the CPU upcast hooks still run after ZeRO's gathers: the
  same outputs as before DeepSpeed, the frozen weights released (local size 0) between forwards;
  and a backbone partitioned unit by unit while it is built holds the same weights.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from side4video.distributed import free_port
from tests.support import DEMO, REPO

pytestmark = pytest.mark.slow  # side4video runs in subprocesses (DeepSpeed engines, launchers, servers)

SCRIPT = textwrap.dedent("""
    import itertools, json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from side4video import distributed
    from side4video.config import load_config
    from side4video.engine import deepspeed_engine
    from side4video.engine.factory import model_from_config, run_precision

    deepspeed_engine.init_distributed(distributed.detect(), torch.device("cpu"))
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    cases = [(s, t, z) for s, t, z in itertools.product(("fp16", "bf16"), ("fp32", "bf16"), (0, 1, 2, 3))
             if not (z == 0 and t == "fp32")]  # refused: nothing would skip a non-finite step there
    for storage, train, stage in cases:
        extra = ["deepspeed.offload_param=cpu"] if stage == 3 else []
        cfg = load_config(sys.argv[2], [f"model.backbone.precision={storage}", f"deepspeed.precision={train}",
                                        f"deepspeed.zero_stage={stage}", "data.size=32", "data.frames=4",
                                        "model.side.checkpointing=true", "train.batch_size=2",
                                        # width 256: some weights above ZeRO-3's persistence threshold
                                        "model.backbone.width=256", "model.backbone.heads=4", *extra])
        precision = run_precision(cfg, cuda=False)
        model = model_from_config(cfg, precision=precision)
        loaded = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        with torch.no_grad():
            before = model.eval()(x)
        engine = deepspeed_engine.initialize(model, cfg, precision, world_size=1)
        backbone = engine.module.backbone
        params = list(backbone.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            now = {k: v.clone() for k, v in backbone.state_dict().items()}
        same_bits = all(torch.equal(loaded[k], now[k]) and loaded[k].dtype == now[k].dtype for k in loaded)
        engine.eval()
        with torch.no_grad():
            diff = (engine(x).float() - before.float()).abs().max().item()
        engine.train()
        losses = []
        for _ in range(2):
            loss = engine(x).float().logsumexp(-1).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        built_partitioned = None
        if stage == 3:  # the way the runner builds: each unit partitioned as soon as it is loaded
            place = deepspeed_engine.frozen_unit_placer(cfg, precision, 1, 10**9)
            other = model_from_config(cfg, precision=precision, place_unit=place).backbone
            held = sum(p.numel() for p in other.parameters() if not p.ds_persist)
            with deepspeed.zero.GatheredParameters(list(other.parameters())):
                built_partitioned = held == 0 and all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
        results.append({"case": [storage, train, stage], "same_bits": same_bits, "diff": diff, "losses": losses,
                        "built_partitioned": built_partitioned,
                        "partitioned": sum(1 for p in params if not getattr(p, "ds_persist", True)),
                        "local": sum(p.numel() for p in params if not getattr(p, "ds_persist", True)),
                        "dtypes": sorted({str(p.dtype) for p in params}),
                        "trained_dtypes": sorted({str(p.dtype) for p in engine.module.side.parameters()})})
    print(json.dumps(results))
""")


@pytest.mark.timeout(900)
def test_frozen_backbone_untouched_by_deepspeed_for_every_precision_and_stage(tmp_path):
    script = tmp_path / "engines.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(free_port()), DEMO],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=880,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 14
    for r in results:
        storage, train, stage = r["case"]
        assert r["same_bits"], r  # bit for bit, in the storage precision
        assert r["dtypes"] == [{"fp16": "torch.float16", "bf16": "torch.bfloat16"}[storage]], r
        assert r["trained_dtypes"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[train]], r
        # fp32 compute through the upcast hooks: the engine's outputs are the model's (bf16 side: rounding)
        assert r["diff"] < (1e-5 if train == "fp32" else 5e-2), r
        assert all(abs(v) < 1e3 for v in r["losses"]), r
        if stage == 3:  # partitioned, and released again after each forward
            assert r["partitioned"] > 0 and r["local"] == 0, r
            # built unit by unit straight into partitions: the same weights, never held whole
            assert r["built_partitioned"] is True, r
