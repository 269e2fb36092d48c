"""The retrieval loss over the batch gathered from all ranks: 2 gloo processes x batch b give the
loss and (data-parallel averaged) gradients of 1 process x batch 2b."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from side4video.data.captions import tokenize
from side4video.distributed import free_port
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
        RetrievalArgs(precision=FP32, backbone="ViT-T-8", image_size=32, side_dim=64, max_words=10, seed=5)
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


def test_symmetric_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -(torch.log_softmax(logits, 1).diag().mean())
    cols = -(torch.log_softmax(logits.T, 1).diag().mean())
    assert torch.allclose(symmetric_cross_entropy(logits), (rows + cols) / 2)
