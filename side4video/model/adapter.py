"""The ST-Adapter baseline's adapter (Pan et al. 2022): bottleneck + depthwise temporal conv.

Placed before each frozen block (so before its attention): x + up(dwconv_t(down(x))) on the patch
tokens; the class token passes unchanged. The conv starts at zero, so the adapted backbone starts
as the frozen one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from side4video.model.side import TemporalDepthwiseConv


class STAdapter(nn.Module):
    def __init__(self, width: int, dim: int = 64, kernel: int = 3):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.conv = TemporalDepthwiseConv(dim, kernel)
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x (B*T, 1 + N, D) in the backbone's dtype -> same shape and dtype."""
        if not num_frames:
            raise ValueError("ST-Adapter needs the number of frames per video")
        BT, L, D = x.shape
        patches = x[:, 1:].to(self.down.weight.dtype)
        h = self.down(patches).view(BT // num_frames, num_frames, L - 1, -1)
        h = self.up(self.conv(h).view(BT, L - 1, -1))
        return torch.cat([x[:, :1], x[:, 1:] + h.to(x.dtype)], dim=1)
