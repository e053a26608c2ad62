"""``zosol evaluate RUN --data OTHER.h5``: a run evaluated on another dataset of its scenario, channels
and grid (another preset, more test simulations), saying what differs (issue 22 item 6)."""

from __future__ import annotations

import json

import pytest

from zosol.cli import main
from zosol.datasets import generate, load_dataset
from zosol.training import CheckpointError, load_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_h5):
    run = tmp_path_factory.mktemp("runs") / "non"
    argv = ["train", "--scenario", "burgers1d", "--preset", "tiny", "--method", "non", "--data", str(tiny_h5)]
    assert main([*argv, "--out", str(run), "--epochs", "1"]) == 0
    return run


def test_evaluate_on_more_test_simulations_says_what_differs(tmp_path, tiny_run, tiny_h5, capsys):
    other = generate("burgers1d", "tiny", tmp_path, progress=False, overrides={"frames": 6, "test_sims": 3})
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), "--data", str(other)]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["dataset"] == str(other) and len(result["mae_per_sim"]) == 3
    assert result["dataset_differences"] == ["preset: tiny vs custom", "frames: 12 vs 6", "test_sims: 2 vs 3"]
    assert err == (
        f"note: {tiny_run} was trained on another burgers1d dataset (differs in preset: tiny vs custom; "
        f"frames: 12 vs 6; test_sims: 2 vs 3); evaluating on {other}\n"
    )
    # its own dataset: nothing differs, nothing noted
    assert main(["evaluate", str(tiny_run), "--data", str(tiny_h5)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["dataset_differences"] == [] and err == ""


def test_load_run_other_data_in_python(tmp_path, tiny_run, tiny_h5):
    other = load_dataset(generate("burgers1d", "tiny", tmp_path, progress=False, overrides={"test_sims": 3}))
    with pytest.raises(CheckpointError, match=r"tiny vs custom; test_sims: 2 vs 3\); pass other_data=True"):
        load_run(tiny_run, other)
    model, ckpt = load_run(tiny_run, other, other_data=True)
    assert ckpt["dataset_differences"] == ["preset: tiny vs custom", "test_sims: 2 vs 3"]
    _, same = load_run(tiny_run, load_dataset(tiny_h5))
    assert same["dataset_differences"] == []


def test_a_checkpoint_without_the_layout_still_resumes_and_loads(tmp_path, tiny_run, tiny_h5):
    """Checkpoints written before the fingerprint held the state layout compare without it."""
    import shutil

    import torch

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["dataset"]["layout"]
    torch.save(ckpt, run / "checkpoint.pt")
    _, loaded = load_run(run, load_dataset(tiny_h5))
    assert loaded["dataset_differences"] == []
