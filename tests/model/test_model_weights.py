"""Pretrained backbone weights from local open_clip / timm checkpoint files (no hub access).

A small library tower is built by open_clip or timm themselves, saved in the checkpoint layout
those libraries write, loaded through `model.backbone.weights`, and must give the library's own
outputs.
"""

import logging

import pytest
import torch

from side4video.cli import main
from side4video.config import load_config
from side4video.engine.factory import model_from_config as build_model
from side4video.errors import UserError
from side4video.model.backbone import build_backbone
from side4video.model.spec import resolve_spec
from side4video.model.tower import sha256_file
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"
FRAMES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def open_clip_tower(width=128, layers=3, heads=2):
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    vision = dict(image_size=32, layers=layers, width=width, patch_size=16, head_width=width // heads)
    return _build_vision_tower(embed_dim=128, vision_cfg=vision, quick_gelu=True).eval()


def test_open_clip_vit_checkpoint_gives_open_clip_outputs(tmp_path):
    tower = open_clip_tower()
    path = tmp_path / "clip.pt"
    # open_clip's checkpoint layout: the whole CLIP model under 'state_dict', DDP 'module.' prefix
    sd = {f"module.visual.{k}": v for k, v in tower.state_dict().items()}
    sd["module.text_projection"] = torch.zeros(3, 3)  # other towers are ignored
    torch.save({"epoch": 3, "state_dict": sd}, path)

    spec = resolve_spec("ViT-T-16", 32, quick_gelu=True)
    ours = build_backbone(
        spec,
        [2],
        storage_dtype=torch.float32,
        compute_dtype=torch.float32,
        weights=str(path),
        keep_final_norm=True,
        keep_proj=True,
    )
    with torch.no_grad():
        pooled = ours.proj(ours.class_token(ours(FRAMES)[-1]))
        expected = tower(FRAMES)
    assert torch.allclose(pooled, expected, atol=1e-5)
    fp = ours.fingerprint()
    assert fp["weights"] == str(path.resolve()) and fp["sha256"] == sha256_file(str(path))

    # The same file, stored in fp16 and computed in fp32 through the upcast hooks.
    half = build_backbone(
        spec,
        [2],
        storage_dtype=torch.float16,
        compute_dtype=torch.float32,
        weights=str(path),
        keep_final_norm=True,
        keep_proj=True,
    )
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with torch.no_grad():
        pooled_half = half.proj(half.class_token(half(FRAMES)[-1]))
    assert torch.allclose(pooled_half.float(), expected, atol=2e-2)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save({f"visual.{k}": v for k, v in open_clip_tower(width=64).state_dict().items()}, path)
    with pytest.raises(UserError, match="shape"):
        build_model(
            load_config(DEMO, ["model.backbone.name=ViT-T-16", "data.size=32", f"model.backbone.weights={path}"])
        )
    torch.save({"visual.conv1.weight": torch.zeros(128, 3, 16, 16)}, path)
    with pytest.raises(UserError, match="lacks"):
        build_model(
            load_config(DEMO, ["model.backbone.name=ViT-T-16", "data.size=32", f"model.backbone.weights={path}"])
        )
    assert main(["plan", str(DEMO), "model.backbone.name=ViT-Nope"]) == 2


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model(
            load_config(
                DEMO, ["model.backbone.name=ViT-T-16", "data.size=32", f"model.backbone.weights={tmp_path / 'none.pt'}"]
            )
        )


def test_position_embedding_is_resampled_to_another_input_size(tmp_path):
    tower = open_clip_tower()  # 32 px: 2x2 grid
    path = tmp_path / "clip.pt"
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, path)
    model = build_model(
        load_config(DEMO, ["model.backbone.name=ViT-T-16", "data.size=64", f"model.backbone.weights={path}"])
    )
    assert model.backbone.stem.positional_embedding.shape == (17, 128)
    assert torch.equal(model.backbone.blocks[1].mlp.c_fc.weight, tower.transformer.resblocks[1].mlp.c_fc.weight)


def test_timm_eva_checkpoint_in_open_clip_layout(tmp_path):
    import timm

    torch.manual_seed(0)
    eva = timm.create_model(
        "eva02_enormous_patch14_clip_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        embed_dim=64,
        depth=2,
        num_heads=2,
        patch_size=16,
    ).eval()
    path = tmp_path / "eva.pt"
    torch.save({f"visual.trunk.{k}": v for k, v in eva.state_dict().items()}, path)
    cfg = load_config(
        DEMO,
        [
            "model.backbone.name=ViT-T-16",
            "data.size=32",
            "data.frames=4",
            "model.method=linear_probe",
            "model.backbone.name=EVA02-E-14",
            "model.backbone.width=64",
            "model.backbone.layers=2",
            "model.backbone.heads=2",
            "model.backbone.patch_size=16",
            "model.backbone.precision=bf16",
            f"model.backbone.weights={path}",
        ],
    )
    model = build_model(cfg)
    assert {p.dtype for p in model.backbone.frozen_parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ours = model.backbone.class_token(model.backbone(FRAMES)[-1])
        expected = eva.forward_features(FRAMES)[:, 0]
    # bf16 storage of the weights: close, not equal
    assert torch.allclose(ours, expected, atol=5e-2), (ours - expected).abs().max()


def test_random_backbone_tokens_carry_their_position():
    """A random backbone (demo, tests, benchmarks) gets 2-D sine-cosine position codes at the
    scale of its patch tokens, as a pretrained ViT's tokens carry where they are; N(0, 0.02)
    codes would drown under the patch content (the demo then needed ~3x the steps)."""
    model = build_model(load_config(REPO / "configs/demo.yaml", []))
    codes = model.backbone.stem.positional_embedding.detach()
    assert torch.equal(codes[0], torch.zeros_like(codes[0]))  # the class token: no grid position
    patches = codes[1:]
    assert 0.3 < float(patches.std()) < 1.0
    distances = torch.cdist(patches, patches) + torch.eye(len(patches)) * 1e9
    assert float(distances.min()) > 0.5  # every patch position has its own code
    # neighbours are closer than far corners: a smooth grid code, not noise
    grid = int(len(patches) ** 0.5)
    assert float(distances[0, 1]) < float(distances[0, len(patches) - 1])
    assert grid * grid == len(patches)


class Lines(logging.Handler):
    """The log lines of one logger (whatever the package logger's propagation)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_half_precision_checkpoint_is_never_rounded_silently(tmp_path):
    """An fp16 checkpoint (a small random ViT saved as a file) into a bf16-configured backbone:
    refused in one line; with model.backbone.convert_weights=true converted, and one line counts
    the values the rounding changed. Stored in fp16, the file's bits are kept as they are."""
    tower = open_clip_tower().half()
    path = tmp_path / "clip_fp16.pt"
    torch.save({"state_dict": {f"visual.{k}": v for k, v in tower.state_dict().items()}}, path)
    base = [
        "model.backbone.name=ViT-T-16",
        "model.backbone.quick_gelu=true",
        "data.size=32",
        "model.method=linear_probe",
    ]
    base.append(f"model.backbone.weights={path}")

    with pytest.raises(UserError) as refused:
        build_model(load_config(DEMO, [*base, "model.backbone.precision=bf16"]))
    message = str(refused.value)
    assert "\n" not in message and "is fp16, model.backbone.precision is bf16" in message
    assert "model.backbone.convert_weights=true" in message and "model.backbone.precision=fp16" in message

    kept = build_model(load_config(DEMO, [*base, "model.backbone.precision=fp16"])).backbone
    log = logging.getLogger("side4video.model.weights")
    lines, level = Lines(), log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        converted = build_model(
            load_config(DEMO, [*base, "model.backbone.precision=bf16", "model.backbone.convert_weights=true"])
        ).backbone
    finally:
        log.removeHandler(lines)
        log.setLevel(level)
    changed = total = 0
    for (name, bf), (_, fp) in zip(converted.named_parameters(), kept.named_parameters()):
        assert bf.dtype == torch.bfloat16 and fp.dtype == torch.float16, name
        assert torch.equal(bf, fp.to(torch.bfloat16)), name  # the fp16 file's values, rounded once
        changed += int((bf.to(torch.float16) != fp).sum())
        total += fp.numel()
    assert 0 < changed < total
    assert lines.lines == [
        f"model.backbone.convert_weights: {changed:,} of {total:,} fp16 values of {path} changed when stored in "
        f"the other half precision ({100 * changed / total:.2f}%)"
    ]
    assert converted.fingerprint()["converted_to"] == "bfloat16" and "converted_to" not in kept.fingerprint()

    # the reverse: a bf16 file into fp16 storage is refused the same way
    torch.save({f"visual.{k}": v.to(torch.bfloat16) for k, v in tower.state_dict().items()}, path)
    with pytest.raises(UserError, match="is bf16, model.backbone.precision is fp16"):
        build_model(load_config(DEMO, [*base, "model.backbone.precision=fp16"]))


def test_a_half_precision_text_tower_is_never_rounded_silently(tmp_path):
    """Retrieval's frozen text tower reads the same checkpoint: an fp16 file into a bf16 tower is
    refused in one line, converted and counted with model.backbone.convert_weights."""
    from side4video.model.text import build_text_tower, resolve_text_spec

    spec = resolve_text_spec("ViT-B-16", 12, 48, width=32, layers=1, heads=1, vocab_size=64)
    source, _ = build_text_tower(spec, dtype=torch.float16, seed=3)
    path = tmp_path / "clip_fp16.pt"
    torch.save({f"text.{k}": v for k, v in source.state_dict().items()}, path)
    with pytest.raises(UserError, match="clip_fp16.pt's text tower is fp16, model.backbone.precision is bf16"):
        build_text_tower(spec, dtype=torch.bfloat16, weights=str(path))
    log = logging.getLogger("side4video.model.weights")
    lines, level = Lines(), log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        tower, _ = build_text_tower(spec, dtype=torch.bfloat16, weights=str(path), convert_weights=True)
    finally:
        log.removeHandler(lines)
        log.setLevel(level)
    expected = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in tower.state_dict().items())
    assert len(lines.lines) == 1 and "fp16 values of" in lines.lines[0] and "'s text tower changed" in lines.lines[0]
    kept, _ = build_text_tower(spec, dtype=torch.float16, weights=str(path))  # its own precision: exact
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in kept.state_dict().items())
