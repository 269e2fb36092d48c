"""Every experiment config against the reference's recipe, read from its files.

The table is the reference implementation's own values (HJYao00/Side4Video, Recognition/configs/
and utils/Augmentation.py), one row per shipped experiment config; a config copied from another
without its recipe, or a new config without a row here, fails. Every config's model is built on
the meta device and planned (`side4video plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import pytest

from side4video.config import CLIP_MEAN, CLIP_STD, load_config
from side4video.data.annotations import read_class_list
from side4video.data.augment import mirrored_label_pairs
from side4video.engine.factory import model_on_meta
from side4video.engine.plan import plan
from tests.support import CONFIGS

SS_PAIRS = [[86, 87], [93, 94], [166, 167]]  # the reference's GroupRandomHorizontalFlip_sth map


@dataclass(frozen=True)
class Recipe:
    reference: str  # under Recognition/configs/ of the reference
    backbone: str
    side_dim: int
    frames: int
    batch: int  # clips per GPU (the reference's batch_size), before repeated views
    lr: float
    epochs: int
    warmup: int
    randaugment: bool  # rand-m7-n4-mstd0.5-inc1 when on


# dataset -> (num_classes, resize, views per clip (num_sample), grayscale p, flip label pairs, eval crops x clips)
DATASETS = {
    "k400": (400, [256], 1, 0.2, [], (3, 4)),
    "ssv2": (174, [256, 320], 2, 0.0, SS_PAIRS, (3, 2)),
    "sthv1": (174, [256, 320], 2, 0.0, SS_PAIRS, (3, 2)),
}

RECIPES = {
    "k400_vitb32": Recipe("k400/k400_train_rgb_vitb-32-f8-side4video.yaml", "ViT-B-32", 320, 8, 32, 1e-3, 30, 4, False),
    "k400_vitb16": Recipe("k400/k400_train_rgb_vitb-16-f8-side4video.yaml", "ViT-B-16", 320, 8, 32, 1e-3, 30, 4, False),
    "k400_vitl14": Recipe("k400/k400_train_rgb_vitl-14-f8-side4video.yaml", "ViT-L-14", 512, 8, 32, 1e-4, 30, 4, False),
    # batch: 1 in the file's first version, 8 in its later edit (followed here; see the config)
    "k400_eva02e14": Recipe("k400/k400_train_rgb_evae-14-f8.yaml", "EVA02-E-14", 576, 8, 8, 1e-4, 20, 4, True),
    "ssv2_vitb32": Recipe("sthv2/sthv2_train_rgb_vitb-32-side4video.yaml", "ViT-B-32", 320, 8, 16, 1e-3, 30, 4, True),
    "ssv2_vitb16": Recipe("sthv2/sthv2_train_rgb_vitb-16-side4video.yaml", "ViT-B-16", 320, 8, 16, 1e-3, 30, 4, True),
    "ssv2_vitl14": Recipe("sthv2/sthv2_train_rgb_vitl-14-side4video.yaml", "ViT-L-14", 512, 8, 16, 1e-4, 30, 4, True),
    "ssv2_eva02e14": Recipe("sthv2/sthv2_train_rgb_evae-14-f8.yaml", "EVA02-E-14", 576, 8, 8, 1e-4, 25, 6, True),
    # no reference config: the f8 recipe with the paper's 16 frames
    "ssv2_eva02e14_f16": Recipe("sthv2/sthv2_train_rgb_evae-14-f8.yaml", "EVA02-E-14", 576, 16, 8, 1e-4, 25, 6, True),
    "sthv1_vitb32": Recipe("sthv1/sthv1_train_rgb_vitb-32-side4video.yaml", "ViT-B-32", 320, 8, 16, 1e-3, 40, 4, True),
    "sthv1_vitb16": Recipe("sthv1/sthv1_train_rgb_vitb-16-side4video.yaml", "ViT-B-16", 320, 8, 16, 1e-3, 40, 4, True),
    "sthv1_vitl14": Recipe("sthv1/sthv1_train_rgb_vitl-14-side4video.yaml", "ViT-L-14", 512, 8, 16, 1e-4, 30, 4, True),
    "sthv1_eva02e14": Recipe("sthv1/sthv1_train_rgb_evae-14-f8.yaml", "EVA02-E-14", 576, 8, 8, 1e-4, 30, 6, True),
}

# side blocks per backbone: every layer for CLIP ViTs, every other one of EVA's 64
SIDE_BLOCKS = {"ViT-B-32": 12, "ViT-B-16": 12, "ViT-L-14": 24, "EVA02-E-14": 32}


def experiment_configs() -> List[str]:
    """The recognition experiments (retrieval ones: tests/config/test_retrieval_config.py)."""
    return sorted(p.stem for p in (CONFIGS / "experiments").glob("*.yaml") if load_config(p).task == "recognition")


def test_every_experiment_config_has_a_row_and_every_row_a_config():
    assert experiment_configs() == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_the_reference(name):
    r = RECIPES[name]
    path = CONFIGS / "experiments" / f"{name}.yaml"
    assert f"Recognition/configs/{r.reference}" in path.read_text(), "the config names the reference file it follows"
    cfg = load_config(path)
    d, t = cfg.data, cfg.train
    num_classes, resize, views, grayscale, pairs, (crops, clips) = DATASETS[name.split("_")[0]]

    # model
    assert (cfg.model.method, cfg.model.backbone.name, cfg.model.side.dim) == ("side4video", r.backbone, r.side_dim)
    assert cfg.model.side.drop_path == 0.0 and cfg.model.head.dropout == 0.0
    # frozen weights in fp16 for every backbone, ViT-E included (the EVA authors' precision)
    assert (cfg.model.backbone.precision, cfg.model.backbone.convert_weights) == ("fp16", False)
    # schedule and optimizer (shared by every reference config)
    assert (t.batch_size, t.lr, t.epochs, t.warmup_epochs) == (r.batch, r.lr, r.epochs, r.warmup)
    assert (t.optimizer, list(t.betas), t.eps, t.weight_decay, t.label_smoothing) == (
        "adamw",
        [0.9, 0.999],
        1e-8,
        0.15,
        0.1,
    )
    assert (t.grad_accum, t.min_lr) == (1, 0.0)
    # data and augmentation
    assert (d.num_classes, d.frames, d.size, d.sampling, list(d.resize)) == (num_classes, r.frames, 224, "tsn", resize)
    assert (list(d.crop_area), list(d.crop_aspect)) == ([0.08, 1.0], [0.75, 1.3333333])
    assert d.repeated_views == views and d.grayscale == grayscale
    assert d.flip and [list(p) for p in d.flip_label_pairs] == pairs
    ra = d.randaugment
    assert ra.enabled == r.randaugment
    if r.randaugment:
        assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.ops) == (4, 7.0, 0.5, "increasing")
    assert (list(d.mean), list(d.std)) == (CLIP_MEAN, CLIP_STD)
    assert (cfg.eval.crops, cfg.eval.clips) == (crops, clips)

    # the model builds (on meta) and the plan runs
    model = model_on_meta(cfg)
    assert next(model.parameters()).device.type == "meta"
    report = plan(cfg)
    assert (report["backbone"], report["side_dim"], report["frames"]) == (r.backbone, r.side_dim, r.frames)
    assert report["side_blocks"] == SIDE_BLOCKS[r.backbone]
    assert report["head_params"] == r.side_dim * num_classes + num_classes
    assert report["trainable_params"] == model.parameter_counts()["trainable_params"]


def test_ssv1_flip_pairs_are_its_own_left_right_classes():
    names = read_class_list(str(CONFIGS / "data" / "sthv1_classes.txt"))
    assert len(names) == len(set(names)) == 174 and names == sorted(names)  # ids: the sorted v1 names
    derived = mirrored_label_pairs(names)
    assert [(names[a], names[b]) for a, b in derived] == [
        ("Pulling something from left to right", "Pulling something from right to left"),
        ("Pushing something from left to right", "Pushing something from right to left"),
        ("Turning the camera left while filming something", "Turning the camera right while filming something"),
    ]
    sthv1 = load_config(CONFIGS / "data" / "sthv1.yaml")
    assert [list(p) for p in sthv1.data.flip_label_pairs] == derived == SS_PAIRS  # = the reused SSv2 map


def test_mirrored_label_pairs_swap_whole_words_only():
    names = ["turn left", "copyright", "turn right", "left or right", "right or left", "copyleft", "bright"]
    pairs: List[Tuple[int, int]] = [tuple(p) for p in mirrored_label_pairs(names)]
    assert pairs == [(0, 2), (3, 4)]  # not copyright <-> copyleft
