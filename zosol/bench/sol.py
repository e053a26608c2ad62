"""``zosol bench sol``: time per training step of FO-SOL, ZO-JAC-SOL and ZO-SOL, side by side.

Every case builds one batch of SOL windows (initial states of the scenario, downsampled, advanced a
few coarse steps; targets = the coarse trajectory, which does not change the cost), a corrector, and
times one optimizer step's gradient (loss + gradient, median of ``repeats`` after a warm-up) for

* FO-SOL: autograd through the differentiable coarse solver;
* ZO-JAC-SOL: the black box with finite-difference Jacobians (:mod:`zosol.zo.jacobian`), its
  pattern probed beforehand (set-up time reported separately, paid once per run);
  FO-SOL and ZO-JAC-SOL are timed in turns (round-robin), so load changes hit both alike, with
  enough rounds (up to 41) to fill ~10 s;
* ZO-SOL: DeepZero's CGE over all parameters (structured forward, chunks of 128; one timed call,
  its time is long enough).  Where
  ``2d`` perturbations would take too long, CGE is timed on two coordinate subsets and the time is
  extrapolated linearly to all ``d`` coordinates (marked ``~``).  Dense ZO-JAC-SOL Jacobians with
  many probes are extrapolated the same way from a subset of probe columns.

"evals" are black-box evaluations per window sample-step (one step of one window): FO-SOL 1,
ZO-JAC-SOL 1 + probes x (m - 1) / m (the first call of a window needs no Jacobian), ZO-SOL
(1 + P (m - 1)) / m + 1 with P perturbations (the first step is shared; +1: the loss itself).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import zo
from ..config import train_config
from ..methods.jacobians import live_reach
from ..models import build_corrector, corrector_input, n_params
from ..rollout import WindowBatch, window_loss
from ..solvers import get_scenario
from .timing import time_calls

__all__ = ["SolCase", "CASES", "run_sol_bench"]


@dataclass
class SolCase:
    """One benchmark row: scenario at ``preset`` and corrector overrides of its training preset."""

    scenario: str
    label: str
    model: dict[str, Any] = field(default_factory=dict)
    preset: str = "default"


CASES = [
    SolCase("burgers1d", "cnn w8 (preset)", {}),
    SolCase("burgers1d", "cnn w32", dict(width=32)),
    SolCase("burgers1d", "SOL resnet 5x32 k5", dict(model="resnet", width=32, depth=5, kernel=5)),
    SolCase("burgers1d", "SOL resnet 5x32 k25", dict(model="resnet", width=32, depth=5, kernel=25)),
    SolCase("burgers2d", "preset corrector", {}),
    SolCase("karman2d", "preset corrector", {}),
    SolCase("karman2d", "cnn w18 (large)", dict(width=18)),
    SolCase("karman2d", "cnn w42", dict(width=42)),
]


def _windows(sc, batch: int, m: int, warm: int = 3) -> WindowBatch:
    """B windows of m steps from the coarse trajectory (start (B, C, *s), targets (B, m, C, *s))."""
    solver = sc.coarse_solver()
    xs, ps = zip(*(sc.sample(s) for s in range(batch)))
    p = torch.stack(ps)
    x = sc.downsample(torch.stack(xs))
    with torch.no_grad():
        for _ in range(warm):
            x = solver.step(x, p)
        frames = [x]
        for _ in range(m):
            frames.append(solver.step(frames[-1], p))
    return WindowBatch(x, torch.stack(frames[1:], 1), p if solver.num_params else None, sc.corrector_features(p))


def _medians(fns: list[Callable[[], Any]], repeats: int, warmup: bool = True, min_seconds: float = 0.0) -> list[float]:
    """Median seconds of each function, timed in turns (:func:`~zosol.bench.timing.time_calls`),
    one warm-up call each first unless ``warmup`` is False; more rounds (up to 41) while they
    take less than ``min_seconds`` in all."""
    return [t.median for t in time_calls(fns, repeats, warmup=int(warmup), min_seconds=min_seconds)]


def _autograd_step(model, step, data, loss: str) -> Callable[[], None]:
    def run():
        model.zero_grad(set_to_none=True)
        window_loss(step, model, data, 1, loss)[0].backward()

    return run


def _zo_sol_seconds(model, blackbox, data, cfg, repeats: int, budget: int) -> tuple[float, bool]:
    """CGE step time over all d coordinates, or extrapolated from two subsets (True) when 2d > budget."""
    d = n_params(model)

    def timed(k: int | None) -> float:
        masks = None
        if k is not None:
            flat = torch.zeros(d)
            flat[torch.linspace(0, d - 1, k).round().long()] = 1
            masks, i = {}, 0
            for name, p in model.named_parameters():
                masks[name] = flat[i : i + p.numel()].view_as(p)
                i += p.numel()
        lof = lambda forward, P: window_loss(blackbox, forward, data, P, cfg.loss)
        return _medians(
            [
                lambda: zo.cge_structured(
                    model,
                    lof,
                    mu=cfg.zo_mu,
                    scheme=cfg.zo_scheme,
                    masks=masks,
                    chunk_size=cfg.zo_chunk,
                    batch_size=data.size,
                )
            ],
            repeats,
            warmup=False,
        )[0]

    if 2 * d <= budget:
        return timed(None), False
    k1, k2 = budget // 8, budget // 2
    t1, t2 = timed(k1), timed(k2)
    return t2 + (d - k2) * max(t2 - t1, 0.0) / (k2 - k1), True


def _fo_and_jac_seconds(model, solver, jac, data, cfg, repeats: int, budget: int) -> tuple[float, float, bool]:
    """FO-SOL and ZO-JAC-SOL step times, timed in turns; a dense Jacobian with more than
    ``budget`` probes per window is timed on a subset of probe columns and extrapolated (True)."""
    start, targets, params = data.start, data.targets, data.params
    b, m = start.shape[0], targets.shape[1]
    fo = _autograd_step(model, solver.step, data, cfg.loss)
    if not jac.is_dense or jac.probes_per_sample * b * (m - 1) <= budget:
        return *_medians([fo, _autograd_step(model, zo.fd_step(jac), data, cfg.loss)], repeats, min_seconds=10.0), False
    cols = max(1, budget // (b * (m - 1) * (2 if jac.scheme == "central" else 1)))
    eye = torch.eye(jac.n)[:cols]
    f0 = jac.step(start, params)

    def probe():
        zo.jacobian.directional_differences(
            jac.step, start, params, eye, jac._mu(start.dtype), jac.scheme, f0, jac.max_batch
        )

    cut = _autograd_step(model, jac.step, data, cfg.loss)  # window + backprop, no Jacobians
    t_fo, t_cut, t_probe = _medians([fo, cut, probe], repeats)
    return t_fo, t_cut + (m - 1) * t_probe * jac.n / cols, True


def _reference_jacobian(blackbox, solver, data, cfg) -> zo.RefJacobian:
    """ZO-JAC-SOL's reference-subtracted estimate as training builds it: one dense reference at the
    mean of the windows' states and, with ``jac_references=global+frames`` (the default), the
    difference to it at each window's frames (start and targets but the last) within
    ``jac_frame_reach``, each call using the nearest of its window's frames; the live difference
    coloured within the live reach; forward differences unless ``jac_scheme`` says otherwise."""
    start, targets, params = data.start, data.targets, data.params
    b, m = targets.shape[:2]
    scheme = "forward" if cfg.jac_scheme == "auto" else cfg.jac_scheme
    mean = torch.cat([start, targets.flatten(0, 1)]).mean(0, keepdim=True)
    p = None if params is None else params.mean(0, keepdim=True)
    kw = dict(mu=cfg.zo_mu, scheme=scheme, max_batch=cfg.jac_batch)
    refs = zo.build_references(blackbox, mean, p, **kw)
    if cfg.jac_references == "global+frames":
        frames = torch.cat([start[:, None], targets[:, :-1]], 1)  # (B, m, C, *s): the states the calls act near
        fp = None if params is None else params.repeat_interleave(m, 0)
        refs = zo.build_frame_references(blackbox, refs, frames.flatten(0, 1), fp, reach=cfg.jac_frame_reach, **kw)
    jac = zo.RefJacobian(blackbox, solver.state_shape, refs, reach=live_reach(cfg), **kw)
    if len(refs) > 1:
        jac.select(torch.arange(b * m).reshape(b, m))
    return jac


def _evals(m: int, perturbations: int) -> float:
    """Black-box evaluations per window sample-step for P rollouts sharing the first step, +1 loss."""
    return (1 + perturbations * (m - 1)) / m + 1


def _corrector(sc: Any, cfg: Any, in_ch: int) -> torch.nn.Module:
    """The case's corrector (seed 0) with a small non-zero last layer: every layer gets a gradient."""
    solver = sc.coarse_solver()
    torch.manual_seed(0)
    model = build_corrector(
        cfg.model,
        len(solver.spatial_shape),
        in_ch,
        len(solver.channels),
        width=cfg.width,
        depth=cfg.depth,
        kernel=cfg.kernel,
        padding_mode=sc.padding_mode,
    )
    torch.nn.init.normal_(model[-1].weight, std=1e-3)
    return model


def run_case(case: SolCase, repeats: int = 3, budget: int = 2048) -> dict[str, Any]:
    """Time FO-SOL, ZO-JAC-SOL and ZO-SOL on one case; returns the row."""
    sc = get_scenario(case.scenario, case.preset)
    cfg = train_config(case.preset, case.scenario, method="zo-jac-sol", **case.model)
    solver = sc.coarse_solver()
    data = _windows(sc, cfg.batch_size, cfg.window)
    start, targets, params, feats = data.start, data.targets, data.params, data.features
    model = _corrector(sc, cfg, corrector_input(start, feats).shape[1])
    blackbox = solver.blackbox().step
    t = time.perf_counter()
    probe_states = targets[:, -1][: cfg.jac_probe_states]
    probe_params = None if params is None else params[: cfg.jac_probe_states]
    jac = zo.FDJacobian.for_step(
        blackbox,
        solver.state_shape,
        pattern=cfg.jac_pattern,
        states=probe_states,
        params=probe_params,
        stencil_reach=solver.stencil_reach,
        mu=cfg.zo_mu,
        scheme=cfg.zo_scheme,
        max_batch=cfg.jac_batch,
    )
    setup, ref_setup = time.perf_counter() - t, 0.0
    if jac.is_dense and cfg.jac_mode in ("auto", "reference"):
        t = time.perf_counter()
        jac = _reference_jacobian(blackbox, solver, data, cfg)
        ref_setup = time.perf_counter() - t
    fo, zj, zj_extra = _fo_and_jac_seconds(model, solver, jac, data, cfg, repeats, budget * 2)
    zs, zs_extra = _zo_sol_seconds(model, blackbox, data, cfg, 1, budget)  # seconds to minutes: one call
    d, m = n_params(model), cfg.window
    perturbations = 2 * d if cfg.zo_scheme == "central" else d + 1
    return {
        "scenario": case.scenario,
        "corrector": case.label,
        "params": d,
        "batch": cfg.batch_size,
        "window": m,
        "jacobian": jac.describe(),
        "jacobian_setup_s": setup,
        "reference_setup_s": ref_setup,
        "fo_sol_s": fo,
        "zo_jac_sol_s": zj,
        "zo_jac_sol_extrapolated": zj_extra,
        "zo_sol_s": zs,
        "zo_sol_extrapolated": zs_extra,
        "evals_fo_sol": 1.0,
        "evals_zo_jac_sol": 1 + jac.probes_per_sample * (m - 1) / m,
        "evals_zo_sol": _evals(m, perturbations),
    }


def _line(r: dict[str, Any]) -> str:
    zj = f"{'~' if r['zo_jac_sol_extrapolated'] else ''}{r['zo_jac_sol_s']:.3f}"
    zs = f"{'~' if r['zo_sol_extrapolated'] else ''}{r['zo_sol_s']:.3g}"
    return (
        f"{r['scenario']:<10} {r['corrector']:<20} {r['params']:>8} {r['fo_sol_s']:>8.3f} {zj:>10} {zs:>10} "
        f"{r['zo_jac_sol_s'] / r['fo_sol_s']:>8.2f} {r['zo_sol_s'] / r['zo_jac_sol_s']:>9.0f} "
        f"{r['evals_zo_jac_sol']:>8.1f} {r['evals_zo_sol']:>9.0f}"
    )


def run_sol_bench(
    json_path: str | None = None,
    quick: bool = False,
    scenarios=None,
    repeats: int = 3,
    log: Callable[[str], None] = print,
    cases: list[SolCase] | None = None,
    budget: int = 2048,
) -> list[dict]:
    """Print (and return) one row per case (default: :data:`CASES`): seconds per training step of
    each method, ratios, black-box evaluations per window sample-step; ``~`` marks extrapolated
    times (ZO-SOL beyond ``budget`` perturbations)."""
    cases = [c for c in cases or CASES if scenarios is None or c.scenario in scenarios]
    if quick:
        cases = [c for c in cases if "k25" not in c.label and c.scenario != "karman2d"]
    log(
        f"{'scenario':<10} {'corrector':<20} {'params':>8} {'FO-SOL':>8} {'ZO-JAC':>10} {'ZO-SOL':>10} "
        f"{'JAC/FO':>8} {'ZO/JAC':>9} {'ev JAC':>8} {'ev ZO-SOL':>9}   (s per training step; ev: black-box "
        f"evaluations per window sample-step; ~ extrapolated)"
    )
    rows = []
    for case in cases:
        row = run_case(case, repeats=repeats, budget=budget)
        rows.append(row)
        refs = f", references {row['reference_setup_s']:.1f} s" if row["reference_setup_s"] else ""
        log(_line(row) + f"   [{row['jacobian']}; set-up: pattern {row['jacobian_setup_s']:.1f} s{refs}]")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
