"""The retrieval keys of the schema and the retrieval experiment configs (the reference's recipe)."""

import math

import pytest

from side4video.config import describe_schema, load_config
from side4video.engine.factory import retrieval_args
from side4video.errors import UserError
from tests.support import CONFIGS

RETRIEVAL = ["msrvtt_vitb16", "msrvtt_vitb32", "msvd_vitb32", "vatex_vitb16", "msrvtt_eva02e14"]


def test_schema_documents_the_task_switch_and_the_retrieval_keys():
    schema = describe_schema()
    for key in (
        "task = 'recognition' [recognition|retrieval]",
        "model.text.max_words",
        "model.text.trainable",
        "model.retrieval.similarity = 'wti' [wti|meanp]",
        "model.retrieval.coef_lr",
        "model.retrieval.logit_scale_max",
        "eval.dual_softmax",
        "eval.text_batch_size",
        "eval.similarity_chunk",
        "model.backbone.embed_dim",
        "model.text.vocab_size",
    ):
        assert key in schema, key
    with pytest.raises(UserError, match="task"):
        load_config(None, ["task=captioning"])
    with pytest.raises(UserError, match="model.retrieval.similarity"):
        load_config(None, ["model.retrieval.similarity=dot"])


@pytest.mark.parametrize("name", RETRIEVAL)
def test_retrieval_configs_carry_the_reference_recipe(name):
    cfg = load_config(CONFIGS / "experiments" / f"{name}.yaml")
    assert cfg.task == "retrieval" and cfg.model.retrieval.similarity == "wti"
    assert cfg.model.backbone.precision == "fp16"  # frozen weights in fp16, ViT-E included
    assert (cfg.data.frames, cfg.model.text.max_words, cfg.model.side.dim, cfg.train.epochs) == (12, 32, 320, 5)
    assert cfg.train.batch_size * 8 == 128  # per GPU x the reference's 8 GPUs
    assert cfg.train.lr * cfg.model.retrieval.coef_lr == pytest.approx(1e-7) and cfg.train.lr == 1e-4
    assert list(cfg.train.betas) == [0.9, 0.98] and cfg.train.eps == 1e-6 and cfg.train.weight_decay == 0.2
    assert not cfg.train.decay_norm_and_bias and cfg.train.grad_clip == 1.0
    assert cfg.train.warmup_epochs == pytest.approx(0.1 * cfg.train.epochs)
    assert cfg.model.retrieval.logit_scale_max == pytest.approx(math.log(100))
    assert (cfg.data.crop_area[0], cfg.data.flip, cfg.eval.crops, cfg.eval.clips) == (1.0, False, 1, 1)
    args = retrieval_args(cfg)
    assert args.similarity == "wti" and args.max_words == 32
    backbone = {
        "msrvtt_vitb16": "ViT-B-16",
        "msrvtt_vitb32": "ViT-B-32",
        "msvd_vitb32": "ViT-B-32",
        "vatex_vitb16": "ViT-B-16",
        "msrvtt_eva02e14": "EVA02-E-14",
    }[name]
    assert cfg.model.backbone.name == backbone
    assert cfg.model.text.trainable == (name != "msrvtt_eva02e14")  # frozen for EVA: a stated deviation
    text = (CONFIGS / "experiments" / f"{name}.yaml").read_text()
    assert "run_train_msrvtt.sh" in text or "run_train_msvd.sh" in text or "run_train_vatex.sh" in text
    assert "Deviations:" in text


def test_every_retrieval_config_is_checked():
    found = sorted(p.stem for p in (CONFIGS / "experiments").glob("*.yaml") if load_config(p).task == "retrieval")
    assert found == sorted(RETRIEVAL)
