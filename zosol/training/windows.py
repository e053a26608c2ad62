"""Training windows: SOL-m windows of the training simulations, sampled in a seeded order.

A window starts at reference frame ``t`` of training simulation ``i`` and holds the ``m``
reference frames after it; every ``(i, t)`` with ``t = 0 .. T - m`` is one window.
"""

from __future__ import annotations

import torch

from ..datasets.hdf5 import FidelityDataset
from ..errors import UsageError
from ..rollout import WindowBatch

__all__ = ["WindowBatch", "Windows"]


class Windows:
    """All windows of length ``m`` of ``dataset``'s training simulations, on ``device``.

    ``traj`` (N, T+1, C, *s), ``params`` (N, K), ``features`` (N, F, *s) or None, ``starts``
    (W, 2) the (simulation, frame) of every window; :meth:`batch` gathers windows by index and
    :meth:`order` draws an epoch's order from a seeded generator.
    """

    def __init__(self, dataset: FidelityDataset, m: int, device: torch.device):
        traj, params = dataset.stacked("train")
        self.traj = traj.to(device)
        self.params = params.to(device)
        self.num_params = dataset.scenario.coarse_solver().num_params
        feats = dataset.scenario.corrector_features(params)
        self.features = None if feats is None else feats.to(device)
        n, t1 = traj.shape[:2]
        if t1 - 1 < m:
            raise UsageError(f"window {m} is longer than the {t1 - 1} frames of the dataset; lower --window")
        self.starts = torch.tensor([(i, t) for i in range(n) for t in range(t1 - m)], dtype=torch.long)
        self.m = m

    def __len__(self) -> int:
        return len(self.starts)

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """A random permutation of all window indices, (W,)."""
        return torch.randperm(len(self.starts), generator=generator)

    def batch(self, idx: torch.Tensor) -> WindowBatch:
        """The windows ``idx`` (B,) as a :class:`WindowBatch`."""
        i, t = self.starts[idx, 0], self.starts[idx, 1]
        steps = t[:, None] + torch.arange(1, self.m + 1)
        start = self.traj[i, t]
        targets = self.traj[i[:, None], steps]
        params = self.params[i] if self.num_params else None
        feats = None if self.features is None else self.features[i]
        return WindowBatch(start, targets, params, feats, sim=i, frame=t)
