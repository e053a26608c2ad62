"""Reference networks of the engine benches and experiments (``zosol bench engine``, experiments/).

Small, seeded stand-ins for a user's network; the test suite's own networks live in ``tests/``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reuse import Residual

__all__ = ["cnn1d_corrector", "cnn2d", "ResNet20", "SolCorrector"]


def cnn1d_corrector(
    in_ch: int = 2,
    hidden: tuple = (32, 32, 24),
    out_ch: int = 1,
    kernel: int = 5,
    act: type = nn.GELU,
    padding_mode: str = "circular",
    seed: int = 0,
) -> nn.Sequential:
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
            nn.Conv2d(in_ch, ch, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1, padding_mode="circular"),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * ch * (hw // 2) ** 2, n_out),
        )


class _Block(nn.Module):
    """CIFAR ResNet basic block: conv-BN-ReLU-conv-BN + shortcut, ReLU; the shortcut subsamples and
    zero-pads channels when the shape changes (He et al. 2016, option A)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)
            )
        return torch.relu(out + short)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR-sized inputs: (B, 3, 32, 32) -> (B, classes) logits.

    Stem conv + BN, three stages of three basic blocks (``width``, 2x, 4x channels; stride 2 at each
    new stage), global average pooling, linear head.  ``width=16`` gives 269,722 parameters (as
    DeepZero's ``resnet20``).
    """

    def __init__(self, width: int = 16, classes: int = 10, in_ch: int = 3, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            blocks, cin = [], width
            for stage in range(3):
                cout = width * 2**stage
                for i in range(3):
                    blocks.append(_Block(cin, cout, 2 if (stage and i == 0) else 1))
                    cin = cout
            self.blocks = nn.ModuleList(blocks)
            self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        for b in self.blocks:
            x = b(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


class SolCorrector(nn.Module):
    """The Solver-in-the-Loop corrector written with its own ``forward`` (2-D, circular padding).

    Same layers as ``zosol.models.sol_resnet``: stem conv + GELU, ``blocks`` residual blocks
    ``x + conv(GELU(conv(x)))`` each followed by GELU, output conv.  The defaults (2 -> 2 channels,
    ``width=32``, ``blocks=2``, 5x5 kernels) give 105,762 parameters.  :meth:`sequential` returns the same network
    (same parameter tensors) as ``nn.Sequential`` + ``Residual``.
    """

    def __init__(
        self, in_ch: int = 2, out_ch: int = 2, width: int = 32, blocks: int = 2, kernel: int = 5, seed: int = 0
    ):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            conv = lambda a, b: nn.Conv2d(a, b, kernel, padding=kernel // 2, padding_mode="circular")  # noqa: E731
            self.stem = conv(in_ch, width)
            self.convs = nn.ModuleList([conv(width, width) for _ in range(2 * blocks)])
            self.out = conv(width, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.stem(x))
        for i in range(0, len(self.convs), 2):
            x = F.gelu(x + self.convs[i + 1](F.gelu(self.convs[i](x))))
        return self.out(x)

    def sequential(self) -> nn.Sequential:
        """The same network as ``nn.Sequential`` of convolutions, GELUs and ``Residual`` blocks."""
        layers: list[nn.Module] = [self.stem, nn.GELU()]
        for i in range(0, len(self.convs), 2):
            layers += [Residual(self.convs[i], nn.GELU(), self.convs[i + 1]), nn.GELU()]
        return nn.Sequential(*layers, self.out)
