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
from ..models import build_corrector, n_params
from ..runtime.memory import format_bytes, machine_memory_bytes
from .state import corrector_shape

__all__ = ["estimate_training_bytes", "check_memory"]

_FLOAT = 4  # bytes per float32


def estimate_training_bytes(dataset: FidelityDataset, config: TrainConfig, n_windows: int) -> tuple[int, int]:
    """``(estimated bytes, corrector parameters)`` of training ``config`` on ``dataset`` with
    ``n_windows`` training windows.  The network is built on the meta device (no memory)."""
    dim, in_ch, out_ch = corrector_shape(dataset)
    with torch.device("meta"):
        net = build_corrector(
            config.model,
            dim,
            in_ch,
            out_ch,
            width=config.width,
            depth=config.depth,
            kernel=config.kernel,
            padding_mode=dataset.scenario.padding_mode,
        )
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
    """ValueError if the estimate exceeds 80 % of this machine's memory (the message gives both)."""
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
