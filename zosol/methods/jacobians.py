"""ZO-JAC-SOL's Jacobian set-up: which estimate (the cost model), and the reference Jacobians of the
reference-subtracted estimate (where they are taken, their cache in the run directory, the
refreshes made at run time).

Modes (``config.jac_mode``), black-box evaluations per sample-step of each (``n`` state entries):

* ``sparse``: the probed / declared pattern, CPR-coloured: ``colours`` (forward) or ``2 colours``;
* ``dense``: ``n`` (forward) or ``2n`` (central);
* ``reference``: dense reference Jacobians probed once per run (``n + 1`` each), plus the coloured
  difference within the live reach: ``C (2r+1)^nd`` (forward) per sample-step
  (:class:`zosol.zo.RefJacobian`);
* ``auto``: sparse when the pattern colours, else reference-subtracted.

References (``config.jac_references``):

* ``global+frames`` (default): one dense reference at the mean training state plus, at every
  ``jac_ref_stride``-th frame (default 5), the difference to it within ``jac_frame_reach``
  cells (default 5; ``C (2R+1)^nd + 1`` evaluations and ``C^2 (2R+1)^nd`` numbers per cell and
  frame), stored by stencil offset (:func:`zosol.zo.build_frame_references`).  Each call uses the
  frame nearest to its state among the window's frames; the live difference to it is small and
  local, so reach 1 suffices (18 colours in 2-D with 2 channels instead of the 50 one global
  reference needs at reach 2: measured in ``docs/results.md``).
* ``global``: the dense reference alone (live reach 2 by default).
* ``simulation`` (one dense reference per training simulation, at its mean state) or ``frame``
  (dense, every ``jac_ref_stride``-th frame, default 10; a window uses the one nearest to its
  middle frame, in its own simulation: the calls that need Jacobians act on states near frames
  ``t+1 .. t+m-1``).

They are cached in
``run_dir/jacobian-references/<key>.pt``, the key a hash of the data's fingerprint, the black
box's fingerprint (its type, state shape and its output on the first training frame), the
reference placement and the finite-difference settings; a resumed or repeated run reads them
instead of probing again.  Refreshes made by the run-time error check go to
``<key>-refreshes.pt`` (the state each was taken at); a resumed run replays the ones its
checkpoint had seen, so it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import zo
from ..models import n_params
from ..runtime.files import atomic_save
from ..runtime.launch import broadcast_from_lead, is_lead
from ..training.windows import Windows
from ..zo.parallel import available_memory
from .shared import cost_model

__all__ = [
    "JacobianSetup",
    "ReferencePlan",
    "reference_plan",
    "reference_key",
    "load_or_build",
    "RefreshLog",
    "jacobian_costs",
    "cost_model",
]

#: fraction of the free memory the references may take
REFERENCE_MEMORY_FRACTION = 0.25


def live_reach(config: Any) -> int:
    """The reach of the live, coloured difference: ``jac_reach``, by default 1 with references at
    the frames (the difference to a nearby frame is small and local), else 2."""
    if config.jac_reach is not None:
        return int(config.jac_reach)
    return 1 if config.jac_references == "global+frames" else 2


def reference_stride(config: Any) -> int:
    """Frames between references: ``jac_ref_stride``, by default 5 (global+frames) / 10 (frame)."""
    if config.jac_ref_stride is not None:
        return int(config.jac_ref_stride)
    return 5 if config.jac_references == "global+frames" else 10


@dataclass
class ReferencePlan:
    """Where the references are taken: ``states`` (R, C, *s), ``params`` (R, K) or None, ``labels``,
    and ``table`` (N, T + 1 - m) the reference of the window starting at (simulation, frame), or
    (N, T + 1 - m, m) its candidates (the nearest of them is used per call).  ``base`` (state,
    params): global+frames' dense reference."""

    kind: str
    states: torch.Tensor
    params: torch.Tensor | None
    labels: list[str]
    table: torch.Tensor
    base: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def index(self, sim: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """Reference index (B,) or candidates (B, m) of windows starting at ``frame`` (B,) of ``sim`` (B,)."""
        return self.table[sim.cpu(), frame.cpu()]

    def nbytes(self, dtype: torch.dtype, reach: int) -> int:
        """Memory of the references: dense n x n matrices, or one plus a field per frame."""
        r, n, c = self.states.shape[0], self.states[0].numel(), self.states.shape[1]
        size = torch.finfo(dtype).bits // 8
        if self.kind != "global+frames":
            return r * n * n * size
        return (n * n + r * c * n * (2 * reach + 1) ** (self.states.dim() - 2)) * size


def _frames(traj: torch.Tensor, params: torch.Tensor | None, stride: int):
    """Every ``stride``-th frame of every simulation: indices, states, params, labels."""
    n_sim, t1 = traj.shape[:2]
    frames = list(range(0, t1, stride))
    p = None if params is None else params.repeat_interleave(len(frames), 0)
    labels = [f"simulation {i} frame {t}" for i in range(n_sim) for t in frames]
    return torch.tensor(frames), traj[:, frames].flatten(0, 1), p, labels


def reference_plan(windows: Windows, kind: str, stride: int) -> ReferencePlan:
    """The reference placement ``kind`` ("global+frames", "global", "simulation", "frame") over
    ``windows``' training data."""
    traj, m = windows.traj, windows.m
    n_sim, t1 = traj.shape[:2]
    params = windows.params if windows.num_params else None
    starts = t1 - m
    mean = traj.flatten(0, 1).mean(0, keepdim=True), None if params is None else params.mean(0, keepdim=True)
    if kind == "global":
        table = torch.zeros(n_sim, starts, dtype=torch.long)
        return ReferencePlan(kind, *mean, ["mean training state"], table)
    if kind == "simulation":
        table = torch.arange(n_sim)[:, None].expand(n_sim, starts).clone()
        labels = [f"mean state of simulation {i}" for i in range(n_sim)]
        return ReferencePlan(kind, traj.mean(1), params, labels, table)
    if kind not in ("frame", "global+frames"):
        raise ValueError(f"unknown jac_references {kind!r}; choose 'global+frames', 'global', 'simulation' or 'frame'")
    frames, states, p, labels = _frames(traj, params, stride)
    nearest = lambda t: (t[..., None] - frames).abs().argmin(-1)  # noqa: E731  stored frame nearest to frame t
    offset = torch.arange(n_sim)[:, None] * len(frames)
    if kind == "frame":  # the frame nearest to the window's middle: its calls act near frames t+1 .. t+m-1
        return ReferencePlan(kind, states, p, labels, offset + nearest(torch.arange(starts) + m // 2)[None])
    # global+frames: the frames nearest to each of the window's frames t .. t+m-1, one chosen per call
    candidates = nearest(torch.arange(starts)[:, None] + torch.arange(m)[None])  # (starts, m)
    return ReferencePlan(kind, states, p, labels, offset[:, :, None] + candidates[None], base=mean)


def _solver_fingerprint(step: zo.jacobian.Step, windows: Windows) -> str:
    """The black box's type, state shape and a hash of its output on the first training frame."""
    x = windows.traj[:1, 0]
    p = windows.params[:1] if windows.num_params else None
    with torch.no_grad():
        out = step(x, p).detach().cpu().contiguous()
    name = type(getattr(step, "_step", step)).__qualname__
    return f"{name}:{tuple(x.shape[1:])}:" + hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]


def reference_key(data: dict[str, Any], step: zo.jacobian.Step, windows: Windows, settings: dict[str, Any]) -> str:
    """Cache key of a run's references: hash of the data fingerprint, the black box's fingerprint and
    the placement / finite-difference ``settings``."""
    blob = json.dumps({"data": data, "solver": _solver_fingerprint(step, windows), **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_reference_memory(plan: ReferencePlan, dtype: torch.dtype, device: torch.device, reach: int) -> None:
    """ValueError naming the fix when the references would not fit memory."""
    r, n = plan.states.shape[0], plan.states[0].numel()
    need = plan.nbytes(dtype, reach)
    free = available_memory(device)
    if need > REFERENCE_MEMORY_FRACTION * free:
        what = f"{r} reference Jacobians of {n} x {n}" if plan.kind != "global+frames" else f"{r} frame fields"
        raise ValueError(
            f"ZO-JAC-SOL: {what} ({plan.kind}) need {need / 2**30:.1f} GiB, more than "
            f"{REFERENCE_MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free; use fewer references "
            f"(a larger --train-set jac_ref_stride=K, a smaller jac_frame_reach, or jac_references=global)"
        )


def load_or_build(plan: ReferencePlan, cache: Path | None, build: Any, lead: bool) -> tuple[zo.References, bool]:
    """The cached references at ``cache`` (validated against the plan), or ``build()``'s, written
    there by the lead process.  Returns (references, loaded from the cache)."""
    found = broadcast_from_lead(lambda: cache is not None and cache.is_file())
    if found:
        # plain tensors and lists cross the ranks (they load with weights_only=True), not the dataclass
        refs = zo.References.from_state(broadcast_from_lead(lambda: _read(cache).to_state()))
        if torch.equal(refs.states, plan.states.to(refs.states.dtype)):
            return refs, True
    refs = build()
    if cache is not None and lead:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(cache, lambda f: torch.save(refs.to_state(), f))
    return refs, False


def _read(path: Path) -> zo.References:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable reference Jacobians ({type(e).__name__}); delete the file") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a reference Jacobian file; delete it")
    return zo.References.from_state(state)


class RefreshLog:
    """The references refreshed at run time (index, state, params), kept in ``path`` for resumes."""

    def __init__(self, path: Path | None):
        self.path, self.records = path, []

    def add(self, refs: zo.References, index: int) -> None:
        p = None if refs.params is None else refs.params[index].clone()
        self.records.append((index, refs.states[index].clone(), p))

    def save(self, lead: bool) -> None:
        if self.path is None or not lead:
            return
        rec = [{"index": i, "state": s, "params": p} for i, s, p in self.records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(self.path, lambda f: torch.save(rec, f))

    def replay(self, jac: zo.RefJacobian, count: int) -> None:
        """Redo the first ``count`` refreshes of the file (a resumed run)."""
        if count == 0:
            return
        recs = broadcast_from_lead(lambda: self._load())
        if len(recs) < count:
            raise ValueError(
                f"{self.path}: {len(recs)} reference refreshes saved, the checkpoint saw {count}; "
                f"the run directory is incomplete: train again without --resume"
            )
        for r in recs[:count]:
            jac.refresh_at(int(r["index"]), r["state"][None], None if r["params"] is None else r["params"][None])
            self.records.append((int(r["index"]), r["state"], r["params"]))

    def _load(self) -> list:
        if self.path is None or not self.path.is_file():
            return []
        return torch.load(self.path, map_location="cpu", weights_only=True)


def jacobian_costs(
    n: int, schemes: dict[str, str], colours: int | None, ref_colours: int, setup: int, sample_steps: int
) -> dict[str, int | None]:
    """Black-box evaluations per sample-step of each Jacobian mode with its scheme (``schemes``: mode
    -> "forward" / "central"; None: mode not available), the reference set-up spread over the run's
    ``sample_steps`` Jacobian sample-steps."""
    per = {k: 2 if v == "central" else 1 for k, v in schemes.items()}
    return {
        "dense": n * per["dense"],
        "sparse": None if colours is None else colours * per["sparse"],
        "reference": ref_colours * per["reference"] + math.ceil(setup / max(1, sample_steps)),
    }


def _data_hash(windows: Windows) -> str:
    h = hashlib.sha256(windows.traj.detach().cpu().contiguous().numpy().tobytes())
    if windows.num_params:
        h.update(windows.params.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class JacobianSetup:
    """ZO-JAC-SOL's Jacobian estimate for one run: chosen (fresh run) or restored (resumed run)
    from ``history["jacobian"]``; :meth:`before` / :meth:`after` wrap every training step (reference
    selection, error checks, their records, refreshes, stopping a poor estimate)."""

    def __init__(self, source: Any, history: dict[str, Any]):
        c, w = source.config, source.windows
        self.config, self.windows, self.step = c, w, source.solver_step
        self.distributed, self.lead, self.d = source.distributed, is_lead(), n_params(source.model)
        self.run_dir: Path | None = getattr(source, "run_dir", None)
        self.stencil_reach = source.solvers.stencil_reach
        self.plan: ReferencePlan | None = None
        self.info: dict[str, Any] = {}
        saved = history.get("jacobian")
        started = time.perf_counter()
        mode = saved["mode"] if saved is not None else c.jac_mode
        if mode in ("auto", "sparse", "dense"):
            mode = self._pattern_jacobian(mode, saved, history)
        if mode == "reference":
            dense = self.jac if saved is None and c.jac_mode == "auto" else None  # the probed (dense) pattern
            self._reference_jacobian(saved, history)
            if dense is not None and not self._reference_suits(history):
                self.jac, mode = dense, "dense"
        self.mode = mode
        if saved is None:  # all of it: pattern probe, references, their colour probes, the up-front check
            self.info["setup_seconds"] = time.perf_counter() - started
        elif "setup_seconds" in saved:
            self.info["setup_seconds"] = saved["setup_seconds"]

    # -- set-up ------------------------------------------------------------------------------
    def scheme(self, mode: str) -> str:
        s = self.config.jac_scheme
        return s if s != "auto" else "forward" if mode == "reference" else self.config.zo_scheme

    def _pattern_jacobian(self, mode: str, saved: dict | None, history: dict[str, Any]) -> str:
        """The sparse / dense FDJacobian (mode "auto" becomes "reference" when the pattern is dense)."""
        c, w = self.config, self.windows
        kw = dict(mu=c.zo_mu, scheme=self.scheme("sparse"), max_batch=c.jac_batch, distributed=self.distributed)
        if saved is not None:
            self.jac = zo.FDJacobian.from_pattern_state(self.step, saved["pattern"], **kw)
            self.jac.events = list(saved["events"])
            return saved["mode"]
        pattern = "dense" if mode == "dense" else c.jac_pattern
        frames = w.traj.flatten(0, 1)
        pick = torch.linspace(0, frames.shape[0] - 1, c.jac_probe_states).round().long()
        params = w.params.repeat_interleave(w.traj.shape[1], 0)[pick] if w.num_params else None
        jac = zo.FDJacobian.for_step(
            self.step, w.traj.shape[2:], pattern=pattern, states=frames[pick], params=params,
            margin=c.jac_margin, stencil_reach=self.stencil_reach, **kw,
        )  # fmt: skip
        history["zo_queries"] += jac.evaluations
        self.jac, self._probe_states = jac, (frames[pick], params)
        if mode == "auto" and jac.is_dense and pattern != "dense":
            self.info["pattern_note"] = jac.describe()
            return "reference"
        return "dense" if jac.is_dense else "sparse"

    def _reference_suits(self, history: dict[str, Any]) -> bool:
        """Auto mode: check the reference-subtracted estimate one coarse step from the probed training
        frames (near them, like the rollouts' states), widening the reach up to ``jac_max_reach``;
        False (the cost model falls back to the dense Jacobian) when its ``J v`` error stays above
        ``jac_tol`` (e.g. a spectral step, whose Jacobian changes everywhere with the state)."""
        c, jac = self.config, self.jac
        states, params = self._probe_states
        with torch.no_grad():
            states = self.step(states, params).detach()
        gen = torch.Generator().manual_seed(c.seed)
        errors = []
        while True:
            spent = jac.evaluations
            errors.append(float(jac.error_at(states, params, gen).max()))
            history["zo_queries"] += jac.evaluations - spent
            if errors[-1] <= c.jac_tol or jac.reach >= jac.max_reach:
                break
            jac.set_reach(jac.reach + 1)
        tried = ", ".join(f"{e:.3g}" for e in errors)
        if errors[-1] <= c.jac_tol:
            self.info["reference_check"] = (
                f"J v error one step from {states.shape[0]} training frames: {tried} (reach {jac.reach})"
            )
            return True
        self.info["reference_check"] = (
            f"reference-subtracted estimate rejected: J v error one step from {states.shape[0]} training frames "
            f"{tried} (reach {live_reach(c)}..{jac.reach}) > jac_tol {c.jac_tol:g}; dense Jacobian instead"
        )
        return False

    def _reference_jacobian(self, saved: dict | None, history: dict[str, Any]) -> None:
        c, w = self.config, self.windows
        scheme, dtype = self.scheme("reference"), w.traj.dtype
        stride = reference_stride(c)
        plan = reference_plan(w, c.jac_references, stride)
        check_reference_memory(plan, dtype, w.traj.device, c.jac_frame_reach)
        settings = {"references": plan.kind, "mu": c.zo_mu, "scheme": scheme, "dtype": str(dtype)}
        if plan.kind in ("frame", "global+frames"):
            settings.update(stride=stride, m=w.m)
        if plan.kind == "global+frames":
            settings.update(frame_reach=c.jac_frame_reach)
        key = reference_key({"data": _data_hash(w)}, self.step, w, settings)
        folder = None if self.run_dir is None else Path(self.run_dir) / "jacobian-references"
        kw = dict(mu=c.zo_mu, scheme=scheme, max_batch=c.jac_batch, distributed=self.distributed)

        def build() -> zo.References:
            if plan.base is None:
                return zo.build_references(self.step, plan.states, plan.params, labels=plan.labels, **kw)
            base = zo.build_references(self.step, *plan.base, labels=["mean training state"], **kw)
            return zo.build_frame_references(
                self.step, base, plan.states, plan.params, reach=c.jac_frame_reach, labels=plan.labels, **kw
            )

        refs, cached = load_or_build(plan, None if folder is None else folder / f"{key}.pt", build, self.lead)
        if saved is None:
            history["zo_queries"] += 0 if cached else refs.evaluations
            self.info.update(setup_evaluations=refs.evaluations)
            self.info.update(cached=cached)
        else:
            kept = ("setup_seconds", "setup_evaluations", "cached", "pattern_note", "reference_check")
            self.info.update({k: saved[k] for k in kept if k in saved})
        self.jac = zo.RefJacobian(
            self.step, w.traj.shape[2:], refs, reach=live_reach(c), pattern=c.jac_shape, mu=c.zo_mu, scheme=scheme,
            max_batch=c.jac_batch, distributed=self.distributed, tol=c.jac_tol,
            max_reach=max(c.jac_max_reach, live_reach(c)),
        )  # fmt: skip
        if saved is None:
            history["zo_queries"] += self.jac.evaluations  # the colour probes at the references
        self.plan, self.key = plan, key
        self.log = RefreshLog(None if folder is None else folder / f"{key}-refreshes.pt")
        if saved is not None:
            self.jac.events = list(saved["events"])
            self.log.replay(self.jac, int(saved["refreshes"]))
            if int(saved["reach"]) != self.jac.reach:
                self.jac.set_reach(int(saved["reach"]))

    def record(self, history: dict[str, Any]) -> None:
        """The estimate's choice and state into ``history["jacobian"]``."""
        jac = self.jac
        rec = {"mode": self.mode, "describe": jac.describe(), "probes_per_sample": jac.probes_per_sample}
        rec["events"] = list(jac.events)
        if self.mode == "reference":
            rec.update(reach=jac.reach, refreshes=len(jac.refreshed), references=len(jac.references), key=self.key)
        else:
            rec["pattern"] = jac.pattern_state()
        history["jacobian"] = {**rec, **self.info}

    # -- per step ----------------------------------------------------------------------------
    def before(self, batch: Any, history: dict[str, Any]) -> None:
        """Select each window's reference; request an error check when one is due."""
        if self.mode != "reference":
            return
        jac, c = self.jac, self.config
        jac.select(self.plan.index(batch.sim, batch.frame) if len(jac.references) > 1 else None)
        self._step_index = len(history["loss"])
        if c.jac_check_every and self._step_index % c.jac_check_every == 0:
            jac.request_check(torch.Generator().manual_seed(c.seed * 1_000_003 + self._step_index))
        self._checks, self._refreshed = len(jac.checks), len(jac.refreshed)

    def after(self, history: dict[str, Any], changed: bool) -> None:
        """Record the step's checks and refreshes; stop a run whose estimate stays poor."""
        jac = self.jac
        if self.mode == "reference":
            jac._check_generator = None  # a check not consumed (no Jacobian in this window) lapses
            for rec in jac.checks[self._checks :]:
                history.setdefault("jac_error", []).append({"step": self._step_index, **rec.as_dict()})
            for r in jac.refreshed[self._refreshed :]:
                self.log.add(jac.references, r)
            if len(jac.refreshed) != self._refreshed:
                self.log.save(self.lead)
            changed = changed or len(jac.checks) != self._checks
            if jac.poor is not None:
                self.record(history)
                raise zo.JacobianError(
                    f"{jac.poor}: training stopped, the last checkpoint is kept; try --train-set "
                    f"jac_references=frame (dense), a larger jac_frame_reach / jac_max_reach, or --method zo-sol"
                )
        if changed:
            self.record(history)

    # -- the cost model ----------------------------------------------------------------------
    def cost(self) -> str:
        """Evaluations per sample-step of every mode, the one chosen, and ZO-SOL's (the start of training)."""
        c, w, jac = self.config, self.windows, self.jac
        n = math.prod(w.traj.shape[2:])
        steps = math.ceil(len(w) / c.batch_size) * c.epochs * c.batch_size * max(w.m - 1, 1)
        colours = jac.colouring.n_colours if self.mode == "sparse" else None
        k_ref = zo.refjac.lattice_difference_colouring(w.traj.shape[2:], live_reach(c), c.jac_shape).n_colours
        n_refs = len(jac.references) if self.mode == "reference" else 1
        setup = jac.references.evaluations if self.mode == "reference" else n + 1
        costs = jacobian_costs(
            n, {m: self.scheme(m) for m in ("dense", "sparse", "reference")}, colours, k_ref, setup, steps
        )
        shown = {"dense": "dense", "sparse": "sparse coloured", "reference": "reference-subtracted"}
        parts = [f"{shown[k]} {'- (the pattern is dense)' if v is None else v}" for k, v in costs.items()]
        forced = "forced by jac_mode" if c.jac_mode != "auto" else "auto"
        head = (
            f"{jac.describe()}\nJacobian estimates, black-box evaluations per sample-step: {'; '.join(parts)} "
            f"(reference set-up {setup} evaluations for {n_refs} reference(s), spread over {steps} sample-steps); "
            f"chosen: {shown[self.mode]} ({forced})\n"
        )
        if "reference_check" in self.info:
            head += self.info["reference_check"] + "\n"
        note = {"sparse": "sparse", "dense": "dense", "reference": f"reference-subtracted, reach {live_reach(c)}"}
        return head + cost_model(self.d, self.d, c.zo_scheme, jac.probes_per_sample, note[self.mode])
