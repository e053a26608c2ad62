"""Comparing gradients: cosines in float64 within [-1, 1] wherever they are printed or stored
(issue 22 item 5), and the public window-batch gradient comparison (item 4)."""

from __future__ import annotations

import pytest
import torch

from zosol.zo.checks import cosine, relative_error


def test_cosine_is_float64_and_clamped():
    a = torch.randn(457, generator=torch.Generator().manual_seed(0))
    assert float(torch.nn.functional.cosine_similarity(a, a, dim=0)) > 1.0  # float32: 1.0000001192092896
    assert cosine(a, a) == 1.0 and cosine(a, -a) == -1.0
    assert cosine(a, 3 * a.double()) == 1.0
    b = torch.randn(457, generator=torch.Generator().manual_seed(1))
    exact = float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))
    assert cosine(a, b) == pytest.approx(exact, abs=1e-15)
    assert cosine(a, torch.zeros(457)) == 0.0
    assert cosine(a.reshape(457, 1), b) == cosine(a, b)
    with pytest.raises(ValueError, match="457 and 3 entries"):
        cosine(a, torch.ones(3))


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.tensor([3.0, 5.0]), ref) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == float("inf")


@pytest.fixture(scope="module")
def tiny_ds(tiny_h5):
    from zosol.datasets import load_dataset

    return load_dataset(tiny_h5)


def test_window_gradients_against_the_twin_and_finite_differences(tiny_ds):
    """ZO-SOL's gradient of one window batch next to autograd through the twin, and the float64
    finite-difference reference of every coordinate agreeing with autograd."""
    import zosol

    twin = zosol.window_gradients(tiny_ds, "zo-sol", batch_size=4)
    d = sum(p.numel() for p in twin.model.parameters())
    assert twin.reference_kind == "twin" and twin.gradient.shape == twin.reference.shape == (d,)
    assert twin.reference.dtype == torch.float64 and twin.batch.size == 4
    assert twin.cosine > 0.9999 and twin.relative_error < 1e-3 and twin.loss > 0
    assert twin.cosine == cosine(twin.gradient, twin.reference)
    per_name = twin.unflatten(twin.gradient)
    assert [(n, tuple(t.shape)) for n, t in per_name.items()] == twin.names
    assert torch.equal(torch.cat([t.reshape(-1) for t in per_name.values()]), twin.gradient)
    fd = zosol.window_gradients(tiny_ds, "zo-sol", reference="fd", batch_size=4)
    assert fd.reference_kind == "fd" and torch.equal(fd.gradient, twin.gradient)
    assert relative_error(fd.reference, twin.reference) < 1e-5  # float64 differences vs autograd
    fo = zosol.window_gradients(tiny_ds, "fo-sol", batch_size=4)
    assert fo.cosine == 1.0 and fo.relative_error == 0.0  # autograd through the twin is the reference
    with pytest.raises(ValueError, match="reference must be"):
        zosol.window_gradients(tiny_ds, reference="adjoint")


def test_window_gradients_of_a_trained_run_through_a_black_box(tiny_ds, tiny_h5, tmp_path):
    """A run's corrector (run=...), the scenario's solver as a black box without a twin: the
    reference is float64 finite differences; asking for a twin names the fix."""
    import zosol
    from zosol.cli import main
    from zosol.training import load_run

    run = tmp_path / "non"
    argv = ["train", "--scenario", "burgers1d", "--preset", "tiny", "--method", "non", "--data", str(tiny_h5)]
    assert main([*argv, "--out", str(run), "--epochs", "1"]) == 0
    box = tiny_ds.scenario.coarse_solver().blackbox()
    res = zosol.window_gradients(tiny_ds, "zo-sol", run=run, solver=box, twin=box, batch_size=2)
    trained, _ = load_run(run, tiny_ds)
    for a, b in zip(res.model.parameters(), trained.parameters()):
        assert torch.equal(a, b)
    assert res.reference_kind == "fd" and res.cosine > 0.999 and res.relative_error < 1e-2
    with pytest.raises(ValueError, match="needs a differentiable twin"):
        zosol.window_gradients(tiny_ds, reference="twin", solver=box, twin=box)


def test_stored_gradient_cosines_are_clamped(tiny_ds):
    """check_gradient's cosines (and the loop's, which share the helper) never exceed 1."""
    import zosol

    rep = zosol.check_gradient(tiny_ds, batch_size=4, directions=3)
    values = [rep["twin"]["cosine"]] + [
        c for m in rep["methods"].values() for c in (m["cosine_vs_fd"], m["cosine_vs_twin"])
    ]
    assert all(isinstance(c, float) and -1.0 <= c <= 1.0 for c in values), values
