"""The retrieval loss over the batch gathered from all ranks: 2 gloo processes x batch b give the
loss and (data-parallel averaged) gradients of 1 process x batch 2b."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from side4video.data.captions import tokenize
from side4video.distributed import free_port
from side4video.model.args import BackboneArgs, SideArgs
from side4video.model.contrastive import symmetric_cross_entropy
from side4video.model.retrieval import RetrievalArgs, build_retrieval_model
from side4video.precision import Precision

FP32 = Precision(torch.float32, torch.float32, torch.float32, torch.float32)
HALF_BATCH = 3
CAPTIONS = [
    "a red square drifting left",
    "a red square drifting right",
    "the blue circle turning clockwise",
    "green diamond moving up",
    "a white triangle coming closer",
    "cyan square moving away",
]


def _model():
    model = build_retrieval_model(
        RetrievalArgs(
            precision=FP32,
            backbone=BackboneArgs(name="ViT-T-8", image_size=32),
            side=SideArgs(dim=64),
            max_words=10,
            seed=5,
        )
    )
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(9)
        model.side_proj.weight.normal_(0, 0.05)  # so that gradients reach the side network
    # eval mode: BatchNorm's batch statistics would differ between b and 2b (the reference's too)
    return model.eval()


def _batch():
    ids, mask = tokenize(CAPTIONS, 10)
    video = torch.randn(2 * HALF_BATCH, 3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return ids, mask, video


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        ids, mask, video = _batch()
        part = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        out = model(ids[part], mask[part], video[part], gather=True)
        out["loss"].backward()
        grads = _grads(model)
        for g in grads.values():  # what the engine does: average the gradients over ranks
            dist.all_reduce(g)
            g /= world
        torch.save(
            {"loss": out["loss"].detach(), "logits": out["logits"].detach(), "grads": grads}, f"{out_path}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path):
    out = tmp_path / "rank"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]

    torch.set_num_threads(1)
    model = _model()
    ids, mask, video = _batch()
    single = model(ids, mask, video)  # not training: no gather, one process
    single["loss"].backward()
    grads = _grads(model)

    assert single["logits"].shape == ranks[0]["logits"].shape == (2 * HALF_BATCH, 2 * HALF_BATCH)
    for r in ranks:
        assert torch.allclose(r["loss"], single["loss"], atol=1e-6)
        assert torch.allclose(r["logits"], single["logits"], atol=1e-5)
    assert set(grads) == set(ranks[0]["grads"])
    assert any(k.startswith("side.") for k in grads) and any(k.startswith("text.") for k in grads)
    for name, g in grads.items():
        assert torch.allclose(ranks[0]["grads"][name], g, rtol=1e-3, atol=1e-7), name


def _symmetric_cross_entropy_reference(logits) -> float:
    """The loss by hand in float64: for each row (text) and each column (video), log-sum-exp of
    its scores minus the matching pair's score, averaged per direction, then over both."""
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[0]

    def cross_entropy(scores: np.ndarray, target: int) -> float:
        top = max(scores)  # log-sum-exp, shifted for stability
        return top + math.log(sum(math.exp(v - top) for v in scores)) - scores[target]

    texts = sum(cross_entropy(x[i, :], i) for i in range(n)) / n
    videos = sum(cross_entropy(x[:, j], j) for j in range(n)) / n
    return (texts + videos) / 2


def test_symmetric_cross_entropy():
    # By hand: rows [2, 0] and [1, 3] lose log(1 + e^-2) each; columns [2, 1] and [0, 3] lose
    # log(1 + e^-1) and log(1 + e^-3). Not symmetric, so the two directions differ.
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    by_hand = (math.log1p(math.exp(-2)) + (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))) / 2) / 2
    assert _symmetric_cross_entropy_reference(logits) == pytest.approx(by_hand, rel=1e-12)
    assert symmetric_cross_entropy(logits).item() == pytest.approx(by_hand, rel=1e-6)
    # a larger case with CLIP-sized scores (exp(100 * cos) would overflow without the shift)
    scores = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for scale in (1.0, 100.0):
        logits = (scale * scores).float()
        expected = _symmetric_cross_entropy_reference(logits)
        assert symmetric_cross_entropy(logits).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
