"""Test networks of the ZO engine tests (the bench networks are reused from ``zosol.zo.bench_nets``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from zosol.zo import Residual
from zosol.zo.bench_nets import cnn1d_corrector, cnn2d

__all__ = ["cnn1d_corrector", "cnn2d", "mlp", "resnet1d"]


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
            body.append(Residual(nn.Conv1d(ch, ch, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                                 nn.Conv1d(ch, ch, 1)))
        body += [nn.GELU(), nn.Conv1d(ch, out_ch, 3, padding=1, padding_mode="circular")]
        return nn.Sequential(*body)
