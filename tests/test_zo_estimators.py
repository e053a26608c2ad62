"""CGE / RGE estimators vs autograd, masks, query counts, input validation."""

import pytest
import torch
from zo_nets import cnn1d_corrector, cnn2d, mlp, resnet1d

from zosol.zo import ZOEstimate, batched_loss_from_module, cge, random_masks, rge, write_grads


def _problem(kind: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model, x = mlp((12, 10, 8, 3)), torch.randn(6, 3, 4, generator=g)
    elif kind == "cnn1d":
        model, x = cnn1d_corrector(hidden=(4, 4), kernel=3), torch.randn(5, 2, 8, generator=g)
    elif kind == "cnn2d":
        model, x = cnn2d(ch=2, hw=6, n_out=3), torch.randn(4, 1, 6, 6, generator=g)
    else:
        model, x = resnet1d(ch=3, blocks=1), torch.randn(4, 2, 8, generator=g)
    model = model.to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g).to(dtype)
    loss_fn = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    return model, x, loss_fn


def _autograd(model, x, loss_fn):
    params = dict(model.named_parameters())
    gr = torch.autograd.grad(loss_fn(model(x)), list(params.values()))
    return torch.cat([t.reshape(-1) for t in gr]).detach()


@pytest.mark.parametrize("kind", ["mlp", "cnn1d", "cnn2d", "resnet"])
def test_cge_central_float64_matches_autograd(kind):
    model, x, loss_fn = _problem(kind)
    est = cge(
        batched_loss_from_module(model, loss_fn, x),
        dict(model.named_parameters()),
        mu=1e-4,
        scheme="central",
        chunk_size=97,
    )
    ref = _autograd(model, x, loss_fn)
    assert isinstance(est, ZOEstimate)
    assert est.queries == 2 * ref.numel()
    rel = float((est.flat() - ref).norm() / ref.norm())
    assert rel < 1e-6, rel
    for k, p in model.named_parameters():  # dict-like, shapes, dtype
        assert est[k].shape == p.shape and est.grads[k].dtype == p.dtype


@pytest.mark.parametrize("kind", ["mlp", "cnn1d", "cnn2d", "resnet"])
def test_cge_forward_float32_cosine(kind):
    # forward differences in float32: mu = 1e-3 balances O(mu) truncation and O(eps/mu) round-off
    model, x, loss_fn = _problem(kind, torch.float32)
    est = cge(batched_loss_from_module(model, loss_fn, x), dict(model.named_parameters()), mu=1e-3, chunk_size=128)
    ref = _autograd(model, x, loss_fn)
    assert est.queries == ref.numel() + 1
    cos = float(torch.nn.functional.cosine_similarity(est.flat().double(), ref.double(), dim=0))
    assert cos >= 0.99, cos
    assert est.loss == pytest.approx(float(loss_fn(model(x)).detach()), rel=1e-5)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_masks_exact_zeros_and_query_counts(scheme):
    model, x, loss_fn = _problem("cnn1d")
    params = dict(model.named_parameters())
    lprs = {k: 0.75 for k in params}
    masks = random_masks(params, lprs, torch.Generator().manual_seed(3))
    n_on = sum(int(m.sum()) for m in masks.values())
    d = sum(p.numel() for p in params.values())
    est = cge(batched_loss_from_module(model, loss_fn, x), params, mu=1e-4, scheme=scheme, masks=masks)
    assert est.queries == (n_on + 1 if scheme == "forward" else 2 * n_on)
    assert n_on == sum(round(0.25 * p.numel()) for p in params.values()) or n_on < d
    ref = _autograd(model, x, loss_fn)
    flat_mask = torch.cat([m.reshape(-1) for m in masks.values()])
    g = est.flat()
    assert bool((g[~flat_mask] == 0).all())
    if scheme == "central":
        assert torch.allclose(g[flat_mask], ref[flat_mask], rtol=1e-5, atol=1e-8)
    # 0/1 float masks behave like bool masks
    est2 = cge(
        batched_loss_from_module(model, loss_fn, x),
        params,
        mu=1e-4,
        scheme=scheme,
        masks={k: m.double() for k, m in masks.items()},
    )
    assert torch.equal(est2.flat(), g)


def test_chunking_and_device_do_not_change_result():
    model, x, loss_fn = _problem("mlp")
    bl = batched_loss_from_module(model, loss_fn, x)
    params = dict(model.named_parameters())
    a = cge(bl, params, mu=1e-4, scheme="central", chunk_size=None)
    b = cge(bl, params, mu=1e-4, scheme="central", chunk_size=13, device="cpu")
    assert torch.allclose(a.flat(), b.flat(), rtol=0, atol=1e-9)


def test_rge_cosine_grows_with_q():
    model, x, loss_fn = _problem("mlp")
    bl = batched_loss_from_module(model, loss_fn, x)
    params = dict(model.named_parameters())
    ref = _autograd(model, x, loss_fn)
    d = ref.numel()

    def mean_cos(q, dist):
        cs = []
        for s in range(4):
            e = rge(bl, params, q=q, mu=1e-5, distribution=dist, generator=torch.Generator().manual_seed(s))
            assert e.queries == q + 1
            cs.append(float(torch.nn.functional.cosine_similarity(e.flat(), ref, dim=0)))
        return sum(cs) / len(cs)

    for dist in ("gaussian", "sphere"):
        c = [mean_cos(q, dist) for q in (4, 64, 4 * d)]
        assert c[0] < c[1] < c[2], c
        assert c[2] > 0.85, c
    # unbiased: average over many draws approaches the gradient (sphere: scaled by d)
    est = rge(
        bl, params, q=20000, mu=1e-5, distribution="sphere", generator=torch.Generator().manual_seed(0), chunk_size=5000
    )
    assert float(torch.nn.functional.cosine_similarity(est.flat(), ref, dim=0)) > 0.98
    assert float(est.flat().norm() / ref.norm()) == pytest.approx(1.0, abs=0.15)


def test_rge_deterministic_and_masked():
    model, x, loss_fn = _problem("mlp")
    bl = batched_loss_from_module(model, loss_fn, x)
    params = dict(model.named_parameters())
    masks = random_masks(params, {k: 0.5 for k in params}, torch.Generator().manual_seed(0))
    a = rge(bl, params, q=16, generator=torch.Generator().manual_seed(5), masks=masks, chunk_size=5)
    b = rge(bl, params, q=16, generator=torch.Generator().manual_seed(5), masks=masks)
    assert torch.allclose(a.flat(), b.flat(), atol=1e-12)
    flat_mask = torch.cat([m.reshape(-1) for m in masks.values()])
    assert bool((a.flat()[~flat_mask] == 0).all())


def test_write_grads_and_optimizer_step():
    model, x, loss_fn = _problem("mlp")
    params = dict(model.named_parameters())
    est = cge(batched_loss_from_module(model, loss_fn, x), params, mu=1e-4, scheme="central")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = float(loss_fn(model(x)).detach())
    write_grads(model, est)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, est[k])
    opt.step()
    assert float(loss_fn(model(x)).detach()) < before
    with pytest.raises(ValueError, match="unknown parameter"):
        write_grads(model, {"nope": torch.zeros(1)})


def test_clear_errors_on_bad_input():
    model, x, loss_fn = _problem("mlp")
    bl = batched_loss_from_module(model, loss_fn, x)
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="unknown scheme"):
        cge(bl, params, scheme="backward")
    with pytest.raises(ValueError, match="mu must be"):
        cge(bl, params, mu=0.0)
    with pytest.raises(ValueError, match="mu must be"):
        rge(bl, params, mu=-1.0)
    with pytest.raises(ValueError, match="mask shape mismatch"):
        cge(bl, params, masks={"1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not parameters"):
        cge(bl, params, masks={"foo": torch.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(\d+,\)"):
        cge(lambda pd: torch.zeros(2, 2), params)
    with pytest.raises(ValueError, match="non-finite"):
        cge(lambda pd: torch.full((next(iter(pd.values())).shape[0],), float("nan")), params)
    with pytest.raises(ValueError, match="chunk_size"):
        cge(bl, params, chunk_size=0)
    with pytest.raises(ValueError, match="distribution"):
        rge(bl, params, distribution="cauchy")
    with pytest.raises(ValueError, match="non-empty dict"):
        cge(bl, {})


def test_default_chunk_comes_from_the_memory_budget():
    """cge's default never evaluates all P x d perturbed copies at once: chunks fit the budget."""
    model = cnn1d_corrector(hidden=(4, 4), kernel=3).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    bl = batched_loss_from_module(model, lambda o: (o**2).mean(), x)
    params = dict(model.named_parameters())
    d = sum(p.numel() for p in params.values())
    sizes = []

    def counting(pd):
        sizes.append(next(iter(pd.values())).shape[0])
        return bl(pd)

    est = cge(counting, params, mu=1e-4, memory_budget=3 * d * 8 * 5)
    assert est.info["chunk_size"] == 5 and max(sizes) == 5
    ref = cge(bl, params, mu=1e-4, chunk_size=None)
    assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-12)
