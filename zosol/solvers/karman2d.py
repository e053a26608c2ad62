"""2-D unsteady wake flow behind a cylinder (Karman vortex street): PhiFlow 3.4 and a direct torch twin.

This is the ``karman2d`` scenario of Solver-in-the-Loop (Um et al. 2020), used by DeepZero's
ZO-SOL benchmark: incompressible Navier-Stokes in a 200 x 100 channel, a cylinder of radius 10
centred at (50, 50), constant inflow ``U`` (default 1) on the left, open outflow on the right and
closed no-slip walls at the top and bottom.

Numerics (one call of ``step`` advances ``dt``; each of ``substeps`` sub-steps does)::

    v <- semi-Lagrangian advection of v by itself       (phi.physics.advect.semi_lagrangian)
    v <- v + tau * nu * laplace(v)                       (explicit diffusion, nu per sample)
    v <- pressure projection with the cylinder as an Obstacle (phi.physics.fluid.make_incompressible)

Boundaries (velocity extrapolation of the StaggeredGrid):
    ``x-``: Dirichlet inflow (U, 0);  ``x+``: zero gradient (open outflow);
    ``y``: closed no-slip walls (both components 0).  Free slip would be closer to SOL's set-up, but
    PhiFlow 3.4's pressure projection does not converge with a combine_by_direction extrapolation.

**State layout: exact staggered (MAC) values in a plain (B, 2, H, W) tensor**, channels
``('vx', 'vy')``, ``H = ny`` rows (y) and ``W = nx`` columns (x), cells of size ``dx = 200 / nx``,
``dy = 100 / ny``:

* ``state[:, 0, j, i]`` = x-velocity on the face at ``x = (i + 1) dx``, ``y = (j + 0.5) dy``, i.e.
  the *right* face of cell (j, i).  These are exactly PhiFlow's stored x-faces (the left-most face
  ``x = 0`` is the Dirichlet inflow and is not a degree of freedom).
* ``state[:, 1, j, i]`` = y-velocity on the face at ``x = (i + 0.5) dx``, ``y = j dy``, i.e. the
  *bottom* face of cell (j, i), for ``j >= 1`` (PhiFlow's ny - 1 interior y-faces).  Row ``j = 0`` is
  the bottom wall, where the wall condition fixes ``vy = 0``: the solver ignores that row on
  input and writes 0 there on output.

No interpolation happens in the conversion, so ``step`` sees exactly the values it returned:
``step(state)`` round-trips (``from_fields(to_fields(s)) == s`` up to the ignored wall row).  A
corrector may perturb any entry; perturbations of the wall row have no effect, perturbations inside
the cylinder are removed by the next projection.  The centred velocity (for plots or features)
is :func:`centered_velocity`.

**Reynolds number.** ``params[:, 0] = Re`` (the raw Reynolds number, float32), ``nu = U D / Re``
with ``D = 2 * radius = 20``.  Explicit diffusion is applied per sample and is stable while
``nu * tau * (2/dx^2 + 2/dy^2) <= 1``; lower Re raise UsageError (no silent clamping).  At the
paper's Re (1.6e5 .. 5.12e6) ``nu * tau / dx^2 ~ 1e-5 .. 1e-4``: the physical viscosity is tiny
next to the numerical diffusion of semi-Lagrangian advection, so trajectories of different Re
differ little and mostly through the seeded perturbation of the initial state (as in SOL, where the
Re channel is still fed to the corrector).  :meth:`Karman2DScenario.corrector_features` turns Re
into one constant channel ``log10(Re) - 6``.

**Two implementations of one step.**  :class:`Karman2D` runs it on PhiFlow 3.4 (the reference solver,
and the coarse one with ``coarse="phiflow"``); :class:`DirectKarman2D` (``karman2d_direct``) writes
the same three stages out in torch and solves the pressure with a band LU of the fixed pressure
matrix, factored once (the default coarse solver; ``reference="direct"`` also uses it on the
reference grid).  On the same states the two agree to float32
round-off once PhiFlow's iterative solve is tight (``docs/results.md``).

**PhiFlow pressure.** No warm start (the state is velocity only, so there is no hidden pressure state and
batched calls equal per-sample calls up to solver tolerance); ``Solve('auto', tol, tol)`` with
``tol = 1e-4`` (CG from a zero guess; the pressure solve dominates the cost).
A pressure solve that does not converge raises :class:`solvers.base.SolverError`: inside
``jit_compile`` PhiFlow does not raise NotConverged (checked only while tracing, and not even
then), so after each step the divergence of the result away from the cylinder is checked
(> max(10 tol, 1e-5) -> SolverError), as are NaN/inf and |v| > ``blowup`` U (both solvers).

The PhiFlow step is one ``phiml.math.jit_compile``-d function whose Fields are built from raw
tensors inside the trace (eager PhiFlow is ~10x slower).  It retraces once per new batch size;
keep batch sizes stable.  Autograd flows through both steps (FO-SOL); ``blackbox()`` gives the no-grad
view.  The direct step's autograd is exact: the pressure solve's backward is a solve with the
transposed factor.  Its only non-smooth points are those of semi-Lagrangian advection itself
(bilinear interpolation has kinks where a look-up lands exactly on a grid line, e.g. zero-velocity
faces inside the cylinder), as in PhiFlow.

**Speed (one CPU thread).** ``step`` runs with at most ``threads`` (default 1) torch intra-op threads
and restores the caller's setting afterwards (on the shared 2-core machine PhiFlow's sparse CG with 2
threads was ~50x slower).  Speed of both steps: ``docs/results.md``.
Backward passes (FO-SOL) run outside the step and use the caller's thread setting: call
``torch.set_num_threads(1)`` in training scripts on such machines.

**Presets.** ``default``: 256x128 reference restricted to 64x32 (the paper's grids), 300 warm-up steps,
100 frames, 6 training / 5 test simulations at the paper's Re.  ``paper``: 1000 warm-up
steps and 500 frames.  How good the ``default`` reference is (``experiments/karman2d_reference.py``) and
how long its generation takes: ``docs/results.md``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from ..errors import UsageError
from ..options import option
from . import karman2d_direct as direct
from .base import Scenario, ScenarioConfig, Solver, SolverError

# PhiFlow's pressure matrix goes through torch.sparse_csr_tensor, which warns that invariant checks
# are off and that CSR support is beta: harmless here, and noise in every command's output.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
__all__ = [
    "WakeSolver",
    "Karman2D",
    "DirectKarman2D",
    "restrict",
    "prolong",
    "uniform_state",
    "Karman2DConfig",
    "Karman2DScenario",
    "centered_velocity",
    "vorticity",
    "strouhal_number",
]

#: domain and cylinder of the SOL / DeepZero set-up
LENGTH, HEIGHT = 200.0, 100.0
RADIUS, CENTER = 10.0, (50.0, 50.0)


def _phi():
    """Import PhiFlow lazily (slow import) with the torch backend."""
    from phi.torch import flow  # noqa: F401  (selects the torch backend)

    return flow


class WakeSolver(Solver):
    """What the PhiFlow and the direct wake-flow steps share: the grid, the cylinder, the boundary
    conditions, the Reynolds-number check, the thread cap and the blow-up check.

    ``step(state, params)``: ``state`` (B, 2, ny, nx) float32 in the staggered layout of the module
    docstring; ``params`` (B, 1) = Reynolds number per sample.  Returns (B, 2, ny, nx).

    Args:
        nx, ny: cells in x and y (the domain is 200 x 100; use nx = 2 ny for square cells).
        dt: time advanced per ``step``.  substeps: equal sub-steps per ``step``.
        inflow: inflow speed U.  diffusion: apply explicit viscous diffusion (False: inviscid apart
            from numerics).  blowup: |v| above ``blowup * U`` (or NaN) raises SolverError.
        threads: torch intra-op threads used during a CPU step (the previous setting is restored
            afterwards); None leaves torch's setting alone.
    """

    channels = ("vx", "vy")
    num_params = 1

    def __init__(
        self,
        nx: int,
        ny: int,
        dt: float = 1.0,
        *,
        substeps: int = 1,
        inflow: float = 1.0,
        length: float = LENGTH,
        height: float = HEIGHT,
        radius: float = RADIUS,
        center: Sequence[float] = CENTER,
        diffusion: bool = True,
        blowup: float = 50.0,
        threads: int | None = 1,
    ):
        for name, v in (("nx", nx), ("ny", ny)):
            if int(v) != v or v < 4:
                raise UsageError(f"{type(self).__name__}: {name} must be an integer >= 4, got {v}")
        for name, v in (("dt", dt), ("inflow", inflow), ("length", length), ("height", height), ("radius", radius)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UsageError(f"{type(self).__name__}: {name} must be a positive number, got {v}")
        if int(substeps) != substeps or substeps < 1:
            raise UsageError(f"{type(self).__name__}: substeps must be an integer >= 1, got {substeps}")
        if threads is not None and (int(threads) != threads or threads < 1):
            raise UsageError(f"{type(self).__name__}: threads must be None or an integer >= 1, got {threads}")
        self.threads = None if threads is None else int(threads)
        self.nx, self.ny = int(nx), int(ny)
        self.dt, self.substeps, self.inflow = float(dt), int(substeps), float(inflow)
        self.length, self.height, self.radius = float(length), float(height), float(radius)
        self.center = (float(center[0]), float(center[1]))
        self.diffusion, self.blowup = bool(diffusion), float(blowup)
        self.dx, self.dy = self.length / self.nx, self.height / self.ny
        self.spatial_shape = (self.ny, self.nx)
        #: cell centres; vx lives at (x + dx/2, y), vy at (x, y - dy/2) (see module docstring)
        self.coords = {
            "x": (torch.arange(self.nx, dtype=torch.float32) + 0.5) * self.dx,
            "y": (torch.arange(self.ny, dtype=torch.float32) + 0.5) * self.dy,
        }
        self.diameter = 2 * self.radius
        # explicit diffusion is stable for nu * tau * (2/dx^2 + 2/dy^2) <= 1
        tau = self.dt / self.substeps
        self.min_re = self.inflow * self.diameter * tau * (2 / self.dx**2 + 2 / self.dy**2)

    @abstractmethod
    def _step_impl(self, state: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """One ``dt`` from validated inputs; nu (B,) = kinematic viscosity per sample."""

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        re = params[:, 0]
        with torch.no_grad():
            bad = ~(re.detach() >= self.min_re)
            if bool(bad.any()):
                raise UsageError(
                    f"{type(self).__name__}: Re={re[bad].tolist()} below {self.min_re:.4g}, where explicit "
                    f"diffusion on this grid (dx={self.dx:.4g}, dt/substep={self.dt / self.substeps:.4g}) is "
                    f"unstable; raise Re or substeps"
                )
        nu = (self.inflow * self.diameter / re).to(state.dtype)
        # cap torch's intra-op threads during the step (restored afterwards; see "Speed" in the
        # module docstring): 2 threads on the shared 2-core CPU made the PhiFlow step ~50x slower
        before = torch.get_num_threads()
        cap = self.threads is not None and state.device.type == "cpu" and before > self.threads
        if cap:
            torch.set_num_threads(self.threads)
        try:
            out = self._step_impl(state, nu)
        finally:
            if cap:
                torch.set_num_threads(before)
        with torch.no_grad():
            vmax = out.detach().abs().amax()
            if not bool(torch.isfinite(vmax)) or float(vmax) > self.blowup * self.inflow:
                raise SolverError(
                    f"{type(self).__name__} ({self.nx}x{self.ny}): velocity reached {float(vmax):.3g} (> "
                    f"{self.blowup:g} U or NaN/inf): the pressure solve failed or the state diverged"
                )
        return out.to(state.dtype)

    def divergence(self, state: torch.Tensor) -> torch.Tensor:
        """Cell divergence (B, H, W) of a staggered state (inflow U on the left face, walls 0)."""
        return direct.divergence(state, self.dx, self.dy, self.inflow)

    def _far_mask(self) -> torch.Tensor:
        """(H, W) bool: cells whose faces are all clear of the cylinder."""
        xc, yc = self.coords["x"], self.coords["y"]
        r = ((xc[None] - self.center[0]) ** 2 + (yc[:, None] - self.center[1]) ** 2).sqrt()
        return r > self.radius + 1.5 * max(self.dx, self.dy)

    # -- helpers ---------------------------------------------------------------------------
    def uniform_state(self, batch: int = 1) -> torch.Tensor:
        """Uniform flow (U, 0) outside the cylinder, 0 inside: (batch, 2, ny, nx)."""
        return uniform_state(self.nx, self.ny, batch, self.inflow, self.length, self.height, self.center, self.radius)

    def describe(self):
        d = super().describe()
        d.update(
            substeps=self.substeps,
            inflow=self.inflow,
            diffusion=self.diffusion,
            threads=self.threads,
            layout="staggered: vx right faces, vy bottom faces (row 0 = wall)",
        )
        return d


class Karman2D(WakeSolver):
    """The wake flow on PhiFlow 3.4 (torch backend, ``jit_compile``): the reference solver, and the
    coarse one with ``coarse="phiflow"``.  Arguments of :class:`WakeSolver`, plus

    Args:
        tol: absolute and relative tolerance of the pressure solve.
        max_iterations: iteration cap of the pressure solve (beyond it: SolverError).
        solve_method: PhiFlow's solve method (default 'auto').
    """

    def __init__(
        self,
        nx: int,
        ny: int,
        dt: float = 1.0,
        *,
        tol: float = 1e-4,
        max_iterations: int = 2000,
        solve_method: str = "auto",
        **kwargs,
    ):
        super().__init__(nx, ny, dt, **kwargs)
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise UsageError(f"Karman2D: tol must be a positive number, got {tol}")
        self.tol, self.max_iterations, self.solve_method = float(tol), int(max_iterations), solve_method
        self._jit = None

    # -- conversion between the (B, 2, H, W) tensor and PhiFlow ---------------------------------
    def _build(self):
        flow = _phi()
        from phiml.math import extrapolation as ex

        math_, Solve = flow.math, flow.Solve
        # top/bottom: closed no-slip walls (ZERO).  Free slip (combine_by_direction(normal=ZERO,
        # tangential=ZERO_GRADIENT)) is accepted by StaggeredGrid but make_incompressible's pressure
        # solve does not converge with it in PhiFlow 3.4 (eager: NotConverged; jit: silent blow-up).
        bc = {"x-": flow.vec(x=self.inflow, y=0.0), "x+": flow.ZERO_GRADIENT, "y": ex.ZERO}
        bounds = flow.Box(x=self.length, y=self.height)
        obstacle = flow.Obstacle(flow.Sphere(x=self.center[0], y=self.center[1], radius=self.radius))
        tau = self.dt / self.substeps
        nx, ny = self.nx, self.ny
        solve = Solve(self.solve_method, self.tol, self.tol, max_iterations=self.max_iterations)
        diffusion = self.diffusion

        def step_fn(vx, vy, nu):
            """vx (b, x=nx, y=ny), vy (b, x=nx, y=ny-1), nu (b,) -> vx, vy (same shapes)."""
            values = math_.stack([vx, vy], math_.dual(vector="x,y"))
            v = flow.StaggeredGrid(values, bc, bounds, x=nx, y=ny)
            for _ in range(self.substeps):
                v = flow.advect.semi_lagrangian(v, v, tau)
                if diffusion:
                    v = flow.diffuse.explicit(v, nu, tau)
                v, _p = flow.fluid.make_incompressible(v, (obstacle,), solve)
            return v.values[{"~vector": "x"}], v.values[{"~vector": "y"}]

        self._jit = math_.jit_compile(step_fn)

    def _step_impl(self, state: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        if self._jit is None:
            self._build()
        math_ = _phi().math
        vx = math_.tensor(state[:, 0].transpose(1, 2), math_.batch("b"), math_.spatial("x,y"))
        vy = math_.tensor(state[:, 1, 1:].transpose(1, 2), math_.batch("b"), math_.spatial("x,y"))
        try:
            vx2, vy2 = self._jit(vx, vy, math_.tensor(nu, math_.batch("b")))
        except math_.ConvergenceException as e:
            raise SolverError(
                f"Karman2D ({self.nx}x{self.ny}): pressure solve '{self.solve_method}' did not converge to "
                f"tol {self.tol:g} within {self.max_iterations} iterations ({type(e).__name__}: "
                f"{str(e)[:200]}); the state is probably diverging"
            ) from e
        vx_n, vy_n = vx2.native("b,y,x"), vy2.native("b,y,x")
        out = torch.stack([vx_n, torch.cat([torch.zeros_like(vy_n[:, :1]), vy_n], 1)], 1)
        # inside jit_compile PhiFlow checks convergence only while tracing: a solve that fails later
        # returns garbage silently, so check the projection's result here
        with torch.no_grad():
            finite = bool(torch.isfinite(out).all())
            div = (self.divergence(out.detach()) * self._far_mask()).abs().amax()
        limit = max(10 * self.tol, 1e-5)
        if finite and not bool(div <= limit):
            raise SolverError(
                f"Karman2D ({self.nx}x{self.ny}): pressure solve '{self.solve_method}' did not converge "
                f"(max |div v| = {float(div):.3g} > {limit:.3g} after the projection; tol {self.tol:g}, "
                f"max_iterations {self.max_iterations}); the state may be diverging"
            )
        return out

    def describe(self):
        d = super().describe()
        d.update(tol=self.tol, pressure=f"PhiFlow Solve('{self.solve_method}', {self.tol:g})")
        return d


class DirectKarman2D(WakeSolver):
    """The same step as :class:`Karman2D` in plain torch, the pressure matrix factored once
    (:mod:`zosol.solvers.karman2d_direct`): the default coarse solver (``coarse="direct"``).

    Exact pressure solve (no tolerance), cost independent of the state, and differentiable: autograd
    flows through advection and diffusion, and the solve's backward pass is a solve with the
    transposed factor.  Arguments of :class:`WakeSolver`.  Agrees with PhiFlow's step (tight
    tolerance) to float32 round-off; see the module docstring ("Direct coarse step").
    """

    def __init__(self, nx: int, ny: int, dt: float = 1.0, **kwargs):
        super().__init__(nx, ny, dt, **kwargs)
        masks = direct.obstacle_masks(self.nx, self.ny, self.length, self.height, self.center, self.radius)
        self.lu = direct.PressureLU(masks["hard"], masks["active"], self.dx, self.dy)
        self.masks = {k: v.float() for k, v in masks.items()}

    def _masks(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(like.device, like.dtype) for k, v in self.masks.items()}

    def _step_impl(self, state: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        tau = self.dt / self.substeps
        masks = self._masks(state)
        v = state
        for _ in range(self.substeps):
            v = direct.advect(v, tau, self.dx, self.dy, self.inflow)
            if self.diffusion:
                v = direct.diffuse(v, nu * tau, self.dx, self.dy, self.inflow)
            v = direct.project(v, masks, self.lu, self.dx, self.dy, self.inflow)
        return v

    def describe(self):
        d = super().describe()
        d.update(pressure="band LU (LAPACK dgbtrf), factored once")
        return d


def uniform_state(
    nx: int,
    ny: int,
    batch: int = 1,
    inflow: float = 1.0,
    length: float = LENGTH,
    height: float = HEIGHT,
    center: Sequence[float] = CENTER,
    radius: float = RADIUS,
) -> torch.Tensor:
    """Uniform flow (U, 0) with vx = 0 on the faces inside the cylinder: (batch, 2, ny, nx), staggered."""
    s = torch.zeros(batch, 2, ny, nx)
    xf = (torch.arange(nx) + 1.0) * (length / nx)
    yc = (torch.arange(ny) + 0.5) * (height / ny)
    inside = (xf[None, :] - center[0]) ** 2 + (yc[:, None] - center[1]) ** 2 < radius**2
    s[:, 0] = torch.where(inside, 0.0, inflow)
    return s


def restrict(fine: torch.Tensor, r: int) -> torch.Tensor:
    """Face-flux-conserving restriction of staggered states (B, 2, r H, r W) -> (B, 2, H, W): a coarse
    face's value is the mean of the r fine faces that tile it (see ``Karman2DScenario.downsample``)."""
    b, c, hf, wf = fine.shape
    if c != 2 or hf % r or wf % r:
        raise UsageError(
            f"karman2d.restrict: expected (B, 2, H, W) with H, W multiples of {r}, got {tuple(fine.shape)}"
        )
    h, w = hf // r, wf // r
    vx = fine[:, 0, :, r - 1 :: r].reshape(b, h, r, w).mean(2)
    vy = fine[:, 1, ::r, :].reshape(b, h, w, r).mean(3)
    return torch.stack([vx, vy], 1)


def prolong(coarse: torch.Tensor, inflow: float = 1.0) -> torch.Tensor:
    """Staggered states (B, 2, H, W) -> (B, 2, 2H, 2W) on the twice finer grid: fine faces on a coarse
    face copy it, fine faces half-way between two coarse faces average them (inflow ``U`` left of the
    first column, wall 0 above the last row); ``restrict(prolong(s), 2) == s``.  Not divergence-free
    on the fine grid: the fine solver's first projection makes it so."""
    vx, vy = coarse[:, 0], coarse[:, 1]
    left = torch.cat([torch.full_like(vx[:, :, :1], inflow), vx[:, :, :-1]], 2)
    fx = torch.stack([(left + vx) / 2, vx], 3).flatten(2).repeat_interleave(2, 1)
    vy = torch.cat([torch.zeros_like(vy[:, :1]), vy[:, 1:]], 1)
    up = torch.cat([vy[:, 1:], torch.zeros_like(vy[:, :1])], 1)
    fy = torch.stack([vy, (vy + up) / 2], 2).flatten(1, 2).repeat_interleave(2, 2)
    return torch.stack([fx, fy], 1)


def centered_velocity(state: torch.Tensor) -> torch.Tensor:
    """Staggered state (B, 2, H, W) -> cell-centred velocity (B, 2, H, W) by averaging face pairs
    (left x-face of column 0 and the top wall use the inflow value 1 / the wall value 0)."""
    vx, vy = state[:, 0], state[:, 1].clone()
    vy[:, 0] = 0
    left = torch.cat([torch.ones_like(vx[:, :, :1]), vx[:, :, :-1]], 2)
    up = torch.cat([vy[:, 1:], torch.zeros_like(vy[:, :1])], 1)
    return torch.stack([(vx + left) / 2, (vy + up) / 2], 1)


def vorticity(state: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """z-vorticity dvy/dx - dvx/dy of a staggered state (B, 2, H, W): (B, H-1, W-1) at interior
    cell corners (x = (i+1) dx, y = (j+1) dy)."""
    vx, vy = state[:, 0], state[:, 1]
    dvy_dx = (vy[:, 1:, 1:] - vy[:, 1:, :-1]) / dx
    dvx_dy = (vx[:, 1:, :-1] - vx[:, :-1, :-1]) / dy
    return dvy_dx - dvx_dy


def strouhal_number(signal: torch.Tensor, dt: float, diameter: float = 2 * RADIUS, inflow: float = 1.0) -> float:
    """St = f D / U from a probe time series (T,) by the peak of its (mean-removed, Hann-windowed)
    spectrum, refined by parabolic interpolation; 0 when the signal does not oscillate."""
    s = signal.double() - signal.double().mean()
    if float(s.abs().max()) < 1e-8:
        return 0.0
    n = s.numel()
    w = torch.hann_window(n, dtype=torch.float64)
    nfft = 8 * n
    spec = torch.fft.rfft(s * w, n=nfft).abs()
    spec[0] = 0
    k = int(spec.argmax())
    if 0 < k < spec.numel() - 1:
        a, b, c = spec[k - 1].item(), spec[k].item(), spec[k + 1].item()
        denom = a - 2 * b + c
        k = k + (0.5 * (a - c) / denom if denom != 0 else 0.0)
    f = k / (nfft * dt)
    return f * diameter / inflow


# --------------------------------------------------------------------------------------------
# Scenario

#: solver kinds for the config fields ``coarse`` and ``reference``: "direct" (:class:`DirectKarman2D`,
#: torch step, pressure by a factored band LU) or "phiflow" (:class:`Karman2D`, PhiFlow 3.4)
#: the solvers a karman2d scenario can use for its reference and its coarse step
SolverKind = Literal["direct", "phiflow"]
SOLVER_KINDS: tuple[str, ...] = get_args(SolverKind)

_PAPER_TRAIN_RE = tuple(1.6e5 * 2**i for i in range(6))  # 1.6e5 .. 5.12e6
_PAPER_TEST_RE = tuple(2.4e5 * 2**i for i in range(5))  # 2.4e5 .. 3.84e6


def _grid_ratio(c: Karman2DConfig) -> str | None:
    """Constraint: the reference grid is the coarse grid refined by one integer ratio in x and y."""
    if c.n_ref_x % c.n_coarse_x or c.n_ref_y % c.n_coarse_y:
        return (
            f"reference grid {c.n_ref_x}x{c.n_ref_y} must be a multiple of the coarse "
            f"grid {c.n_coarse_x}x{c.n_coarse_y}"
        )
    if c.n_ref_x // c.n_coarse_x != c.n_ref_y // c.n_coarse_y:
        return "the reference/coarse ratio must be the same in x and y"
    return None


def _positive_reynolds(c: Karman2DConfig) -> str | None:
    """Constraint: both splits have Reynolds numbers, all positive."""
    if not c.train_re or not c.test_re or min(c.train_re + c.test_re) <= 0:
        return f"train_re/test_re must be non-empty tuples of positive Reynolds numbers, got {c.train_re} / {c.test_re}"
    return None


@dataclasses.dataclass
class Karman2DConfig(ScenarioConfig):
    """Wake flow: reference on ``n_ref_x`` x ``n_ref_y`` cells, conservatively averaged to the coarse
    grid ``n_coarse_x`` x ``n_coarse_y`` on which the coarse solver runs (same numerics, same dt).

    ``train_re`` / ``test_re``: Reynolds numbers of the simulations; simulation i of a split gets
    ``re[i % len(re)]`` (seed ``seed + i`` / ``seed + 10000 + i``).  ``perturbation``: amplitude
    (relative to U) of the seeded smooth cross-stream bump behind the cylinder that breaks the
    symmetry so shedding starts early.  ``ref_substeps`` / ``coarse_substeps``: sub-steps per dt.
    """

    n_ref_x: int = option(128, "reference grid cells in x", gt=0)
    n_ref_y: int = option(64, "reference grid cells in y", gt=0)
    n_coarse_x: int = option(64, "coarse grid cells in x", gt=0)
    n_coarse_y: int = option(32, "coarse grid cells in y", gt=0)
    dt: float = option(1.0, "time step of a frame", gt=0)
    inflow: float = option(1.0, "inflow velocity U", gt=0)
    ref_substeps: int = option(1, "reference sub-steps per dt", gt=0)
    coarse_substeps: int = option(1, "coarse sub-steps per dt", gt=0)
    tol: float = option(1e-4, "pressure solve tolerance", gt=0)
    perturbation: float = option(0.5, "amplitude of the symmetry-breaking bump (relative to U)", ge=0)
    diffusion: bool = option(True, "explicit viscous diffusion")
    coarse: SolverKind = option(
        "direct", "coarse solver: direct (torch step with a factored pressure solve, differentiable) or phiflow"
    )
    reference: SolverKind = option("phiflow", "reference solver: phiflow or direct")
    train_re: tuple = option(_PAPER_TRAIN_RE, "Reynolds numbers of the training simulations")
    test_re: tuple = option(_PAPER_TEST_RE, "Reynolds numbers of the test simulations")

    constraints = (_grid_ratio, _positive_reynolds)

    def __post_init__(self):
        self.train_re = tuple(float(r) for r in self.train_re)
        self.test_re = tuple(float(r) for r in self.test_re)


#: karman2d's ``default`` training preset (``large`` widens the CNN and trains longer)
_DEFAULT_TRAINING = dict(
    width=4, depth=3, kernel=5, window=6, batch_size=8, epochs=3, lr=3e-3, zo_sparsity=0.0, grad_checks=3, jac_batch=512
)


class Karman2DScenario(Scenario):
    """Karman vortex street: PhiFlow reference (fine grid) vs the same numerics on the coarse grid."""

    name = "karman2d"
    Config = Karman2DConfig
    description = (
        "2-D wake flow behind a cylinder (SOL / DeepZero), PhiFlow staggered grid, semi-Lagrangian "
        "advection + pressure projection; params = Reynolds number"
    )
    padding_mode = "replicate"  # not periodic: corrector convolutions extend the boundary values
    # Training budgets.  default: the README table -- a 910-parameter CNN (width 4, depth 3, kernel 5)
    # so that dense central-difference ZO-SOL (1,820 perturbed windows per step) fits a 2-core CPU:
    # ~40 CPU-s per ZO-SOL step (m = 6, batch 8), 3 epochs = 216 steps for every method.
    # jac_batch 512: a ZO-JAC-SOL Jacobian call's colour probes in one black-box call, no padding
    # (8 x 18 with the default frame fields, 8 x 50 with jac_references=global).
    # large: a 10,388-parameter CNN (width 18) trained through the black box with ZO-JAC-SOL's
    # reference-subtracted Jacobians (ZO-SOL would need 20,776 perturbed windows per step).
    # paper: the experiments/karman2d_paper.py run (GPU): a wider CNN, sparse ZO-SOL as DeepZero.
    train_presets = {
        "tiny": dict(kernel=3),
        "default": _DEFAULT_TRAINING,
        "large": {**_DEFAULT_TRAINING, "width": 18, "epochs": 10},
        "paper": dict(
            model="cnn", width=16, depth=3, kernel=5, window=4, batch_size=16, epochs=100, lr=1e-3, zo_sparsity=0.9
        ),
    }
    presets = {
        # seconds: for tests
        "tiny": dict(
            n_ref_x=64,
            n_ref_y=32,
            n_coarse_x=32,
            n_coarse_y=16,
            frames=8,
            warmup=8,
            train_sims=2,
            test_sims=1,
            train_re=_PAPER_TRAIN_RE[:2],
            test_re=_PAPER_TEST_RE[:1],
        ),
        # 13.5 min with the PhiFlow reference on a quiet 2-core CPU (measured 13:34, 1 thread, --batch 11); paper's Re
        "default": dict(
            n_ref_x=256, n_ref_y=128, n_coarse_x=64, n_coarse_y=32, frames=100, warmup=300, train_sims=6, test_sims=5
        ),
        # SOL / DeepZero sizes: 256x128 -> 64x32, 1000 warm-up steps, 500 frames
        "paper": dict(
            n_ref_x=256, n_ref_y=128, n_coarse_x=64, n_coarse_y=32, frames=500, warmup=1000, train_sims=6, test_sims=5
        ),
    }

    def _solver(self, kind: str, nx: int, ny: int, substeps: int) -> WakeSolver:
        c = self.config
        common = dict(substeps=substeps, inflow=c.inflow, diffusion=c.diffusion)
        if kind == "phiflow":
            return Karman2D(nx, ny, c.dt, tol=c.tol, **common)
        return DirectKarman2D(nx, ny, c.dt, **common)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {"reference": (2, c.n_ref_y, c.n_ref_x), "coarse": (2, c.n_coarse_y, c.n_coarse_x)}

    def reference_substeps(self) -> int:
        return 20 * self.config.ref_substeps  # pressure-solve iterations make a PhiFlow step costly

    def reference_solver(self) -> WakeSolver:
        """The reference grid's solver: PhiFlow's :class:`Karman2D` (``reference="phiflow"``, the
        default) or the same numerics in :class:`DirectKarman2D` (``reference="direct"``)."""
        c = self.config
        return self._solver(c.reference, c.n_ref_x, c.n_ref_y, c.ref_substeps)

    def coarse_solver(self) -> WakeSolver:
        """The coarse grid's solver: :class:`DirectKarman2D` (``coarse="direct"``, the default; built and
        factored once per scenario object) or PhiFlow's :class:`Karman2D` (``coarse="phiflow"``)."""
        c = self.config
        if c.coarse == "phiflow":
            return self._solver("phiflow", c.n_coarse_x, c.n_coarse_y, c.coarse_substeps)
        if getattr(self, "_direct", None) is None:
            self._direct = self._solver("direct", c.n_coarse_x, c.n_coarse_y, c.coarse_substeps)
        return self._direct

    @property
    def ratio(self) -> int:
        return self.config.n_ref_x // self.config.n_coarse_x

    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        """Face-flux-conserving restriction of staggered states (B, 2, r H, r W) -> (B, 2, H, W).

        A coarse x-face (right face of coarse cell (J, I)) coincides with the r fine x-faces
        ``fine[:, 0, J r : (J+1) r, (I+1) r - 1]``; its value is their mean, so the flux through
        every coarse face (and hence through any vertical line of faces, and the divergence of
        every coarse cell) equals the fine one.  y-faces likewise: ``fine[:, 1, J r, I r : (I+1) r]``.
        """
        c = self.config
        if fine.dim() != 4 or tuple(fine.shape[1:]) != (2, c.n_ref_y, c.n_ref_x):
            raise UsageError(f"karman2d.downsample: expected (B, 2, {c.n_ref_y}, {c.n_ref_x}), got {tuple(fine.shape)}")
        return restrict(fine, self.ratio)

    def reynolds(self, seed: int) -> float:
        """Reynolds number of the simulation with ``seed`` (train: seed + i, test: seed + 10000 + i)."""
        c = self.config
        i = int(seed) - c.seed
        if i >= 10_000:
            return c.test_re[(i - 10_000) % len(c.test_re)]
        return c.train_re[i % len(c.train_re)]

    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform flow plus a seeded smooth cross-stream bump behind the cylinder: state (2, H, W) on
        the reference grid (staggered layout), params (1,) = [Re]."""
        c = self.config
        g = torch.Generator().manual_seed(int(seed))
        amp = c.perturbation * c.inflow * (0.5 + 0.5 * torch.rand((), generator=g).item())
        sign = 1.0 if torch.rand((), generator=g).item() < 0.5 else -1.0
        x0 = CENTER[0] + 2 * RADIUS * (1.0 + torch.rand((), generator=g).item())  # 20..40 behind centre
        y0 = CENTER[1] + RADIUS * (torch.rand((), generator=g).item() - 0.5)
        state = uniform_state(c.n_ref_x, c.n_ref_y, 1, c.inflow)[0]
        xc = (torch.arange(c.n_ref_x) + 0.5) * (LENGTH / c.n_ref_x)
        yf = torch.arange(c.n_ref_y) * (HEIGHT / c.n_ref_y)
        bump = torch.exp(-((xc[None, :] - x0) ** 2 + (yf[:, None] - y0) ** 2) / (2 * RADIUS**2))
        state[1] = sign * amp * bump
        state[1, 0] = 0.0
        return state.float(), torch.tensor([self.reynolds(seed)], dtype=torch.float32)

    def corrector_features(self, params: torch.Tensor) -> torch.Tensor:
        """One constant channel per sample, ``log10(Re) - 6`` (about -0.8 .. 0.7 for the paper Re): (B, 1, H, W)."""
        c = self.config
        f = torch.log10(params[:, :1].clamp_min(1e-30)) - 6.0
        return f[:, :, None, None].expand(-1, 1, c.n_coarse_y, c.n_coarse_x).to(params.dtype)
