"""Benchmarks: `side4video bench WHAT --out DIR` writes DIR/WHAT.json, DIR/WHAT.md and DIR/WHAT.png.

Each benchmark lives in its own module with `run(out, config=None, overrides=(), quick=False) ->
dict` (the JSON it wrote); this dispatcher only picks the module.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Sequence

from side4video.errors import UserError

BENCHES = {
    "data": "side4video.bench.data",  # decode clips/s: DALI vs plain PyAV
    "memory": "side4video.bench.memory",  # methods x backbones peak memory
    "vite": "side4video.bench.vite",  # EVA ViT-E/14 training steps: memory per rank, step times
    "stream": "side4video.bench.stream",  # shard streaming MB/s: the readers vs raw clients, folder/HTTP/S3
    "fp16": "side4video.bench.fp16",  # EVA ViT-E/14 blocks stored in fp16: largest activation per block vs 65504
    "checkpoint": "side4video.bench.checkpoint",  # ViT-E side network checkpoints: size, save/load on 1 and 2 ranks
}


def run_bench(
    what: str, out: str, config: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False
) -> Dict:
    if what not in BENCHES:
        raise UserError(f"bench {what!r}: allowed {', '.join(BENCHES)}")
    try:
        module = importlib.import_module(BENCHES[what])
    except ModuleNotFoundError as e:
        if e.name == BENCHES[what]:
            raise UserError(f"bench {what!r} is not available in this version") from None
        raise
    return module.run(out, config=config, overrides=list(overrides), quick=quick)
