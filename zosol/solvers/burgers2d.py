"""2-D forced viscous Burgers ``u_t + (u . grad) u = nu lap(u) + f(x, y)`` on a periodic square.

The set-up of Solver-in-the-Loop (Um et al. 2020): a periodic square of side ``length`` (32),
``nu = 0.1``, ``dt = 0.1``, velocity forced by ``forcing_sines`` (20) static random sine waves.

Layout
------
* state ``(B, 2, H, W)``: channel 0 is ``u`` (x-velocity), channel 1 is ``v`` (y-velocity);
  index ``H`` runs along **y**, index ``W`` along **x** (``state[b, c, j, i]`` lives at
  ``(x_i, y_j)``).  The grid is cell-centred: ``coords['x'] = (i + 0.5) h``,
  ``coords['y'] = (j + 0.5) h``, ``h = length / n``; values are cell averages.
* params ``(B, 5 * forcing_sines)``: for sine ``s`` the five numbers ``params[:, 5 s : 5 s + 5]`` are
  ``(a_x, a_y, k_x, k_y, phase)``; the forcing is
  ``f(x, y) = sum_s (a_x, a_y)_s sin(2 pi (k_x x + k_y y) / length + phase_s)`` with integer
  wave numbers (stored as floats).  :func:`forcing_field` returns its exact *cell averages* on any
  grid, so the block average of the reference grid's forcing equals the coarse grid's forcing.

Numerics (a hand-written torch step, differentiable, batched over simulations)
----------------------------------------------------------------------------
Each sub-step of length ``tau`` is the PhiFlow operator splitting
``advect -> diffuse.explicit -> + tau f``:

* advection: semi-Lagrangian with an Euler back-trace ``x - tau u(x)`` and bilinear periodic
  interpolation (``grid_sample`` on a wrap-padded grid) == PhiFlow's ``advect.semi_lagrangian``;
  or MacCormack (forward + backward semi-Lagrangian, error correction, clamp to the back-traced
  cell's 2x2 neighbourhood) == PhiFlow's ``advect.mac_cormack``;
* diffusion: explicit Euler with the 5-point ``torch.roll`` Laplacian == ``diffuse.explicit``.

``backend="phiflow"`` runs the same splitting with PhiFlow 3.4's torch backend
(``CenteredGrid``, periodic, ``jit_compile``), for validation.

* High fidelity (reference): MacCormack on the fine grid, ``cfl = 0.5`` sub-steps.
* Low fidelity (coarse): plain semi-Lagrangian on the coarse grid, one sub-step per ``dt`` in the
  usual regime (the SOL coarse solver).  Bilinear semi-Lagrangian adds numerical viscosity of
  about ``|u| h / 2`` (~0.5 at h = 1, five times ``nu``): the error a corrector must remove.

Every call advances exactly ``dt``; each sample takes ``max(min_substeps, needed)`` equal
sub-steps with ``needed = ceil(dt (max|u|/h + 4 nu/h^2) / cfl)``; ``min_substeps`` is ``needed``
at ``u_max``, so in the usual regime the count is fixed and state-independent (smooth finite
differences) and a batched call equals per-sample calls.

Validation numbers (reference vs a finer run, torch vs PhiFlow, speed): ``docs/results.md``.

Note on conservation: the 2-D Burgers equation in advective form does **not** conserve the
mean velocity in general: ``d/dt <u> = <u div u>``, zero only while the flow is divergence-free
(shear flows ``u(y)`` keep their mean exactly).  The diffusion and forcing parts conserve it
exactly (zero-mean forcing, periodic Laplacian); the tests check both statements.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..options import option
from .base import Scenario, ScenarioConfig, Solver, SolverDivergedError, multiple_of

__all__ = ["Burgers2D", "Burgers2DConfig", "Burgers2DScenario", "forcing_field", "PARAMS_PER_SINE"]

#: (a_x, a_y, k_x, k_y, phase) per forcing sine
PARAMS_PER_SINE = 5


def forcing_field(params: torch.Tensor, n: int, length: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact cell averages of the static sine forcing on an ``n x n`` cell-centred grid.

    ``params``: (B, 5 S) laid out as ``(a_x, a_y, k_x, k_y, phase)`` per sine; returns (B, 2, n, n)
    with index 2 along y and index 3 along x.  The cell average of ``sin(w . x + p)`` over a
    square cell of side ``h`` is ``sin(w . x_c + p) sinc(k_x / n) sinc(k_y / n)`` (torch's
    normalised sinc), which makes the forcing exactly consistent between grids under block averaging.
    """
    dtype = dtype or params.dtype
    p = params.to(dtype).reshape(params.shape[0], -1, PARAMS_PER_SINE)  # (B, S, 5)
    amp, kx, ky, phase = p[..., 0:2], p[..., 2], p[..., 3], p[..., 4]
    h = length / n
    xc = (torch.arange(n, dtype=dtype, device=params.device) + 0.5) * h  # (n,)
    wx = (2 * math.pi / length) * kx[..., None] * xc  # (B, S, n)   phase along x
    wy = (2 * math.pi / length) * ky[..., None] * xc  # (B, S, n)   phase along y
    ax = wx + phase[..., None]
    # sin(ax + wy) = sin(ax) cos(wy) + cos(ax) sin(wy): separable, O(S n^2) multiply-adds
    scale = torch.sinc(kx / n) * torch.sinc(ky / n)  # (B, S)
    a = amp * scale[..., None]  # (B, S, 2)
    b, s = a.shape[:2]
    # (B, S, 2, n_y) x (B, S, n_x) contracted over S with one batched matmul per term
    lhs = torch.cat([a[..., None] * torch.cos(wy)[:, :, None], a[..., None] * torch.sin(wy)[:, :, None]], dim=1)
    rhs = torch.cat([torch.sin(ax), torch.cos(ax)], dim=1)  # (B, 2S, n_x)
    f = torch.bmm(lhs.reshape(b, 2 * s, 2 * n).transpose(1, 2), rhs)  # (B, 2 n_y, n_x)
    return f.reshape(b, 2, n, n)


def substeps_needed(h: float, nu: float, dt: float, cfl: float, umax: float | torch.Tensor):
    """Equal sub-steps per ``dt`` keeping velocities up to ``umax`` (float or (B,) tensor) within the
    Courant number ``cfl`` on square cells of width ``h`` (advection + 2-D explicit diffusion)."""
    rate = umax / h + 4 * nu / h**2  # advective + 2-D diffusive inverse time scales
    n = dt * rate / cfl
    return math.ceil(n - 1e-9) if isinstance(n, float) else torch.ceil(n - 1e-9).long()


def _wrap_pad(field: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H+1, W+1) with the first row/column repeated at the end."""
    field = torch.cat([field, field[:, :, :1]], dim=2)
    return torch.cat([field, field[:, :, :, :1]], dim=3)


class Burgers2D(Solver):
    """Periodic 2-D viscous Burgers; ``step(state, params)``, state (B, 2, n, n) = (u, v) with
    index 2 along y and index 3 along x; params (B, 5 n_sines) (see :func:`forcing_field`).

    Args:
        n: cells per side.  nu: viscosity (> 0).  dt: time advanced per ``step``.
        length: side of the periodic square.
        advection: ``"semi_lagrangian"`` (first order) or ``"maccormack"`` (second order, limited).
        cfl: Courant number of each sub-step (counts advection + explicit diffusion, <= 1).
        n_sines: number of forcing sines (0: unforced, params may be None).
        u_max: velocity bound that fixes the usual number of sub-steps.
        backend: ``"torch"`` (hand-written, fast) or ``"phiflow"`` (PhiFlow 3.4, jit-compiled).
    """

    channels = ("u", "v")
    check_finite = True  # NaN/inf from a finite state: SolverDivergedError

    def __init__(
        self,
        n: int,
        nu: float = 0.1,
        dt: float = 0.1,
        length: float = 32.0,
        *,
        advection: str = "semi_lagrangian",
        cfl: float = 1.0,
        n_sines: int = 20,
        u_max: float = 2.0,
        backend: str = "torch",
        dtype: torch.dtype = torch.float32,
    ):
        if int(n) != n or n < 4:
            raise UsageError(f"Burgers2D: n must be an integer >= 4, got {n}")
        for name, v in (("nu", nu), ("dt", dt), ("length", length), ("cfl", cfl), ("u_max", u_max)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UsageError(f"Burgers2D: {name} must be a positive number, got {v}")
        if cfl > 1:
            raise UsageError(f"Burgers2D: cfl must be <= 1 (explicit diffusion stability), got {cfl}")
        if advection not in ("semi_lagrangian", "maccormack"):
            raise UsageError(f"Burgers2D: advection must be 'semi_lagrangian' or 'maccormack', got {advection!r}")
        if backend not in ("torch", "phiflow"):
            raise UsageError(f"Burgers2D: backend must be 'torch' or 'phiflow', got {backend!r}")
        if n_sines < 0:
            raise UsageError(f"Burgers2D: n_sines must be >= 0, got {n_sines}")
        self.n, self.nu, self.dt, self.length = int(n), float(nu), float(dt), float(length)
        self.advection, self.cfl, self.u_max, self.backend = advection, float(cfl), float(u_max), backend
        self.n_sines = int(n_sines)
        self.num_params = PARAMS_PER_SINE * self.n_sines
        self.h = self.length / self.n
        self.spatial_shape = (self.n, self.n)
        c = (torch.arange(self.n, dtype=dtype) + 0.5) * self.h
        self.coords = {"x": c, "y": c.clone()}
        self.min_substeps = self._substeps_for(self.u_max)
        self.stencil_reach = (self._reach(),) * 2
        self._phi_cache: dict[Any, Any] = {}
        self._forcing_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"Burgers2D(n={self.n}, nu={self.nu}, dt={self.dt}, length={self.length}, "
            f"advection={self.advection!r}, cfl={self.cfl}, backend={self.backend!r})"
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "nu": self.nu,
            "length": self.length,
            "advection": self.advection,
            "cfl": self.cfl,
            "n_sines": self.n_sines,
            "min_substeps": self.min_substeps,
            "backend": self.backend,
            "layout": "(B, [u, v], y, x)",
        }

    def _reach(self) -> int:
        """Stencil half-width of one step in the usual regime: per sub-step the back-trace moves at
        most ``u_max tau / h`` cells and bilinear interpolation touches the cells around it
        (MacCormack traces forward and back and clamps to a 2x2 neighbourhood: about twice as far),
        then the explicit Laplacian reaches one more cell."""
        advect = max(1, math.ceil(self.u_max * self.dt / self.min_substeps / self.h))
        per_substep = (2 * advect + 1 if self.advection == "maccormack" else advect) + 1
        return self.min_substeps * per_substep

    def _substeps_for(self, umax: float | torch.Tensor):
        return substeps_needed(self.h, self.nu, self.dt, self.cfl, umax)

    def forcing(self, params: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Forcing on this solver's grid, (B, 2, n, n), or None when unforced.

        The last result is cached and reused when ``params`` has equal values (compared
        element-wise, so the cache cannot go stale); params that require grad are never cached.
        """
        if not self.n_sines or params is None:
            return None
        if params.requires_grad:
            return forcing_field(params, self.n, self.length, dtype)
        hit = self._forcing_cache
        if (
            hit is not None
            and hit[0].shape == params.shape
            and hit[0].dtype == params.dtype
            and hit[0].device == params.device
            and hit[1].dtype == dtype
            and torch.equal(hit[0], params)
        ):
            return hit[1]
        f = forcing_field(params, self.n, self.length, dtype)
        self._forcing_cache = (params.detach().clone(), f)
        return f

    # -- the torch step ---------------------------------------------------------------------
    def _sample(self, field: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Periodic interpolation of ``field`` (B, C, n, n) at positions ``pos`` (B, n, n, 2) given in
        index units (x, y) with cell centre i at i; returns (B, C, n, n)."""
        n = self.n
        p = torch.remainder(pos, n)  # in [0, n]
        grid = p * (2.0 / n) - 1.0  # align_corners=True on the (n+1)-wide wrap-padded grid
        return F.grid_sample(_wrap_pad(field), grid, mode=mode, padding_mode="border", align_corners=True)

    def _base_pos(self, like: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(self.n, dtype=like.dtype, device=like.device)
        return torch.stack(torch.meshgrid(idx, idx, indexing="xy"), dim=-1)  # (n, n, 2): [..., 0] = x index

    def _advect(self, u: torch.Tensor, tau: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        disp = (tau / self.h) * u.permute(0, 2, 3, 1)  # (B, n, n, 2) displacement in cells, (x, y)
        back = base - disp
        adv = self._sample(u, back)
        if self.advection == "semi_lagrangian":
            return adv
        # MacCormack (PhiFlow's advect.mac_cormack): advect the result back along +tau u, correct,
        # clamp to the values of the 2x2 cell neighbourhood of the back-traced point.
        bwd = self._sample(adv, base + disp)
        new = adv + 0.5 * (u - bwd)
        right = torch.roll(u, -1, 3)
        lo = torch.minimum(torch.minimum(u, right), torch.minimum(torch.roll(u, -1, 2), torch.roll(right, -1, 2)))
        hi = torch.maximum(torch.maximum(u, right), torch.maximum(torch.roll(u, -1, 2), torch.roll(right, -1, 2)))
        corner = torch.floor(torch.remainder(back, self.n)).detach()
        lo = self._sample(lo, corner, mode="nearest")
        hi = self._sample(hi, corner, mode="nearest")
        return torch.minimum(torch.maximum(new, lo), hi)

    def _laplace(self, u: torch.Tensor) -> torch.Tensor:
        return (
            torch.roll(u, 1, 2) + torch.roll(u, -1, 2) + torch.roll(u, 1, 3) + torch.roll(u, -1, 3) - 4 * u
        ) / self.h**2

    def _advance(self, u: torch.Tensor, f: torch.Tensor | None, tau: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        u = self._advect(u, tau, base)
        u = u + (self.nu * tau) * self._laplace(u)
        return u if f is None else u + tau * f

    def _nsub(self, state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            umax = state.detach().abs().amax(dim=(1, 2, 3)).nan_to_num(nan=0.0, posinf=1e30)
            nsub = torch.clamp(self._substeps_for(umax), min=self.min_substeps)  # (B,)
        steps = int(nsub.max()) if nsub.numel() else self.min_substeps
        if steps > 100 * self.min_substeps + 1000:
            raise SolverDivergedError(
                f"Burgers2D: velocity {float(umax.max()):.3g} needs {steps} sub-steps: the state is diverging"
            )
        return nsub

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        nsub = self._nsub(state)
        f = self.forcing(params, state.dtype)
        if f is not None:
            f = f.to(state.device)
        if self.backend == "phiflow":
            return self._step_phiflow(state, f, nsub)
        steps = int(nsub.max())
        tau = (self.dt / nsub.to(state.dtype)).view(-1, 1, 1, 1)
        base = self._base_pos(state)
        u = state
        if bool((nsub == steps).all()):
            for _ in range(steps):
                u = self._advance(u, f, tau, base)
            return u
        for k in range(steps):  # samples with fewer sub-steps stop early
            active = (k < nsub).view(-1, 1, 1, 1)
            u = torch.where(active, self._advance(u, f, tau, base), u)
        return u

    # -- the PhiFlow step (validation) ------------------------------------------------------
    def _phi_fn(self, nsub: int):
        key = nsub
        if key not in self._phi_cache:
            from phi.torch import flow as pf  # slow import: only when asked for

            tau = self.dt / nsub
            box = pf.Box(x=self.length, y=self.length)
            adv = pf.advect.semi_lagrangian if self.advection == "semi_lagrangian" else pf.advect.mac_cormack
            nu = self.nu

            def step(v, f):
                vel = pf.CenteredGrid(v, pf.extrapolation.PERIODIC, bounds=box)
                for _ in range(nsub):
                    vel = adv(vel, vel, tau)
                    vel = pf.diffuse.explicit(vel, nu, tau)
                    if f is not None:
                        vel = vel.with_values(vel.values + tau * f)
                return vel.values

            self._phi_cache[key] = (pf, pf.jit_compile(step))
        return self._phi_cache[key]

    def _step_phiflow(self, state: torch.Tensor, f: torch.Tensor | None, nsub: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(state)
        for k in torch.unique(nsub).tolist():
            idx = (nsub == k).nonzero().flatten()
            pf, fn = self._phi_fn(int(k))
            from phiml import math as pm

            def wrap(t):  # (B, 2, y, x) -> phiml (b, x, y, vector)
                return pm.tensor(t.permute(0, 3, 2, 1), pm.batch("b"), pm.spatial("x,y"), pm.channel(vector="x,y"))

            res = fn(wrap(state[idx]), None if f is None else wrap(f[idx]))
            out[idx] = res.native("b,vector,y,x").to(state.dtype)
        return out


@dataclasses.dataclass
class Burgers2DConfig(ScenarioConfig):
    """Forced viscous 2-D Burgers on the periodic square [0, length)^2.

    Reference: MacCormack + explicit diffusion on ``n_ref^2`` cells with Courant number
    ``cfl_ref`` per sub-step, block-averaged to ``n_coarse^2``; coarse solver: semi-Lagrangian +
    explicit diffusion on ``n_coarse^2`` cells, one sub-step per ``dt`` in the usual regime.

    Initial velocity: ``ic_modes`` random Fourier modes per component with integer wave vectors
    in ``[-ic_kmax, ic_kmax]^2 \\ {0}``, amplitudes ~ U(-1, 1) / |k|, scaled so that max |u, v| is
    ``ic_amplitude``.  Forcing: ``forcing_sines`` sines (0: unforced) with wave vectors in
    ``[-forcing_kmax, forcing_kmax]^2 \\ {0}``, amplitudes (a_x, a_y) ~ U(-A, A) with
    ``A = forcing_amplitude``, phases ~ U(0, 2 pi).
    """

    n_ref: int = option(64, "reference grid cells per side", gt=0)
    n_coarse: int = option(32, "coarse grid cells per side", gt=0)
    nu: float = option(0.1, "viscosity", gt=0)
    dt: float = option(0.1, "time step of a frame", gt=0)
    length: float = option(32.0, "side of the periodic square", gt=0)
    cfl_ref: float = option(0.5, "Courant number of the reference's sub-steps", gt=0, le=1)
    cfl_coarse: float = option(1.0, "Courant number of the coarse solver's sub-steps", gt=0, le=1)
    ic_modes: int = option(6, "random Fourier modes of the initial velocity per component", gt=0)
    ic_kmax: int = option(3, "largest wave number of the initial velocity", ge=1)
    ic_amplitude: float = option(1.0, "max |u, v| of the initial velocity", ge=0)
    forcing_sines: int = option(20, "forcing sines (0: unforced)", ge=0)
    forcing_kmax: int = option(3, "largest wave number of the forcing", ge=1)
    forcing_amplitude: float = option(0.05, "forcing amplitude bound A", ge=0)
    u_max: float = option(2.0, "velocity bound of the solvers' CFL sub-stepping", gt=0)

    constraints = (multiple_of("n_ref", "n_coarse"),)


class Burgers2DScenario(Scenario):
    name = "burgers2d"
    Config = Burgers2DConfig
    description = (
        "2-D forced viscous Burgers (SOL): MacCormack reference on a fine grid vs semi-Lagrangian coarse solver"
    )
    # a 2-D corrector is ~2x (kernel 3) to ~6x (kernel 5) larger than the 1-D one and every sample is
    # 1024 cells: these keep the CPU `default` comparison at minutes (measured 7 min; see README)
    train_presets = {
        "tiny": dict(kernel=3),
        "default": dict(kernel=3, window=2, batch_size=8, epochs=4, zo_sparsity=0.9),
    }
    presets = {
        "tiny": dict(n_ref=32, n_coarse=16, frames=8, train_sims=2, test_sims=2),
        "default": dict(n_ref=64, n_coarse=32, frames=48, train_sims=6, test_sims=3),
        "paper": dict(n_ref=128, n_coarse=32, frames=100, train_sims=10, test_sims=5),
    }

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {"reference": (2, c.n_ref, c.n_ref), "coarse": (2, c.n_coarse, c.n_coarse)}

    def reference_substeps(self) -> int:
        c = self.config
        return 2 * substeps_needed(c.length / c.n_ref, c.nu, c.dt, c.cfl_ref, float(c.u_max))  # MacCormack

    def reference_solver(self, backend: str = "torch") -> Burgers2D:
        c = self.config
        return Burgers2D(
            c.n_ref,
            c.nu,
            c.dt,
            c.length,
            advection="maccormack",
            cfl=c.cfl_ref,
            n_sines=c.forcing_sines,
            u_max=c.u_max,
            backend=backend,
        )

    def coarse_solver(self, backend: str = "torch") -> Burgers2D:
        c = self.config
        return Burgers2D(
            c.n_coarse,
            c.nu,
            c.dt,
            c.length,
            advection="semi_lagrangian",
            cfl=c.cfl_coarse,
            n_sines=c.forcing_sines,
            u_max=c.u_max,
            backend=backend,
        )

    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        c = self.config
        if fine.shape[-2:] != (c.n_ref, c.n_ref):
            raise UsageError(f"burgers2d.downsample: expected (..., {c.n_ref}, {c.n_ref}), got {tuple(fine.shape)}")
        r = c.n_ref // c.n_coarse
        return fine.reshape(*fine.shape[:-2], c.n_coarse, r, c.n_coarse, r).mean(dim=(-3, -1))

    @staticmethod
    def _wavevectors(count: int, kmax: int, g: torch.Generator) -> torch.Tensor:
        """(count, 2) integer wave vectors in [-kmax, kmax]^2 without (0, 0)."""
        ks = [(a, b) for a in range(-kmax, kmax + 1) for b in range(-kmax, kmax + 1) if (a, b) != (0, 0)]
        idx = torch.randint(len(ks), (count,), generator=g)
        return torch.tensor(ks, dtype=torch.float64)[idx]

    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        g = torch.Generator().manual_seed(int(seed))
        # initial velocity: random Fourier modes per component, built with the forcing formula
        kic = self._wavevectors(2 * c.ic_modes, c.ic_kmax, g)
        amp = (torch.rand(2 * c.ic_modes, generator=g, dtype=torch.float64) * 2 - 1) / kic.norm(dim=1)
        amp2 = torch.zeros(2 * c.ic_modes, 2, dtype=torch.float64)
        amp2[: c.ic_modes, 0] = amp[: c.ic_modes]
        amp2[c.ic_modes :, 1] = amp[c.ic_modes :]
        ph = 2 * math.pi * torch.rand(2 * c.ic_modes, generator=g, dtype=torch.float64)
        icp = torch.cat([amp2, kic, ph[:, None]], dim=1).reshape(1, -1)
        u0 = forcing_field(icp, c.n_ref, c.length)[0]  # (2, n, n) cell averages, zero mean
        # grid-independent scale (max on a fixed 128^2 grid), so every n_ref gets the same flow
        u0 = c.ic_amplitude * u0 / forcing_field(icp, 128, c.length).abs().max()
        # forcing parameters
        kf = self._wavevectors(c.forcing_sines, c.forcing_kmax, g)
        a = c.forcing_amplitude * (torch.rand(c.forcing_sines, 2, generator=g, dtype=torch.float64) * 2 - 1)
        phase = 2 * math.pi * torch.rand(c.forcing_sines, generator=g, dtype=torch.float64)
        params = torch.cat([a, kf, phase[:, None]], dim=1).reshape(-1)  # (5 S,)
        return u0.float(), params.float()

    def corrector_features(self, params: torch.Tensor) -> torch.Tensor | None:
        """The forcing on the coarse grid: (B, 2, n_coarse, n_coarse), or None when unforced."""
        c = self.config
        if not c.forcing_sines:
            return None
        return forcing_field(params, c.n_coarse, c.length)
