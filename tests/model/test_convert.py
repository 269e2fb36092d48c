"""The reference implementation's outputs, reproduced from its state dict (tests/fixtures/reference)."""

import pytest
import torch

from side4video.cli import main
from side4video.cli.convert import FORMAT
from side4video.config import load_config
from side4video.engine.factory import model_from_config as build_model
from side4video.model import from_official
from tests.support.reference import EVA, RECOGNITION, RETRIEVAL_VISUAL, load_reference


@pytest.fixture(scope="module")
def reference():
    return load_reference(RECOGNITION)


def test_from_official_reproduces_the_reference(reference):
    model = from_official(reference["state_dict"], reference["config"])
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        features = model.features(reference["input"])
        logits = model(reference["input"])
    assert features.shape == reference["pooled_side_features"].shape == (2, 128)
    assert logits.shape == reference["logits"].shape == (2, 7)
    assert (features - reference["pooled_side_features"]).abs().max() <= 1e-5
    assert (logits - reference["logits"]).abs().max() <= 1e-5


def test_convert_official_cli_on_a_wrapped_ddp_checkpoint(reference, tmp_path):
    sd = reference["state_dict"]
    wrapped = {
        "epoch": 29,
        "model_state_dict": {f"module.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
        "fusion_model_state_dict": {f"module.{k}": v for k, v in sd.items() if k.startswith("fc.")},
    }
    src, out = tmp_path / "ref.pt", tmp_path / "ours.pt"
    torch.save(wrapped, src)
    assert main(["convert-official", str(src), str(out), "--frames", "4"]) == 0

    saved = torch.load(out, weights_only=True)
    assert saved["format"] == FORMAT and saved["config"]["num_frames"] == 4
    # Our model, built from the recorded overrides with the converted file as backbone weights,
    # then given the converted side network and head, gives the reference's logits.
    cfg = load_config(None, [*saved["overrides"], f"model.backbone.weights={out}"])
    model = build_model(cfg).eval()
    assert model.backbone.fingerprint()["weights"] == str(out.resolve())
    model.load_trainable_state_dict({k: v for k, v in saved["state_dict"].items() if not k.startswith("backbone.")})
    with torch.no_grad():
        assert (model(reference["input"]) - reference["logits"]).abs().max() <= 1e-5


def test_convert_official_refuses_other_files(tmp_path):
    src = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, src)
    assert main(["convert-official", str(src), str(tmp_path / "out.pt")]) == 2
    assert main(["convert-official", str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")]) == 2


def test_retrieval_video_encoder_reproduces_the_reference():
    from side4video.model.retrieval import retrieval_encoder_from_official

    ref = load_reference(RETRIEVAL_VISUAL)
    model = retrieval_encoder_from_official(ref["state_dict"], ref["config"])
    with torch.no_grad():
        out = model(ref["input"])
        assert out.shape == ref["frame_embeddings"].shape == (2, 6, 96)
        assert (out - ref["frame_embeddings"]).abs().max() <= 1e-5
        # the side path shows in the output: without side_proj the embeddings differ
        model.side_proj.weight.zero_()
        assert (model(ref["input"]) - ref["frame_embeddings"]).abs().max() > 1e-3


# ------------------------------------------------------------------------------ EVA variant
@pytest.fixture(scope="module")
def eva_reference():
    return load_reference(EVA)


def test_from_official_reproduces_the_eva_reference(eva_reference):
    ref = eva_reference
    model = from_official(ref["state_dict"], ref["config"])
    assert model.backbone.spec.family == "eva" and model.side.variant == "eva"
    assert model.backbone.taps == [1, 3] and model.side.post_norm is None
    with torch.no_grad():
        features = model.features(ref["input"])
        logits = model(ref["input"])
    assert features.shape == ref["pooled_side_features"].shape == (2, 128)
    assert logits.shape == ref["logits"].shape == (2, 7)
    assert (features - ref["pooled_side_features"]).abs().max() <= 1e-5
    assert (logits - ref["logits"]).abs().max() <= 1e-5


def test_convert_official_cli_on_an_eva_checkpoint(eva_reference, tmp_path):
    sd = eva_reference["state_dict"]
    src, out = tmp_path / "ref_eva.pt", tmp_path / "ours_eva.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)
    assert main(["convert-official", str(src), str(out), "--frames", "4"]) == 0

    saved = torch.load(out, weights_only=True)
    assert "model.side.variant=eva" in saved["overrides"] and "model.backbone.name=EVA02-E-14" in saved["overrides"]
    cfg = load_config(None, [*saved["overrides"], f"model.backbone.weights={out}"])
    model = build_model(cfg).eval()
    model.load_trainable_state_dict({k: v for k, v in saved["state_dict"].items() if not k.startswith("backbone.")})
    with torch.no_grad():
        assert (model(eva_reference["input"]) - eva_reference["logits"]).abs().max() <= 1e-5


def test_convert_official_eva_refuses_an_unknown_layout(eva_reference, tmp_path):
    sd = dict(eva_reference["state_dict"])
    sd["visual.blocks.0.attn.inner_attn_ln.weight"] = torch.ones(128)  # sub-LN EVA: not this architecture
    src = tmp_path / "sub_ln.pt"
    torch.save(sd, src)
    assert main(["convert-official", str(src), str(tmp_path / "out.pt")]) == 2
