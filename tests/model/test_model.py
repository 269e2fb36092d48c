"""The model: frozen backbone (eval, half storage, no gradients), side network, baselines.

Tiny random ViTs (ViT-T-16: 3 blocks, width 128) on 32-64 px, 4 frames: each test runs in
well under a second once torch and open_clip are imported.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from side4video.config import load_config
from side4video.engine.factory import model_from_config as build_model
from side4video.engine.factory import model_on_meta as build_model_on_meta
from side4video.errors import UserError
from side4video.model.side import SideNetwork, TemporalDepthwiseConv, shift_class_token
from tests.support import REPO

DEMO = REPO / "configs" / "demo.yaml"
TINY = ["model.backbone.name=ViT-T-16", "data.size=32", "data.frames=4", "data.num_classes=5"]


def make(*overrides, **kw):
    return build_model(load_config(DEMO, [*TINY, *overrides]), **kw)


def clips(n=2, frames=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, frames, 3, size, size, generator=g)


def backbone_params(model):
    return list(model.backbone.frozen_parameters())


def test_backbone_frozen_half_storage_eval_and_no_gradient():
    model = make("model.backbone.precision=fp16")
    bb = model.backbone
    assert {p.dtype for p in backbone_params(model)} == {torch.float16}
    assert not any(p.requires_grad for p in backbone_params(model))
    model.train()
    assert model.side.training and model.head.training
    assert not any(m.training for m in bb.modules())  # train() on the whole model never flips it

    # Blocks compute in fp32 on this CPU although the weights are stored in fp16.
    seen = []
    bb.blocks[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    taps = bb(clips().flatten(0, 1))
    assert seen == [(torch.float32, torch.float32)]
    assert [t.dtype for t in taps] == [torch.float16] * 3 and not any(t.requires_grad for t in taps)
    assert taps[0].shape == (8, 1 + 4, 128)

    loss = model(clips()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in backbone_params(model))
    assert {p.dtype for p in backbone_params(model)} == {torch.float16}  # restored after the upcast
    assert all(p.grad is not None for p in model.side.parameters())


def test_compute_hooks_reinstall_and_match_fp32_weights():
    half = make("model.backbone.precision=fp16")
    full = make("model.backbone.precision=fp32")
    full.load_state_dict(half.state_dict())  # the same (fp16-representable) weights in fp32
    half.backbone.install_compute_hooks()  # as the engine does after deepspeed.initialize
    half.backbone.install_compute_hooks()
    block = half.backbone.blocks[0]
    assert len(block._forward_pre_hooks) == 1 and len(block._forward_hooks) == 1
    x = clips()
    with torch.no_grad():
        a, b = half.eval()(x), full.eval()(x)
    # Only the taps' rounding to fp16 differs.
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()


def test_optimizer_and_checkpoint_never_see_the_backbone():
    model = make("model.backbone.precision=bf16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.backbone.parameters()}
    assert in_opt == {id(p) for p in [*model.side.parameters(), *model.head.parameters()]}
    sd = model.trainable_state_dict()
    assert not any(k.startswith("backbone.") for k in sd)
    assert "side.patch_norm.running_mean" in sd and "side.blocks.2.mlp_norm.num_batches_tracked" in sd
    assert set(sd) == {k for k in model.state_dict() if not k.startswith("backbone.")}


def test_training_step_changes_only_side_and_head():
    model = make("model.backbone.precision=fp16").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = F.cross_entropy(model(clips()), torch.tensor([1, 3]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in after.items():
        if k.startswith("backbone."):
            assert torch.equal(v, before[k]), k
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    unchanged = [k for k in trained if torch.equal(after[k], before[k])]
    assert not unchanged, unchanged
    assert not torch.equal(after["side.patch_norm.running_mean"], before["side.patch_norm.running_mean"])


def test_eval_outputs_do_not_depend_on_batch_composition():
    model = make().eval()
    x = clips(3, seed=1)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        shuffled = model(x[[2, 0, 1]])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together[[2, 0, 1]], shuffled, atol=1e-5)


def test_trainable_state_dict_round_trip():
    a, b = make().eval(), make().eval()  # the same (random, seeded) backbone
    x = clips()
    with torch.no_grad():
        for t in (*b.side.parameters(), b.side.post_norm.running_var):
            t.add_(0.1 * torch.rand_like(t))
        assert not torch.allclose(a(x), b(x))
        b.load_trainable_state_dict(a.trainable_state_dict())
        assert torch.equal(a(x), b(x))
    bad = dict(a.trainable_state_dict())
    bad.pop("head.fc.bias")
    with pytest.raises(KeyError):
        b.load_trainable_state_dict(bad)


def test_same_seed_same_model():
    a, b = make("train.seed=3"), make("train.seed=3")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = make("train.seed=4")
    assert not torch.equal(
        a.state_dict()["backbone.blocks.0.attn.in_proj_weight"], c.state_dict()["backbone.blocks.0.attn.in_proj_weight"]
    )
    assert a.backbone.fingerprint()["weights"] == "random" and a.backbone.fingerprint()["seed"] == 3


def test_adapter_baseline_backpropagates_through_the_frozen_backbone():
    model = make("model.method=adapter", "model.adapter.dim=16").train()
    assert model.side is None
    assert not any(p.requires_grad for p in backbone_params(model))
    F.cross_entropy(model(clips()), torch.tensor([0, 4])).backward()
    # Block 0's adapter only gets a gradient through blocks 0, 1, 2 of the frozen backbone.
    grad = model.backbone.adapters[0].conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone_params(model))
    assert "backbone.adapters.0.conv.weight" in model.trainable_state_dict()
    assert not any(k.startswith("backbone.blocks") for k in model.trainable_state_dict())


def test_full_baseline_trains_the_backbone_in_fp32():
    model = make("model.method=full", "model.backbone.precision=fp16").train()
    assert {p.dtype for p in backbone_params(model)} == {torch.float32}
    assert model.backbone.training
    F.cross_entropy(model(clips()), torch.tensor([0, 4])).backward()
    for p in model.backbone.blocks[0].parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert "backbone.blocks.0.mlp.c_fc.weight" in model.trainable_state_dict()


def test_linear_probe_is_the_mean_final_class_token():
    model = make("model.method=linear_probe").eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.fc.weight", "head.fc.bias"]
    x = clips()
    with torch.no_grad():
        feats = model.features(x)
        bb = model.backbone
        tokens, _ = bb.stem(x.flatten(0, 1))
        for block in bb.blocks:
            tokens = block(tokens)
        expected = bb.final_norm(tokens)[:, 0].view(2, 4, -1).mean(1)
    assert feats.shape == (2, 128) and torch.allclose(feats, expected, atol=1e-6)


def test_side_layers_select_taps_and_stop_the_backbone_early():
    model = make("model.side.layers=[0,1]")
    assert model.backbone.taps == [0, 1] and len(model.side.blocks) == 2
    ran = []
    model.backbone.blocks[2].register_forward_hook(lambda *a: ran.append(1))
    model.eval()(clips())
    assert not ran  # nothing after the last tap is computed
    assert make("model.side.layers=every_other").backbone.taps == [1]
    with pytest.raises(UserError, match="model.side.layers"):
        make("model.side.layers=[0,3]")


def test_activation_checkpointing_gives_the_same_gradients():
    plain = make("model.side.checkpointing=false").train()
    ckpt = make("model.side.checkpointing=true").train()
    x, y = clips(), torch.tensor([1, 2])
    grads = []
    for model in (plain, ckpt):
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.side.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    # the recomputation in backward leaves BatchNorm's running statistics alone: moved once per step
    stats = [
        {k: v for k, v in m.side.state_dict().items() if "running" in k or "num_batches" in k} for m in (plain, ckpt)
    ]
    assert stats[0].keys() == stats[1].keys() and stats[0]
    for k in stats[0]:
        assert torch.allclose(stats[0][k].float(), stats[1][k].float(), atol=1e-6), k
    assert all(v.item() == 1 for k, v in stats[1].items() if "num_batches" in k)


def test_eva_variant_on_a_small_eva02_e14_shaped_backbone():
    model = make(
        "model.backbone.name=EVA02-E-14",
        "model.backbone.width=64",
        "model.backbone.layers=4",
        "model.backbone.heads=2",
        "model.backbone.patch_size=16",
        "model.backbone.precision=bf16",
        "model.side.dim=64",
    ).train()
    assert type(model.backbone.blocks[0]).__name__ == "EvaBlockPostNorm"
    assert model.backbone.taps == [1, 3] and model.side.variant == "eva" and model.side.post_norm is None
    assert model.side.taps[0].norm.normalized_shape == (64,)  # LayerNorm after the linear
    out = model(clips())
    out.sum().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is None for p in backbone_params(model))
    assert {p.dtype for p in backbone_params(model)} == {torch.bfloat16}


def test_fp32_blocks_compute_in_fp32_from_their_half_precision_weights():
    """model.backbone.fp32_blocks: the named blocks compute in fp32 (weights and inputs upcast for
    the block, its output back in the compute precision), the others in fp16; weights stay fp16."""
    import copy

    eva = [
        "model.backbone.name=EVA02-E-14",
        "model.backbone.width=64",
        "model.backbone.layers=3",
        "model.backbone.heads=2",
        "model.backbone.patch_size=16",
        "model.backbone.precision=fp16",
        "model.backbone.compute_precision=fp16",
        "model.side.dim=64",
        "model.side.layers=[2]",
    ]
    seen = {}

    def record(model):
        seen.clear()
        for i, block in enumerate(model.backbone.blocks):

            def before(m, args, kwargs, i=i):
                seen[i] = {"input": args[0].dtype, "weights": next(m.parameters()).dtype}
                seen[i]["args"] = (args[0].clone(), {k: v.clone() for k, v in kwargs.items()})

            def after(m, args, out, i=i):
                seen[i]["output"] = out

            block.register_forward_pre_hook(before, with_kwargs=True)
            block.register_forward_hook(after)
        with torch.no_grad():
            model.backbone(clips().flatten(0, 1).half())

    model = make(*eva, "model.backbone.fp32_blocks=[1]")
    record(model)
    assert [(seen[i]["input"], seen[i]["weights"]) for i in range(3)] == [
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
    ]
    assert seen[1]["output"].dtype == torch.float16
    assert {p.dtype for p in backbone_params(model)} == {torch.float16}  # upcast for the block only
    x, kwargs = seen[1]["args"]
    exact = copy.deepcopy(model.backbone.blocks[1]).float()
    for handle in list(exact._forward_pre_hooks) + list(exact._forward_hooks):
        exact._forward_pre_hooks.pop(handle, None)
        exact._forward_hooks.pop(handle, None)
    with torch.no_grad():
        assert torch.equal(seen[1]["output"], exact(x, **kwargs).half())

    record(make(*eva))  # without it: every block in fp16
    assert {(s["input"], s["weights"]) for s in seen.values()} == {(torch.float16, torch.float16)}
    with pytest.raises(UserError, match="model.backbone.fp32_blocks"):
        make(*eva, "model.backbone.fp32_blocks=[3]")


def test_eva02_e14_side_model_on_meta():
    cfg = load_config(REPO / "configs" / "experiments" / "ssv2_eva02e14.yaml")
    model = build_model_on_meta(cfg)
    bb, side = model.backbone, model.side
    assert all(p.is_meta for p in model.parameters())
    assert len(bb.blocks) == 64 and bb.width == 1792 and bb.spec.patch_size == 14
    assert bb.taps == list(range(1, 64, 2))
    assert side.variant == "eva" and len(side.blocks) == 32 and side.dim == 576 and side.post_norm is None
    assert side.blocks[0].attn.heads == 9
    assert side.taps[0].linear.in_features == 1792 and side.taps[0].linear.out_features == 576
    assert side.pos_embed.weight.shape == (256, 576)
    counts = model.parameter_counts()
    assert abs(counts["backbone_params"] - 4.35e9) < 5e6
    assert abs(counts["side_params"] - 183e6) < 1e6


def test_temporal_depthwise_conv_is_conv3d():
    ours = TemporalDepthwiseConv(6, 3)
    conv = nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0), groups=6)
    with torch.no_grad():
        conv.weight.copy_(ours.weight.view(6, 1, 3, 1, 1))
        conv.bias.copy_(ours.bias)
    x = torch.randn(2, 5, 4, 6)  # (B, T, N, C)
    expected = conv(x.permute(0, 3, 1, 2).unsqueeze(-1)).squeeze(-1).permute(0, 2, 3, 1)
    assert torch.allclose(ours(x), expected, atol=1e-6)


def test_class_token_shift():
    cls = torch.arange(1, 13, dtype=torch.float32).view(1, 3, 4)  # frames 1..3, 4 channels
    out = shift_class_token(cls)
    # channels 0-1 come from the next frame, 2-3 from the previous; zeros at the ends
    assert out.tolist() == [[[5, 6, 0, 0], [9, 10, 3, 4], [0, 0, 7, 8]]]


def test_side_network_shapes_and_retrieval_pooling():
    side = SideNetwork(in_dim=32, dim=64, num_blocks=2, patch_size=16, num_patches=4, retrieval=True)
    taps = [torch.randn(6, 5, 32, dtype=torch.float16) for _ in range(2)]
    video = torch.randn(2, 3, 3, 32, 32)
    assert side.pos_embed.weight.shape == (5, 64)
    assert side(video, taps).shape == (2, 3, 64)
    with pytest.raises(ValueError):
        side(video, taps[:1])


def test_side_network_saves_no_fp32_copy_of_the_taps():
    model = make("model.backbone.precision=fp16", "model.side.dim=64").train()  # d != D: shapes tell apart
    x = clips()
    with torch.no_grad():
        taps = model.backbone(x.flatten(0, 1))

    def saved_fp32_taps():
        seen = []

        def pack(t):
            seen.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.side(x, taps).sum().backward()
        return [s for s in seen if s == (tuple(taps[0].shape), torch.float32)]

    assert saved_fp32_taps() == []  # projections are recomputed from the fp16 taps in backward
    model.side.recompute_taps = False
    assert len(saved_fp32_taps()) == 3  # otherwise each LayerNorm keeps an fp32 copy of its tap


def _kept_after_forward(side, video, taps):
    """Bytes alive after the forward (what autograd keeps for the backward) and the gradients."""
    from side4video.engine.activations import LiveBytes

    with LiveBytes() as live:
        out = side(video, taps)
        kept = live.current
    out.float().pow(2).sum().backward()
    grads = [p.grad.clone() for p in side.parameters()]
    return out.detach(), kept, grads


@pytest.mark.parametrize("variant", ["clip", "eva"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_network_rebuilds_norm_depthwise_and_mlp_hidden_outputs_in_backward(variant, dtype):
    results = []
    for lean in (True, False):
        torch.manual_seed(0)
        side = SideNetwork(64, 64, 2, 16, 4, variant=variant).train().to(dtype)
        for block in side.blocks:  # lean=False: autograd keeps everything (the plain modules)
            block.set_lean(lean)
        g = torch.Generator().manual_seed(1)
        video = torch.randn(2, 3, 3, 32, 32, generator=g).to(dtype)
        taps = [torch.randn(6, 5, 64, generator=g).half() for _ in range(2)]
        results.append((*_kept_after_forward(side, video, taps), [b.clone() for b in side.buffers()]))
    (out, kept, grads, buffers), (out_all, kept_all, grads_all, buffers_all) = results
    assert torch.equal(out, out_all)  # the forward is unchanged bit for bit ...
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_all))  # ... and so are the gradients
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_all))  # BN statistics updated once
    assert kept < (0.5 if variant == "clip" else 0.7) * kept_all
