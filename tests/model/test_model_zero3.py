"""The backbone's half-storage upcast hooks under real DeepSpeed ZeRO-3 (CPU, one rank, param offload).

After deepspeed.initialize the engine re-installs the hooks, so ZeRO-3's gather runs before our
upcast and its release after our restore: outputs must equal those of the model before
DeepSpeed, the frozen weights must stay partitioned (local size 0) between forwards and stay fp16.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from side4video.distributed import free_port

from tests.support import REPO

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules
    from side4video.config import load_config
    from side4video.engine.factory import model_from_config as build_model

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("configs/demo.yaml", ["model.backbone.precision=fp16", "data.size=32", "data.frames=4",
                                            "model.side.checkpointing=true"])
    model = build_model(cfg)
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    set_z3_leaf_modules(model, list({type(b) for b in model.backbone.blocks}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    bb = engine.module.backbone
    bb.install_compute_hooks()
    engine.eval()
    with torch.no_grad():
        diff = (engine(x) - before).abs().max().item()
    engine.train()
    losses = []
    for _ in range(2):
        loss = engine(x).logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print(json.dumps({"diff": diff, "losses": losses, "local": sum(p.numel() for p in bb.parameters()),
                      "dtypes": sorted({str(p.dtype) for p in bb.parameters()})}))
""")



@pytest.mark.timeout(600)
def test_upcast_hooks_under_zero3_offload(tmp_path):
    script = tmp_path / "z3.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(free_port())], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diff"] < 1e-5
    assert result["local"] == 0  # frozen weights released again after each forward
    assert result["dtypes"] == ["torch.float16"]
    assert all(abs(loss) < 1e3 for loss in result["losses"])  # finite
