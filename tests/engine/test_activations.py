"""Counting a step's memory on the meta device (engine/activations.py): the counter itself, on
known sequences of ops (the plan's tests compare a whole meta step with the real one)."""

import torch
import torch.nn.functional as F

from side4video.engine.activations import LiveBytes, fused_attention

MB = 100 * 100 * 4  # one (100, 100) fp32 tensor


def test_live_bytes_follows_each_storage_until_its_last_tensor_is_gone():
    w = torch.randn(100, 100, requires_grad=True)  # made before: a parameter, never counted
    x = torch.randn(100, 100)
    with LiveBytes() as live:
        y = (x @ w).relu()  # the matmul's output lives until relu is done; relu keeps its own output
        assert (live.current, live.peak) == (MB, 2 * MB)
        view, same = w.t(), w.data.mul_(1.0)  # a view and an in-place result of memory from before: nothing new
        assert live.current == MB
        del view, same
        z = y * 2
        del y  # still kept by relu for the backward
        assert live.current == 2 * MB
        z.sum().backward()  # relu's output freed; w.grad made
        assert live.current == 2 * MB and w.grad is not None
        del z
        assert live.current == MB  # w.grad
        w.grad = None
        assert live.current == 0


def test_attention_on_meta_keeps_what_the_fused_kernels_keep():
    def kept(device):
        q = torch.empty(2, 4, 10, 8, device=device, requires_grad=True)
        k = torch.empty(2, 4, 11, 8, device=device, requires_grad=True)
        v = torch.empty(2, 4, 11, 8, device=device, requires_grad=True)
        with fused_attention(), LiveBytes() as live:
            out = F.scaled_dot_product_attention(q, k, v)
            return live.current, tuple(out.shape)

    # the output and the log-sum-exp, as the CPU (and GPU flash) kernel; not the 10 x 11 attention matrix
    assert kept("meta") == kept("cpu") == ((2 * 4 * 10 * 8 + 2 * 4 * 10) * 4, (2, 4, 10, 8))
