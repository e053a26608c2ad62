"""Memory a training run will need, estimated from its config before anything is allocated.

The estimate (float32, bytes) is the corrector's weights with their gradient and Adam's two
moments, plus the larger of the activations autograd keeps over an unrolled window (every
method's gradient checks too) and what the method's own gradient step needs (``Method.memory``,
e.g. the perturbed forward passes ZO-SOL folds into one batch).  It is a rough lower bound; a run whose estimate
exceeds the machine's memory (:func:`zosol.runtime.memory.machine_memory_bytes`) is refused up front
with the estimate in the message instead of swapping for minutes before failing.
"""

from __future__ import annotations

import math

import torch

from .. import methods
from ..config import TrainConfig
from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..methods import MemorySizes
from ..models import n_params
from ..runtime.memory import format_bytes, machine_memory_bytes
from .state import corrector_network, corrector_shape

__all__ = [
    "estimate_training_bytes",
    "estimate_training_seconds",
    "check_memory",
    "check_time",
    "check_corrector_fits",
    "meta_corrector",
]

#: floating-point operations per second assumed by the time estimate (optimistic for one CPU core)
FLOPS_PER_SECOND = 1e10
#: no optimizer step takes less than this (Python and dispatch overhead per window step)
STEP_FLOOR_SECONDS = 5e-4
#: operations of one coarse-solver step per cell and channel, at least (a stencil update)
SOLVER_FLOPS_PER_CELL = 10

_FLOAT = 4  # bytes per float32


def check_corrector_fits(dataset: FidelityDataset, config: TrainConfig) -> None:
    """ValueError unless the corrector's kernel fits the coarse grid (a circular padding wider than
    the grid wraps around more than once)."""
    grid = tuple(dataset.scenario.coarse_solver().spatial_shape)
    if config.kernel > min(grid):
        top = min(grid) if min(grid) % 2 else min(grid) - 1
        raise UsageError(
            f"--kernel {config.kernel} is wider than the coarse grid ({'x'.join(map(str, grid))} cells); "
            f"use an odd kernel of at most {top}"
        )


def meta_corrector(dataset: FidelityDataset, config: TrainConfig) -> torch.nn.Module:
    """The corrector ``config`` describes, built on the meta device (shapes only, no memory)."""
    shape = corrector_shape(dataset)  # outside the meta device: it may build the coarse solver
    with torch.device("meta"):
        return corrector_network(dataset, config, shape)


def estimate_training_bytes(dataset: FidelityDataset, config: TrainConfig, n_windows: int) -> tuple[int, int]:
    """``(estimated bytes, corrector parameters)`` of training ``config`` on ``dataset`` with
    ``n_windows`` training windows.  The network is built on the meta device (no memory)."""
    _, in_ch, _ = corrector_shape(dataset)
    net = meta_corrector(dataset, config)
    params = n_params(net)
    layers = sum(1 for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    cells = math.prod(dataset.scenario.coarse_solver().spatial_shape)
    batch = min(config.batch_size, n_windows)
    per_sample = cells * (in_ch + 2 * config.width * layers) * _FLOAT  # a forward's activations
    autograd = batch * config.effective_window * per_sample
    method = methods.get(config.method)
    own = method.memory(config, MemorySizes(params, batch, cells, in_ch)) if method.memory else 0
    return 4 * params * _FLOAT + max(autograd, own), params


def check_memory(dataset: FidelityDataset, config: TrainConfig, n_windows: int) -> None:
    """ValueError if the kernel does not fit the grid or the estimate exceeds 80 % of this
    machine's memory (the message gives both)."""
    check_corrector_fits(dataset, config)
    need, params = estimate_training_bytes(dataset, config, n_windows)
    have = machine_memory_bytes()
    if need > 0.8 * have:
        keys = methods.get(config.method).memory_options
        own = "".join(f", {k} {getattr(config, k)}" for k in keys)
        flags = ", ".join(["--width", "--depth", "--batch-size", *("--" + k.replace("_", "-") for k in keys)])
        raise UsageError(
            f"this training configuration needs an estimated {format_bytes(need)} of memory ({params:,} corrector "
            f"parameters: {config.model} width {config.width}, depth {config.depth}, kernel {config.kernel}; "
            f"batch {min(config.batch_size, n_windows)}, window {config.effective_window}{own}), more than this "
            f"machine's {format_bytes(have)}; lower {flags}"
        )


def estimate_training_seconds(dataset: FidelityDataset, config: TrainConfig, n_windows: int) -> float:
    """An optimistic (lower-bound) estimate of the run time of ``config``: every step runs the
    corrector forward and backward over ``batch x window`` states, ZO-SOL also one coarse-solver
    call per perturbation and state, at FLOPS_PER_SECOND; at least STEP_FLOOR_SECONDS per window step."""
    net = meta_corrector(dataset, config)
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
    solver = dataset.scenario.coarse_solver()
    cells = math.prod(solver.spatial_shape)
    batch, window = min(config.batch_size, n_windows), config.effective_window
    flops = 3 * 2 * weights * cells
    if config.method == "zo-sol":
        perturbations = (2 if config.zo_scheme == "central" else 1) * n_params(net) + 1
        flops += perturbations * SOLVER_FLOPS_PER_CELL * cells * len(solver.channels)
    steps = math.ceil(n_windows / config.batch_size) * config.epochs
    return steps * max(batch * window * flops / FLOPS_PER_SECOND, window * STEP_FLOOR_SECONDS)


def check_time(dataset: FidelityDataset, config: TrainConfig, n_windows: int, announce: bool = True) -> None:
    """Print the time estimate of a long run before it starts (``announce``); ValueError beyond
    the limit (``--max-hours``)."""
    from ..datasets.budget import check_time as check

    seconds = estimate_training_seconds(dataset, config, n_windows)
    what = (
        f"training {config.method} ({config.epochs} epochs of {math.ceil(n_windows / config.batch_size)} steps, "
        f"{config.model} width {config.width}, depth {config.depth}, kernel {config.kernel})"
    )
    check(what, seconds, "lower --epochs, --width, --depth or --kernel", announce)
