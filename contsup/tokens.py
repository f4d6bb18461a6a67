"""Local heads and context encoders for token sequences [B, N, D] (a vision transformer).

The paper defines its heads and encoders on feature maps [B, C, H, W] (`model.AuxHead`,
`ImageEncoder`, `ResidualEncoder`, `Decoder`). A transformer cut between two of its blocks
passes N tokens of width D instead; these are the same roles, on tokens:

- `TokenHead`: LayerNorm, the mean over the tokens, then the head config's fc layers
  (FEATURE_DIM wide, as `AuxHead`'s); the config's conv count has no meaning on tokens.
- `PatchEncoder`: a map [B, C, S, S] (the image, or an earlier feature map) to the g*g patch
  tokens of width D by a patch convolution (kernel = stride = S // g), then LayerNorm.
- `TokenEncoder`: earlier tokens [B, N, D'] to [B, N, D] by a linear map, token by token.
- `TokenDecoder`: the patch tokens laid back on their g x g grid, then the paper's `Decoder`.

The class token (`TokenLayout.class_token`: N = g*g + 1, the class token first, as
torchvision's ViT puts it): a patch encoder gives it zero context (it has no patch of its
own); a token encoder maps it as any other token (it has an earlier state of its own); a
decoder leaves it out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError


@dataclass(frozen=True)
class TokenLayout:
    """N tokens of width D: a g x g grid of patch tokens, after one class token or none."""
    tokens: int
    dim: int
    grid: int
    class_token: bool

    @classmethod
    def of(cls, shape) -> "TokenLayout":
        """The layout of a [N, D] activation (batch left out); refuses an N that is neither
        g*g nor g*g + 1."""
        n, d = shape
        for extra in (0, 1):
            g = math.isqrt(n - extra) if n > extra else 0
            if g and g * g == n - extra:
                return cls(n, d, g, bool(extra))
        raise UsageError(f"{n} tokens are neither a square grid of patches nor one plus it (a class token); "
                         "no context encoder rule for them: cut elsewhere")


class TokenHead(nn.Module):
    """LayerNorm, mean over the tokens, (n_fc - 1) x [fc(hidden), ReLU], fc(out_dim)."""

    def __init__(self, dim: int, n_fc: int, out_dim: int, hidden: int):
        super().__init__()
        layers, c = [], dim
        for _ in range(n_fc - 1):
            layers += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
            c = hidden
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(*layers, nn.Linear(c, out_dim))

    def forward(self, h):                       # [B, N, D]
        return self.mlp(self.norm(h).mean(1))   # [B, out_dim]


class PatchEncoder(nn.Module):
    """[B, C, S, S] -> [B, N, D]: patch conv (C->D, kernel = stride = S // g), pooled to the
    g x g grid where S is no multiple of g, LayerNorm; a zero class token first if the
    target has one."""

    def __init__(self, c_in: int, side_in: int, layout: TokenLayout):
        super().__init__()
        patch = max(side_in // layout.grid, 1)
        self.conv = nn.Conv2d(c_in, layout.dim, patch, stride=patch)
        self.grid, self.class_token = layout.grid, layout.class_token
        self.norm = nn.LayerNorm(layout.dim)

    def forward(self, x):
        z = self.conv(x)                                              # [B, D, S/p, S/p]
        if z.shape[-1] != self.grid:
            z = F.adaptive_avg_pool2d(z, self.grid)
        tokens = self.norm(z.flatten(2).transpose(1, 2))              # [B, g*g, D]
        return F.pad(tokens, (0, 0, 1, 0)) if self.class_token else tokens   # class token: no context


class TokenEncoder(nn.Module):
    """[B, N, D'] -> [B, N, D]: LayerNorm, then a linear map, token by token."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))

    def forward(self, h):
        return self.net(h)


class TokenDecoder(nn.Module):
    """The patch tokens [B, g*g, D] as a map [B, D, g, g], then `decoder` (model.Decoder)."""

    def __init__(self, layout: TokenLayout, decoder: nn.Module):
        super().__init__()
        self.grid, self.class_token, self.decoder = layout.grid, layout.class_token, decoder

    def forward(self, h):
        patches = h[:, 1:] if self.class_token else h
        grid = patches.transpose(1, 2).reshape(h.shape[0], h.shape[2], self.grid, self.grid)
        return self.decoder(grid)
