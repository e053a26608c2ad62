"""The ZO engine on networks written without zosol in mind: custom forward, BatchNorm (train and eval),
skip connections, cat, GroupNorm/LayerNorm, Linear heads, and an untraceable model (vmap fallback).

Every case: float64 central CGE on a random subset of coordinates (every parameter tensor has some)
within 1e-6 relative of autograd, masked coordinates exactly zero, the model's parameters, buffers
and training mode unchanged.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from zo_nets import CatNormNet, ResNet20, SolCorrector, Untraceable

from zosol.zo import cge_structured, random_masks


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, m.training) for n, m in model.named_modules()],
    )


def _assert_unchanged(model, snap):
    state, modes = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert [(n, m.training) for n, m in model.named_modules()] == modes


def _masks(model, per_tensor=6, seed=0):
    params = dict(model.named_parameters())
    lprs = {k: 1.0 - min(per_tensor, p.numel()) / p.numel() for k, p in params.items()}
    return random_masks(params, lprs, torch.Generator().manual_seed(seed))


def _resnet(train: bool):
    model = ResNet20(width=4, classes=5, seed=1).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(3):
            model(torch.randn(6, 3, 8, 8, dtype=torch.float64) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    model.train(train)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=g)
    return model, x, y, "ce"


def _case(name):
    g = torch.Generator().manual_seed(3)
    if name.startswith("resnet20"):
        return _resnet(train=name.endswith("train"))
    if name == "sol":
        x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
        return SolCorrector(width=6, blocks=2, kernel=3, seed=1).double(), x, 0.1 * x.flip(-1), "mse"
    if name == "catnorm":
        x = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
        return CatNormNet(seed=1).double(), x, torch.randn(3, 3, generator=g, dtype=torch.float64), "mse"
    model = Untraceable(seed=1).double()
    return (
        model,
        torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 2, (4,), generator=g),
        "ce",
    )


def _losses(kind, y):
    def single(out):
        return F.cross_entropy(out, y) if kind == "ce" else ((out - y) ** 2).mean()

    def lof(forward, x, P):
        out = forward(x)
        B = x.shape[0]
        if kind == "ce":
            return F.cross_entropy(out, y.repeat(P), reduction="none").reshape(P, B).mean(1)
        return ((out.reshape((P,) + y.shape) - y) ** 2).reshape(P, -1).mean(1)

    return single, lof


def _autograd(model, x, single):
    m = copy.deepcopy(model)  # train-mode BatchNorm updates running statistics in an ordinary forward
    loss = single(m(x))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])


CASES = ["resnet20-train", "resnet20-eval", "sol", "catnorm"]


@pytest.mark.parametrize("name", CASES)
def test_structured_central_cge_matches_autograd(name):
    model, x, y, kind = _case(name)
    single, lof = _losses(kind, y)
    masks = _masks(model)
    snap = _snapshot(model)
    # mu = 1e-6: float64 round-off ~1e-10; a larger mu lets some ReLU kinks fall inside [-mu, mu]
    est = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-6, scheme="central", masks=masks, chunk_size=13)
    _assert_unchanged(model, snap)
    assert est.info["engine"] == "structured", est.info
    sel = torch.cat([m.reshape(-1) for m in masks.values()])
    g, ref = est.flat(), _autograd(model, x, single)
    assert bool((g[~sel] == 0).all())
    rel = float((g[sel] - ref[sel]).norm() / ref[sel].norm())
    assert rel < 1e-6, rel


@pytest.mark.parametrize("name", ["resnet20-train", "catnorm"])
def test_structured_equals_vmap_engine_and_leaves_state(name):
    """Forward scheme (its unperturbed query included), default chunking, both engines."""
    model, x, y, kind = _case(name)
    _, lof = _losses(kind, y)
    masks = _masks(model, per_tensor=3, seed=1)
    snap = _snapshot(model)
    a = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-5, masks=masks)
    b = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-5, masks=masks, engine="vmap")
    _assert_unchanged(model, snap)
    assert a.info["engine"] == "structured" and b.info["engine"] == "vmap"
    assert a.info["chunk_size"] >= 1 and a.loss == pytest.approx(b.loss, abs=1e-12)
    assert torch.allclose(a.flat(), b.flat(), rtol=0, atol=1e-8)


def test_untraceable_model_falls_back_to_vmap_with_train_batchnorm():
    model, x, y, kind = _case("untraceable")
    single, lof = _losses(kind, y)
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="vmap engine because torch.fx cannot trace"):
        est = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-6, scheme="central", chunk_size=7)
    _assert_unchanged(model, snap)
    assert est.info["engine"] == "vmap" and "torch.fx" in est.info["engine_reason"]
    ref = _autograd(model, x, single)
    assert float((est.flat() - ref).norm() / ref.norm()) < 1e-6


def test_per_perturbation_rows_use_their_own_batch_statistics():
    """Input (P*B, ...) with different rows per perturbation: train-mode BatchNorm normalises each block of B."""
    model, x, y, kind = _case("resnet20-train")
    single, _ = _losses(kind, y)
    masks = _masks(model, per_tensor=2, seed=4)

    def lof(forward, P):
        xs = torch.cat([x * (1 + 0.1 * p) for p in range(P)])  # block p: its own input
        out = forward(xs, per_perturbation=True)
        return F.cross_entropy(out, y.repeat(P), reduction="none").reshape(P, -1).mean(1)

    est = cge_structured(model, lof, mu=1e-4, scheme="central", masks=masks, chunk_size=8)
    ref = cge_structured(model, lof, mu=1e-4, scheme="central", masks=masks, chunk_size=8, engine="vmap")
    assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-9)


def test_auto_chunk_follows_the_memory_budget():
    model, x, y, kind = _case("sol")
    _, lof = _losses(kind, y)
    small = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-4, memory_budget=2**20)
    big = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-4, memory_budget=2**26)
    assert 1 <= small.info["chunk_size"] < big.info["chunk_size"]
    assert torch.allclose(small.flat(), big.flat(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="memory_budget"):
        cge_structured(model, lambda f, P: lof(f, x, P), memory_budget=0)


def test_modules_without_a_cheap_delta_are_rerun_per_perturbation():
    """ConvTranspose2d (no hand-written delta) re-runs per perturbation; max pooling, upsampling."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.MaxPool2d(2),
        torch.nn.Tanh(),
        torch.nn.ConvTranspose2d(3, 2, 2, stride=2),
        torch.nn.Upsample(scale_factor=0.5),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 2),
    ).double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    y = torch.randn(3, 2, dtype=torch.float64)
    single, lof = _losses("mse", y)
    snap = _snapshot(model)
    est = cge_structured(model, lambda f, P: lof(f, x, P), mu=1e-6, scheme="central", chunk_size=17)
    _assert_unchanged(model, snap)
    assert est.info["engine"] == "structured"
    ref = _autograd(model, x, single)
    assert float((est.flat() - ref).norm() / ref.norm()) < 1e-6
