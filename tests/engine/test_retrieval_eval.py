"""Retrieval evaluation: the reference's metrics exactly, the similarity in bounded chunks,
dual-softmax apart, report files, and split encoding that keeps ranks in step (2 gloo ranks
equal 1)."""

import datetime
import json
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from side4video.distributed import free_port
from side4video.engine.evaluate import retrieval_entries, retrieval_metrics, text_to_video_ranks
from side4video.engine.retrieval import (
    chunk_sizes,
    dual_softmax,
    encode_split,
    evaluate_retrieval,
    flat_metrics,
    retrieval_report,
    similarity_matrix,
    write_retrieval_report,
)
from side4video.model.similarity import TextEmbedding, VideoEmbedding, unit, wti_similarity
from tests.support.reference import RETRIEVAL_METRICS, load_reference

KEYS = ("R1", "R5", "R10", "MedianR", "MeanR")


@pytest.fixture(scope="module")
def ref():
    return load_reference(RETRIEVAL_METRICS)


def test_one_caption_per_video_metrics_equal_the_reference(ref):
    got = retrieval_metrics(ref["sim"])
    entries = retrieval_entries(ref["sim"])
    for direction in ("t2v", "v2t"):
        expected = dict(ref[direction], MedianR=ref[direction]["MR"])
        assert {k: got[direction][k] for k in KEYS} == {k: expected[k] for k in KEYS}, direction
        assert [int(i) for i in entries[direction]] == ref[direction]["cols"]  # ties: one entry per tied position
    assert got["t2v"]["entries"] == 39  # row 4 is tied everywhere: 16 entries for one caption


def test_several_captions_per_video_metrics_equal_the_reference(ref):
    got = retrieval_metrics(ref["sim_multi"], ref["video_of_caption"])
    assert {k: got["t2v"][k] for k in (*KEYS, "Std_Rank")} == {k: ref["t2v_multi"][k] for k in (*KEYS, "Std_Rank")}
    assert {k: got["v2t"][k] for k in KEYS} == {k: ref["v2t_multi"][k] for k in KEYS}
    assert torch.equal(text_to_video_ranks(ref["sim_multi"], ref["video_of_caption"]), ref["t2v_multi_ranks"])
    assert [int(i) for i in retrieval_entries(ref["sim_multi"], ref["video_of_caption"])["v2t"]] == ref["v2t_multi"][
        "cols"
    ]
    # the caption rows may come in any order
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = retrieval_metrics(ref["sim_multi"][order], ref["video_of_caption"][order])
    assert shuffled == got


def test_metric_inputs_are_checked(ref):
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(ref["sim_multi"])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(ref["sim_multi"][:3], torch.tensor([0, 0, 1]))


def _embeddings(texts, videos, tokens=4, frames=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(texts, tokens)
    mask[::2, -1] = 0
    t = TextEmbedding(
        unit(torch.randn(texts, tokens, dim, generator=g)),
        mask,
        torch.softmax(torch.randn(texts, tokens, generator=g).masked_fill(mask == 0, -1e9), -1),
    )
    v = VideoEmbedding(
        unit(torch.randn(videos, frames, dim, generator=g)), torch.softmax(torch.randn(videos, frames, generator=g), -1)
    )
    return t, v


@pytest.mark.parametrize("texts", [1000, 20000])
def test_similarity_is_computed_in_bounded_blocks(texts):
    t, v = _embeddings(texts, 1000)
    budget = 1 << 18  # elements of one block's (texts, videos, tokens, frames) interaction
    blocks = []

    def recording(tb, vb):
        blocks.append(len(tb) * len(vb) * 4 * 3)
        return wti_similarity(tb, vb)

    sim = similarity_matrix(t, v, recording, max_elements=budget)
    assert sim.shape == (texts, 1000) and sim.dtype == torch.float32
    assert max(blocks) <= budget < texts * 1000 * 12  # never the whole interaction at once
    assert sum(blocks) == texts * 1000 * 12  # every pair exactly once
    assert torch.allclose(sim[:200], wti_similarity(t[:200], v), atol=1e-6)
    assert torch.allclose(sim[-7:], wti_similarity(t[-7:], v), atol=1e-6)
    assert chunk_sizes(texts, 1000, 12, budget) == (21, 1000)


def test_dual_softmax_is_reported_apart():
    # video 0 is a hub: every caption likes it a little more than its own video
    sim = torch.eye(6) * 0.5 + 0.2
    sim[:, 0] += 0.55
    plain = retrieval_report(sim)
    assert "dual_softmax" not in plain and plain["t2v"]["R1"] == pytest.approx(100 / 6)
    both = retrieval_report(sim, dual_softmax_temperature=0.01)
    assert both["t2v"] == plain["t2v"] and both["v2t"] == plain["v2t"]  # never mixed in
    assert both["dual_softmax"]["t2v"]["R1"] == 100.0
    t2v, v2t = dual_softmax(sim)
    assert t2v.shape == v2t.shape == sim.shape


def test_report_files_and_flat_metrics(tmp_path):
    t, v = _embeddings(40, 20)
    sim = similarity_matrix(t, v, wti_similarity)
    video_of_caption = torch.arange(40) % 20
    report = retrieval_report(sim, video_of_caption, dual_softmax_temperature=0.01)
    assert report["chance_R1"] == 5.0 and report["videos"] == 20 and report["captions"] == 40
    assert report["recall_at_k"]["k"] == list(range(1, 21)) and report["recall_at_k"]["t2v"][-1] == 100.0
    assert report["recall_at_k"]["t2v"][0] == report["t2v"]["R1"]
    write_retrieval_report(report, tmp_path, "final_eval")
    saved = json.loads((tmp_path / "final_eval.json").read_text())
    assert saved["t2v"]["R1"] == report["t2v"]["R1"]
    assert (tmp_path / "final_eval_recall.png").read_bytes()[:4] == b"\x89PNG"
    flat = flat_metrics(report)
    assert {"t2v_R1", "v2t_MeanR", "dsl_t2v_R1", "t2v_Std_Rank"} <= set(flat) and "t2v_entries" not in flat


# ------------------------------------------------------------------ encoding a split over ranks
VIDEOS = {f"v{i}": [f"caption {j} of video {i}" for j in range(1 + i % 3)] for i in range(7)}


def _loader(rank, world, batch=1):
    """What the eval loader gives a rank: its share of the videos, each once, smaller last batch."""
    keys = sorted(VIDEOS)[rank::world]
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        video = torch.stack([torch.randn(3, 8, generator=torch.Generator().manual_seed(int(k[1:]))) for k in part])
        yield {"video": video, "key": part, "captions": [VIDEOS[k] for k in part]}


class Encoders:
    """Deterministic stand-ins for the model that count their forward calls."""

    def __init__(self):
        self.video_calls = self.text_calls = 0

    def video(self, video):
        self.video_calls += 1
        return VideoEmbedding(unit(video), torch.softmax(video.sum(-1), -1))

    def text(self, captions):
        self.text_calls += 1
        rows = [torch.randn(4, 8, generator=torch.Generator().manual_seed(zlib.crc32(c.encode()))) for c in captions]
        features = torch.stack(rows)
        return TextEmbedding(unit(features), torch.ones(len(captions), 4), torch.softmax(features.sum(-1), -1))


def _evaluate(rank, world):
    enc = Encoders()
    split = encode_split(_loader(rank, world), enc.video, enc.text, dummy_video=torch.zeros(1, 3, 8), text_batch_size=2)
    sim = similarity_matrix(split.texts, split.videos, wti_similarity, max_elements=64)
    report = evaluate_retrieval(
        _loader(rank, world),
        enc.video,
        enc.text,
        wti_similarity,
        dummy_video=torch.zeros(1, 3, 8),
        text_batch_size=2,
        max_elements=64,
    )
    return enc, split, sim, report


def _rank(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # ranks out of step fail instead of hanging
    try:
        enc, split, sim, report = _evaluate(rank, world)
        torch.save(
            {
                "calls": (enc.video_calls, enc.text_calls),
                "keys": split.keys,
                "captions": split.captions,
                "texts": split.texts.features,
                "videos": split.videos.features,
                "video_of_caption": split.video_of_caption,
                "sim": sim,
                "report": report,
            },
            f"{path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_encode_in_step_and_equal_one_rank(tmp_path):
    out = tmp_path / "rank"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    enc, split, sim, report = _evaluate(0, 1)

    # ZeRO-3 safety: rank 0 has 4 one-video batches needing 1, 2, 1, 1 caption batches, rank 1
    # has 3 needing 1, 1, 2; both made the same forward calls (the short one on dummies)
    assert ranks[0]["calls"] == ranks[1]["calls"] == (2 * 4, 2 * 6)  # encode_split + evaluate_retrieval
    assert split.keys == [f"v{i}" for i in range(7)] and len(split.captions) == 13
    assert split.video_of_caption.tolist() == [i for i in range(7) for _ in VIDEOS[f"v{i}"]]
    assert not split.one_caption_per_video
    for r in ranks:
        assert r["keys"] == split.keys and r["captions"] == split.captions
        assert torch.equal(r["texts"], split.texts.features) and torch.equal(r["videos"], split.videos.features)
        assert torch.equal(r["video_of_caption"], split.video_of_caption)
        assert torch.equal(r["sim"], sim)
        assert r["report"] == report
    assert report["videos"] == 7 and report["captions"] == 13
    assert np.isclose(report["chance_R1"], 100 / 7)
