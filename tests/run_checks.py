"""Assertions shared by the training tests."""

from __future__ import annotations

import torch


def assert_same_run(a, b, *history_keys: str) -> None:
    """Two ``TrainResult``s are the same run: bit-identical weights, identical per-step losses and
    identical ``history[k]`` for every ``k`` in ``history_keys``."""
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert a.history["loss"] == b.history["loss"]
    for k in history_keys:
        assert a.history[k] == b.history[k], k
