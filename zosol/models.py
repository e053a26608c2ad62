"""Corrector networks ``C_theta``: map a coarse state (plus per-simulation feature channels) to an
additive correction of the same shape.

    input  : (B, C + F, *spatial)   state channels C, scenario feature channels F (forcing, Re)
    output : (B, C, *spatial)       correction added to the coarse solver's output

Both networks start as "no correction" (last layer initialised to zero: a randomly initialised
corrector makes the first rollouts worse than no corrector at all). They are plain ``nn.Sequential``
stacks of convolutions, activations and :class:`~zosol.zo.reuse.Residual` blocks, the layered form
that the ZO engine's structured (feature-reusing) evaluation understands.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MODEL_KINDS
from .errors import UsageError
from .zo.plan import n_params
from .zo.reuse import Residual

__all__ = ["small_cnn", "sol_resnet", "build_corrector", "CORRECTORS", "corrector_input", "n_params"]


def _conv(dim: int, cin: int, cout: int, kernel: int, padding_mode: str) -> nn.Module:
    cls = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    return cls(cin, cout, kernel, padding=kernel // 2, padding_mode=padding_mode)


def _zero_last(model: nn.Sequential) -> nn.Sequential:
    last = model[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return model


def small_cnn(
    dim: int,
    in_channels: int,
    out_channels: int,
    width: int = 16,
    depth: int = 3,
    kernel: int = 5,
    padding_mode: str = "circular",
) -> nn.Sequential:
    """``depth`` convolutions (GELU between them), ``width`` hidden channels, zero last layer."""
    if depth < 1 or width < 1 or kernel < 1 or kernel % 2 == 0:
        raise UsageError(
            f"small_cnn: need depth >= 1, width >= 1 and an odd kernel, got "
            f"depth={depth}, width={width}, kernel={kernel}"
        )
    layers: list[nn.Module] = []
    cin = in_channels
    for _ in range(depth - 1):
        layers += [_conv(dim, cin, width, kernel, padding_mode), nn.GELU()]
        cin = width
    layers.append(_conv(dim, cin, out_channels, kernel, padding_mode))
    return _zero_last(nn.Sequential(*layers))


def sol_resnet(
    dim: int,
    in_channels: int,
    out_channels: int,
    width: int = 32,
    blocks: int = 5,
    kernel: int = 5,
    padding_mode: str = "circular",
) -> nn.Sequential:
    """The Solver-in-the-Loop corrector: a stem convolution, ``blocks`` residual blocks of two
    ``kernel`` convolutions with ``width`` channels (5 / 32 / 5x5 in the paper), and an output
    convolution initialised to zero."""
    if blocks < 0 or width < 1 or kernel % 2 == 0:
        raise UsageError(
            f"sol_resnet: need blocks >= 0, width >= 1 and an odd kernel, got "
            f"blocks={blocks}, width={width}, kernel={kernel}"
        )
    layers: list[nn.Module] = [_conv(dim, in_channels, width, kernel, padding_mode), nn.GELU()]
    for _ in range(blocks):
        layers += [
            Residual(
                _conv(dim, width, width, kernel, padding_mode),
                nn.GELU(),
                _conv(dim, width, width, kernel, padding_mode),
            ),
            nn.GELU(),
        ]
    layers.append(_conv(dim, width, out_channels, kernel, padding_mode))
    return _zero_last(nn.Sequential(*layers))


#: corrector builders by ``TrainConfig.model`` kind (the kinds are declared in zosol.config)
_BUILDERS = {"cnn": small_cnn, "resnet": sol_resnet}
CORRECTORS = {kind: _BUILDERS[kind] for kind in MODEL_KINDS}


def build_corrector(
    kind: str,
    dim: int,
    in_channels: int,
    out_channels: int,
    *,
    width: int,
    depth: int,
    kernel: int,
    padding_mode: str = "circular",
) -> nn.Sequential:
    """Corrector by name: ``"cnn"`` (``depth`` conv layers) or ``"resnet"`` (``depth`` residual blocks)."""
    if kind not in CORRECTORS:
        raise UsageError(f"unknown corrector model '{kind}'; choose one of {list(CORRECTORS)}")
    return CORRECTORS[kind](dim, in_channels, out_channels, width, depth, kernel, padding_mode)


def corrector_input(state: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """Concatenate state (B, C, *s) and features (B, F, *s) along channels."""
    return state if features is None else torch.cat([state, features], 1)
