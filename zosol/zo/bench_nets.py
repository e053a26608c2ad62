"""Reference networks of the engine benches and experiments (``zosol bench engine``, experiments/).

Small, seeded stand-ins for a user's network; the test suite's own networks live in ``tests/``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["cnn1d_corrector", "cnn2d"]


def cnn1d_corrector(in_ch: int = 2, hidden: tuple = (32, 32, 24), out_ch: int = 1, kernel: int = 5,
                    act: type = nn.GELU, padding_mode: str = "circular", seed: int = 0) -> nn.Sequential:
    """1-D CNN corrector on a periodic grid: (B, in_ch, N) -> (B, out_ch, N).

    Defaults give 9,489 parameters (4 conv layers); ``hidden=(8, 8, 8)`` gives ~1k.
    """
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        chans = (in_ch,) + tuple(hidden) + (out_ch,)
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            layers.append(nn.Conv1d(chans[i], chans[i + 1], kernel, padding=kernel // 2, padding_mode=padding_mode))
            if i < len(chans) - 2:
                layers.append(act())
        return nn.Sequential(*layers)


def cnn2d(in_ch: int = 1, hw: int = 8, ch: int = 4, n_out: int = 10, seed: int = 0) -> nn.Sequential:
    """Small 2-D CNN classifier: (B, in_ch, hw, hw) -> (B, n_out) (hw divisible by 2)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(in_ch, ch, 3, padding=1), nn.ReLU(),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1, padding_mode="circular"), nn.GELU(),
            nn.Flatten(), nn.Linear(2 * ch * (hw // 2) ** 2, n_out),
        )
