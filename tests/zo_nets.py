"""Test networks of the ZO engine tests (the bench networks are reused from ``zosol.zo.bench_nets``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zosol.zo import Residual
from zosol.zo.bench_nets import ResNet20, SolCorrector, cnn1d_corrector, cnn2d

__all__ = ["cnn1d_corrector", "cnn2d", "mlp", "resnet1d", "ResNet20", "SolCorrector", "CatNormNet", "Untraceable"]


def mlp(sizes: tuple = (12, 16, 16, 3), act: type = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """Flatten + MLP."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(act())
        return nn.Sequential(*layers)


def resnet1d(in_ch: int = 2, ch: int = 6, out_ch: int = 1, blocks: int = 2, seed: int = 0) -> nn.Sequential:
    """1-D residual CNN: lift, ``blocks`` x Residual(conv, act, conv), project."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        body: list[nn.Module] = [nn.Conv1d(in_ch, ch, 3, padding=1, padding_mode="circular")]
        for _ in range(blocks):
            body.append(
                Residual(nn.Conv1d(ch, ch, 3, padding=1, padding_mode="circular"), nn.Tanh(), nn.Conv1d(ch, ch, 1))
            )
        body += [nn.GELU(), nn.Conv1d(ch, out_ch, 3, padding=1, padding_mode="circular")]
        return nn.Sequential(*body)


class CatNormNet(nn.Module):
    """Two conv branches (one with GroupNorm) joined by ``torch.cat``, LayerNorm, a Linear head.

    (B, 2, 6, 6) -> (B, 3): exercises cat, GroupNorm, LayerNorm over (C, H, W), reshape, Linear.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.a = nn.Conv2d(2, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.b = nn.Conv2d(2, 2, 1)
            self.ln = nn.LayerNorm((6, 6, 6))
            self.mix = nn.Conv2d(6, 3, 3, stride=2, padding=1, padding_mode="circular")
            self.ln2 = nn.LayerNorm(27)
            self.head = nn.Linear(27, 3)
            for m in (self.gn, self.ln, self.ln2):  # non-trivial affine parameters
                nn.init.normal_(m.weight, 1.0, 0.2)
                nn.init.normal_(m.bias, 0.0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.silu(self.gn(self.a(x))), torch.tanh(self.b(x))], dim=1)
        h = self.mix(self.ln(h))
        h = h.reshape(h.shape[0], -1)
        return self.head(F.gelu(self.ln2(h)))


class Untraceable(nn.Module):
    """Shape-dependent control flow (torch.fx cannot trace it) around Conv + train-mode BatchNorm."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        if h.shape[-1] > 2:
            h = h.mean((2, 3))
        return self.fc(h)
