"""The training loop's callbacks: the hooks are called in order, a callback can stop the run
(checkpointed), and the default list follows the run controls."""

from __future__ import annotations

import pytest

from zosol.config import train_config
from zosol.datasets import load_dataset
from zosol.runtime.options import RunOptions
from zosol.runtime.rundir import RunDirectory
from zosol.training import TrainingLoop
from zosol.training.callbacks import Callback, ProgressBar, StopAfterSteps, StopSignal, TimedCheckpoint
from zosol.training.gradcheck import GradientCheck


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.events: list[str] = []
        self.stop_at, self.grads_present = stop_at, []

    def on_train_start(self, loop):
        self.events.append("start")

    def on_gradient(self, loop, batch):
        self.events.append("gradient")
        self.grads_present.append(all(p.grad is not None for p in loop.state.model.parameters()))

    def on_step_end(self, loop, loss):
        self.events.append("step")
        if self.stop_at is not None and self.events.count("step") == self.stop_at:
            loop.request_stop({"stopped_by": "recorder"})

    def on_epoch_end(self, loop):
        self.events.append("epoch")

    def on_train_end(self, loop):
        self.events.append("end")


@pytest.fixture(scope="module")
def tiny(tiny_h5):
    return load_dataset(tiny_h5)


def _loop(ds, run_dir=None, options=None, **overrides):
    cfg = train_config("tiny", method="fo-sol", **{"epochs": 2, **overrides})
    return TrainingLoop.setup(ds, cfg, run_dir, options or RunOptions(progress=False))


def test_hooks_are_called_in_order(tiny):
    loop = _loop(tiny)
    rec = Recorder()
    result = loop.run(callbacks=[rec])
    n = loop.steps_per_epoch
    per_epoch = ["gradient", "step"] * n + ["epoch"]
    assert rec.events == ["start", *per_epoch, *per_epoch, "end"]
    assert all(rec.grads_present)  # on_gradient sees the source's gradient before the optimizer step
    assert len(result.history["loss"]) == 2 * n and not result.extra


def test_a_callback_stops_the_run_with_a_checkpoint(tiny, tmp_path):
    with RunDirectory(tmp_path / "run") as run_dir:
        loop = _loop(tiny, run_dir)
        rec = Recorder(stop_at=3)
        result = loop.run(callbacks=[rec])
    assert result.extra == {"stopped_by": "recorder"}
    assert len(result.history["loss"]) == 3 and rec.events[-1] == "end"
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_default_callbacks_follow_the_run_controls(tiny):
    loop = _loop(tiny, options=RunOptions(progress=False, stop_after_steps=2, checkpoint_seconds=5.0))
    kinds = [type(c) for c in loop.callbacks()]
    assert kinds == [GradientCheck, StopAfterSteps, StopSignal, TimedCheckpoint]
    assert loop.run().extra == {"stopped_early": True}
    loop = _loop(tiny, options=RunOptions(progress=True))
    assert [type(c) for c in loop.callbacks()] == [GradientCheck, ProgressBar, StopSignal, TimedCheckpoint]
