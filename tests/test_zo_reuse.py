"""Structured perturbed forward (feature reuse) == generic finite differences."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from zo_nets import cnn1d_corrector, cnn2d, mlp, resnet1d

from zosol.zo import Residual, UnsupportedModuleError, cge, cge_structured, random_masks


def _models():
    g = torch.Generator().manual_seed(0)
    mixed = nn.Sequential(  # strides, dilation, groups, padding modes, 'same', Flatten -> Linear
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(4, 4, (3, 2), padding="same", groups=2),
        nn.SiLU(),
        nn.Conv2d(4, 2, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(18, 2),
    )
    c1 = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=2, dilation=2, padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv1d(4, 3, 3, stride=2),
        nn.GELU(),
        Residual(nn.Conv1d(3, 3, 1), nn.Tanh()),
        nn.Conv1d(3, 2, 3, padding=1, padding_mode="zeros"),
    )
    return {
        "mlp": (mlp((12, 8, 3)), torch.randn(5, 3, 4, generator=g)),
        "cnn1d": (cnn1d_corrector(hidden=(4, 3), kernel=3), torch.randn(4, 2, 8, generator=g)),
        "cnn2d": (cnn2d(ch=2, hw=6, n_out=3), torch.randn(3, 1, 6, 6, generator=g)),
        "resnet": (resnet1d(ch=3, blocks=2), torch.randn(4, 2, 8, generator=g)),
        "mixed2d": (mixed, torch.randn(3, 2, 6, 6, generator=g)),
        "mixed1d": (c1, torch.randn(3, 2, 9, generator=g)),
    }


MODELS = list(_models())


def _setup(kind):
    torch.manual_seed(0)
    model, x = _models()[kind]
    model = model.double()
    x = x.double()
    with torch.no_grad():
        y = 0.3 * torch.ones_like(model(x))
    return model, x, y


def _ref_cge(model, batched_single_loss, mu, scheme, masks=None):
    """Generic reference: perturbed parameter copies + functional_call per perturbation."""
    params = dict(model.named_parameters())

    def bl(pd):
        return vmap(batched_single_loss)(pd)

    return cge(bl, params, mu=mu, scheme=scheme, masks=masks)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_structured_equals_generic_shared_input(kind, scheme):
    model, x, y = _setup(kind)

    def single(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def lof(forward, P):
        out = forward(x)
        assert out.shape[0] == P * x.shape[0]
        return ((out.reshape((P,) + y.shape) - y) ** 2).reshape(P, -1).mean(1)

    ref = _ref_cge(model, single, 1e-4, scheme)
    for reuse, cs in ((True, None), (True, 7), (False, 7)):
        if True:
            est = cge_structured(model, lof, mu=1e-4, scheme=scheme, chunk_size=cs, reuse=reuse, batch_size=x.shape[0])
            assert est.queries == ref.queries
            assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-9), (reuse, cs)


@pytest.mark.parametrize("kind", ["cnn1d", "resnet", "mixed2d"])
def test_structured_per_perturbation_input(kind):
    model, x, y = _setup(kind)
    B = x.shape[0]

    def single(p):
        return ((functional_call(model, p, (2 * x,)) - y) ** 2).mean()

    def lof(forward, P):
        xp = (2 * x).repeat((P,) + (1,) * (x.dim() - 1))  # (P*B, ...): per-perturbation input rows
        out = forward(xp, per_perturbation=True)
        return ((out.reshape((P,) + y.shape) - y) ** 2).reshape(P, -1).mean(1)

    ref = _ref_cge(model, single, 1e-4, "central")
    est = cge_structured(model, lof, mu=1e-4, scheme="central", chunk_size=11)
    assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-9)
    assert B == x.shape[0]


@pytest.mark.parametrize("kind", ["cnn1d", "resnet"])
@pytest.mark.parametrize("engine", ["structured", "vmap"])
def test_unrolled_rollout_multiple_forward_calls(kind, engine):
    """x -> tanh(x + forward(x)) three times: first call shared input, then per-perturbation."""
    model, x, _ = _setup(kind)
    target = torch.sin(torch.arange(x.shape[-1], dtype=torch.float64))

    def single(p):
        z = x
        for _ in range(3):
            z = torch.tanh(z + functional_call(model, p, (z,))[:, : z.shape[1]].mean(1, keepdim=True))
        return ((z - target) ** 2).mean()

    def lof(forward, P):
        z = x
        for t in range(3):
            out = forward(z)  # t=0: (B, ...) shared; later: (P*B, ...)
            zz = z.repeat(P, 1, 1) if t == 0 else z
            z = torch.tanh(zz + out[:, : zz.shape[1]].mean(1, keepdim=True))
        return ((z.reshape(P, -1, *z.shape[1:]) - target) ** 2).reshape(P, -1).mean(1)

    ref = _ref_cge(model, single, 1e-4, "forward")
    est = cge_structured(model, lof, mu=1e-4, scheme="forward", chunk_size=16, engine=engine)
    assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-8)


def test_structured_masks_and_query_count():
    model, x, y = _setup("resnet")
    params = dict(model.named_parameters())
    masks = random_masks(params, {k: 0.6 for k in params}, torch.Generator().manual_seed(2))
    n_on = sum(int(m.sum()) for m in masks.values())

    def single(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def lof(forward, P):
        return ((forward(x).reshape((P,) + y.shape) - y) ** 2).reshape(P, -1).mean(1)

    for scheme, q in (("forward", n_on + 1), ("central", 2 * n_on)):
        est = cge_structured(model, lof, mu=1e-4, scheme=scheme, masks=masks, chunk_size=10)
        ref = _ref_cge(model, single, 1e-4, scheme, masks)
        assert est.queries == q
        assert torch.allclose(est.flat(), ref.flat(), rtol=0, atol=1e-9)
        flat_mask = torch.cat([m.reshape(-1) for m in masks.values()])
        assert bool((est.flat()[~flat_mask] == 0).all())


def test_structured_float32_close_to_autograd():
    model, x, y = _setup("cnn1d")
    model = model.float()
    x, y = x.float(), y.float()

    def lof(forward, P):
        return ((forward(x).reshape((P,) + y.shape) - y) ** 2).reshape(P, -1).mean(1)

    est = cge_structured(model, lof, mu=1e-3, chunk_size=64)
    loss = ((model(x) - y) ** 2).mean()
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert float(torch.nn.functional.cosine_similarity(est.flat().double(), ref.double(), dim=0)) > 0.99


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.shape[-1] > 2:
            h = h * 2
        return self.b(h)


def test_unsupported_module_error_and_fallback():
    torch.manual_seed(0)
    model = _Untraceable().double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def lof(forward, P):
        return (forward(x).reshape(P, -1) ** 2).mean(1)

    with pytest.raises(UnsupportedModuleError, match="torch.fx cannot trace.*engine='vmap'"):
        cge_structured(model, lof, engine="structured")
    with pytest.warns(UserWarning, match="vmap engine because torch.fx cannot trace"):
        est = cge_structured(model, lof, mu=1e-4, scheme="central")
    assert est.info["engine"] == "vmap" and "torch.fx" in est.info["engine_reason"]
    ref = cge(
        vmap(lambda p: (functional_call(model, p, (x,)) ** 2).mean()),
        dict(model.named_parameters()),
        mu=1e-4,
        scheme="central",
    )
    assert torch.allclose(est.flat(), ref.flat(), atol=1e-10)
    with pytest.raises(ValueError, match="unknown engine"):
        cge_structured(model, lof, engine="magic")


def test_bad_loss_and_ambiguous_input():
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match="one loss per perturbation"):
        cge_structured(model, lambda f, P: f(x).sum().reshape(1, 1, 1), chunk_size=4)
    with pytest.raises(ValueError, match="non-finite"):
        cge_structured(model, lambda f, P: f(x).reshape(P, -1).mean(1) * float("inf"), chunk_size=4)
    x8 = torch.randn(8, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="per_perturbation"):  # P=4 divides B=8 and B unknown
        cge_structured(model, lambda f, P: f(x8).reshape(P, -1).mean(1), chunk_size=4, scheme="central")
    est = cge_structured(model, lambda f, P: f(x8).reshape(P, -1).mean(1), chunk_size=4, scheme="central", batch_size=8)
    assert est.queries == 2 * sum(p.numel() for p in model.parameters())
