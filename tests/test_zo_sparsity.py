"""ZO-GraSP / FO-GraSP layer-wise pruning ratios and random gradient masks."""

import pytest
import torch
import torch.nn as nn
from zo_nets import mlp

from zosol.zo import (
    MaskScheduler,
    batched_loss_from_module,
    fo_grasp_scores,
    layerwise_pruning_ratios,
    mask_sparsity,
    random_masks,
    score_correlation,
    uniform_lprs,
    zo_grasp_scores,
)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 2, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, batched_loss_from_module(model, lambda o: nn.functional.cross_entropy(o, y), x)


def test_lprs_match_target_sparsity():
    model, bl = _problem()
    params = dict(model.named_parameters())
    scores = fo_grasp_scores(bl, params)
    for s in (0.0, 0.5, 0.9):
        lprs = layerwise_pruning_ratios(scores, s, params=params)
        w = {k: p.numel() for k, p in params.items() if p.dim() > 1}
        tot = sum(w.values())
        assert sum(lprs[k] * n for k, n in w.items()) / tot == pytest.approx(round(s * tot) / tot, abs=1e-12)
        assert all(lprs[k] == 0.0 for k, p in params.items() if p.dim() == 1)
        masks = random_masks(params, lprs, torch.Generator().manual_seed(0))
        on = sum(int(masks[k].sum()) for k in w)
        assert 1 - on / tot == pytest.approx(s, abs=len(w) / tot)
    u = uniform_lprs(params, 0.8)
    assert all(u[k] == (0.8 if p.dim() > 1 else 0.0) for k, p in params.items())
    with pytest.raises(ValueError, match="sparsity"):
        layerwise_pruning_ratios(scores, 1.5)


def test_zo_grasp_correlates_with_fo_grasp():
    model, bl = _problem()
    params = dict(model.named_parameters())
    fo = fo_grasp_scores(bl, params)
    zo = zo_grasp_scores(bl, params, q=192, mu=5e-3, generator=torch.Generator().manual_seed(1), chunk_size=200)
    corr = score_correlation(fo, zo)
    names = [k for k, p in params.items() if p.dim() > 1]
    lf = layerwise_pruning_ratios(fo, 0.9, params=params)
    lz = layerwise_pruning_ratios(zo, 0.9, params=params)
    a = torch.tensor([lf[k] for k in names])
    b = torch.tensor([lz[k] for k in names])
    lpr_corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    print(
        f"ZO-vs-FO GraSP: score pearson {corr['pearson']:.3f} spearman {corr['spearman']:.3f}, "
        f"LPR pearson {lpr_corr:.3f}; FO LPRs {a.tolist()} ZO LPRs {b.tolist()}"
    )
    assert corr["pearson"] > 0.2
    assert lpr_corr > 0.5
    assert float(b.max() - b.min()) > 0.05  # non-uniform layer-wise ratios


def test_random_masks_and_scheduler():
    model = mlp((12, 16, 3))
    params = dict(model.named_parameters())
    lprs = {"1.weight": 0.5, "3.weight": 0.25}
    m1 = random_masks(params, lprs, torch.Generator().manual_seed(0))
    m2 = random_masks(params, lprs, torch.Generator().manual_seed(0))
    assert all(torch.equal(m1[k], m2[k]) for k in params)
    assert int((~m1["1.weight"]).sum()) == 96 and int((~m1["3.weight"]).sum()) == 12
    assert bool(m1["1.bias"].all()) and m1["1.weight"].dtype == torch.bool
    assert mask_sparsity(m1) == pytest.approx(108 / sum(p.numel() for p in params.values()))
    sch = MaskScheduler(params, lprs, every=5, seed=3)
    a, b, c = sch.masks(0), sch.masks(4), sch.masks(5)
    assert all(torch.equal(a[k], b[k]) for k in params)
    assert not torch.equal(a["1.weight"], c["1.weight"])
    assert torch.equal(MaskScheduler(params, lprs, every=5, seed=3).masks(7)["1.weight"], c["1.weight"])
    with pytest.raises(ValueError, match="not parameters"):
        random_masks(params, {"zzz": 0.1})
