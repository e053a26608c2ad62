"""1-D viscous Burgers ``u_t + u u_x = nu u_xx + f(x)`` on a periodic domain [0, length).

Finite volumes on ``n`` equal cells (``x`` = cell centres).  Convection uses the exact Godunov
flux of ``u^2/2``; diffusion a centred second difference; the forcing ``f(x)`` is a static sum of
sines whose coefficients are the per-simulation parameters.

* High fidelity (the constructor's defaults): MUSCL reconstruction with the van Leer limiter
  (second order) and SSP-RK3 time stepping.
* Low fidelity (``order=1, integrator="euler", cfl=0.9``): piecewise-constant reconstruction
  (first-order upwind) and forward Euler with one sub-step per ``dt`` at the default
  ``dt``/grid: cheap and visibly diffusive on a coarse grid.

Every call advances exactly ``dt``; internally each sample takes ``max(min_substeps, needed)``
equal sub-steps, where ``needed`` follows from that sample's CFL and diffusion limits, so a
batched call equals per-sample calls and the usual case (velocities within ``u_max``) uses a fixed,
state-independent number of sub-steps (which keeps finite differences through the solver smooth).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import UsageError
from ..options import option
from .base import Scenario, ScenarioConfig, Solver, SolverDivergedError, multiple_of

__all__ = ["Burgers1D", "Burgers1DConfig", "Burgers1DScenario", "forcing_field"]


def forcing_field(coeffs: torch.Tensor, x: torch.Tensor, length: float) -> torch.Tensor:
    """Static forcing on cell centres ``x`` (n,) from coefficients (B, 2M): (B, 1, n).

    ``f(x) = sum_{k=1..M} a_k sin(2 pi k x / L) + b_k cos(2 pi k x / L)`` with ``coeffs = [a, b]``.
    """
    m = coeffs.shape[-1] // 2
    k = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    phase = 2 * math.pi / length * k[:, None] * x[None, :]  # (M, n)
    f = coeffs[:, :m].to(x.dtype) @ torch.sin(phase) + coeffs[:, m:].to(x.dtype) @ torch.cos(phase)
    return f[:, None, :]


def substeps_needed(h: float, nu: float, dt: float, cfl: float, umax: float | torch.Tensor):
    """Equal sub-steps per ``dt`` that keep velocities up to ``umax`` (a float or a (B,) tensor)
    within the Courant number ``cfl`` on cells of width ``h``."""
    rate = umax / h + 2 * nu / h**2  # advective + diffusive inverse time scales
    n = dt * rate / cfl
    return math.ceil(n) if isinstance(n, float) else torch.ceil(n).long()


def _van_leer(dl: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
    prod = dl * dr
    pos = prod > 0
    denom = torch.where(pos, dl + dr, torch.ones_like(dl))  # safe: no NaN in the unused branch
    return torch.where(pos, 2 * prod / denom, torch.zeros_like(dl))


def _godunov_flux(ul: torch.Tensor, ur: torch.Tensor) -> torch.Tensor:
    """Exact Riemann flux of f(u) = u^2 / 2 (convex): max(f(max(ul, 0)), f(min(ur, 0)))."""
    return 0.5 * torch.maximum(torch.clamp(ul, min=0) ** 2, torch.clamp(ur, max=0) ** 2)


class Burgers1D(Solver):
    """Periodic 1-D viscous Burgers; ``step(u, params)`` with ``u`` (B, 1, n), ``params`` (B, 2M).

    Args:
        n: number of cells.  nu: viscosity (> 0).  dt: time advanced per ``step``.
        length: domain length.  order: 2 (MUSCL, van Leer) or 1 (upwind).
        integrator: ``"rk3"`` (SSP-RK3) or ``"euler"``.  cfl: Courant number of each sub-step.
        forcing_modes: M, the number of sine/cosine pairs of the forcing (0: unforced).
        u_max: velocity bound that fixes the usual number of sub-steps.
    """

    channels = ("u",)
    check_finite = True  # NaN/inf from a finite state: SolverDivergedError

    def __init__(
        self,
        n: int,
        nu: float,
        dt: float,
        length: float = 2 * math.pi,
        *,
        order: int = 2,
        integrator: str = "rk3",
        cfl: float = 0.4,
        forcing_modes: int = 0,
        u_max: float = 2.0,
        dtype: torch.dtype = torch.float32,
    ):
        if int(n) != n or n < 4:
            raise UsageError(f"Burgers1D: n must be an integer >= 4, got {n}")
        for name, v in (("nu", nu), ("dt", dt), ("length", length), ("cfl", cfl), ("u_max", u_max)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UsageError(f"Burgers1D: {name} must be a positive number, got {v}")
        if order not in (1, 2):
            raise UsageError(f"Burgers1D: order must be 1 or 2, got {order}")
        if integrator not in ("rk3", "euler"):
            raise UsageError(f"Burgers1D: integrator must be 'rk3' or 'euler', got {integrator!r}")
        if forcing_modes < 0:
            raise UsageError(f"Burgers1D: forcing_modes must be >= 0, got {forcing_modes}")
        self.n, self.nu, self.dt, self.length = int(n), float(nu), float(dt), float(length)
        self.order, self.integrator, self.cfl, self.u_max = order, integrator, float(cfl), float(u_max)
        self.forcing_modes = int(forcing_modes)
        self.num_params = 2 * self.forcing_modes
        self.h = self.length / self.n
        self.spatial_shape = (self.n,)
        self.coords = {"x": (torch.arange(self.n, dtype=dtype) + 0.5) * self.h}
        self.min_substeps = self._substeps_for(self.u_max)
        # a right-hand side reaches 1 cell (upwind) or 2 (MUSCL); RK3 applies it 3 times per sub-step
        self.stencil_reach = (self.min_substeps * self.order * (3 if integrator == "rk3" else 1),)

    def _substeps_for(self, umax: float | torch.Tensor):
        return substeps_needed(self.h, self.nu, self.dt, self.cfl, umax)

    def _rhs(self, u: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        left = torch.roll(u, 1, -1)
        right = torch.roll(u, -1, -1)
        if self.order == 2:
            slope = _van_leer(u - left, right - u)
            ul = u + 0.5 * slope  # left state at face i+1/2
            ur = torch.roll(u - 0.5 * slope, -1, -1)  # right state at face i+1/2
        else:
            ul, ur = u, right
        flux = _godunov_flux(ul, ur)
        out = -(flux - torch.roll(flux, 1, -1)) / self.h + self.nu * (right - 2 * u + left) / self.h**2
        return out if f is None else out + f

    def _advance(self, u: torch.Tensor, f: torch.Tensor | None, tau: torch.Tensor) -> torch.Tensor:
        if self.integrator == "euler":
            return u + tau * self._rhs(u, f)
        u1 = u + tau * self._rhs(u, f)
        u2 = 0.75 * u + 0.25 * (u1 + tau * self._rhs(u1, f))
        return u / 3 + 2 / 3 * (u2 + tau * self._rhs(u2, f))

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        f = None
        if self.forcing_modes:
            f = forcing_field(params, self.coords["x"].to(state.device, state.dtype), self.length)
        with torch.no_grad():
            umax = state.detach().abs().amax(dim=(1, 2)).nan_to_num(nan=0.0, posinf=1e30)
            nsub = torch.clamp(self._substeps_for(umax), min=self.min_substeps)  # (B,)
        steps = int(nsub.max())
        if steps > 100 * self.min_substeps + 1000:
            raise SolverDivergedError(
                f"Burgers1D: velocity {float(umax.max()):.3g} needs {steps} sub-steps: the state is diverging"
            )
        tau = (self.dt / nsub.to(state.dtype)).view(-1, 1, 1)
        u = state
        if bool((nsub == steps).all()):
            for _ in range(steps):
                u = self._advance(u, f, tau)
            return u
        for k in range(steps):  # samples with fewer sub-steps stop early
            active = (k < nsub).view(-1, 1, 1)
            u = torch.where(active, self._advance(u, f, tau), u)
        return u


@dataclasses.dataclass
class Burgers1DConfig(ScenarioConfig):
    """Forced viscous Burgers on [0, length): reference MUSCL/RK3 on ``n_ref`` cells averaged to
    ``n_coarse`` cells; coarse solver first-order upwind + forward Euler on ``n_coarse`` cells.

    Initial conditions: sums of ``ic_modes`` sines with random amplitudes and phases, scaled to a
    maximum of ``ic_amplitude``; forcing: ``forcing_modes`` modes with amplitudes ~ 1/sqrt(k)
    scaled to an RMS of ``forcing_amplitude`` and random phases (every simulation is driven
    equally hard; only the shape of the forcing differs).
    """

    n_ref: int = option(512, "reference grid cells", gt=0)
    n_coarse: int = option(32, "coarse grid cells", gt=0)
    nu: float = option(0.01, "viscosity", gt=0)
    dt: float = option(0.05, "time step of a frame", gt=0)
    length: float = option(2 * math.pi, "domain length", gt=0)
    ic_modes: int = option(4, "sine modes of the initial condition", gt=0)
    ic_amplitude: float = option(1.0, "maximum of the initial condition", ge=0)
    forcing_modes: int = option(3, "forcing modes", ge=0)
    forcing_amplitude: float = option(0.3, "RMS of the forcing", ge=0)
    u_max: float = option(2.0, "velocity bound of the solvers' CFL sub-stepping", gt=0)

    constraints = (multiple_of("n_ref", "n_coarse"),)


class Burgers1DScenario(Scenario):
    name = "burgers1d"
    Config = Burgers1DConfig
    description = "1-D forced viscous Burgers, MUSCL/RK3 reference vs first-order upwind/Euler coarse solver"
    presets = {
        "tiny": dict(n_ref=128, n_coarse=16, frames=12, train_sims=3, test_sims=2),
        "default": dict(n_ref=512, n_coarse=32, frames=64, train_sims=16, test_sims=5),
        "paper": dict(n_ref=2048, n_coarse=64, frames=128, train_sims=32, test_sims=10),
    }

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {"reference": (1, c.n_ref), "coarse": (1, c.n_coarse)}

    def reference_substeps(self) -> int:
        c = self.config
        return 3 * substeps_needed(c.length / c.n_ref, c.nu, c.dt, 0.4, float(c.u_max))  # RK3: 3 stages

    def reference_solver(self) -> Burgers1D:
        c = self.config
        return Burgers1D(c.n_ref, c.nu, c.dt, c.length, forcing_modes=c.forcing_modes, u_max=c.u_max)

    def coarse_solver(self) -> Burgers1D:
        c = self.config
        return Burgers1D(
            c.n_coarse,
            c.nu,
            c.dt,
            c.length,
            order=1,
            integrator="euler",
            cfl=0.9,
            forcing_modes=c.forcing_modes,
            u_max=c.u_max,
        )

    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        c = self.config
        r = c.n_ref // c.n_coarse
        return fine.reshape(*fine.shape[:-1], c.n_coarse, r).mean(-1)

    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        g = torch.Generator().manual_seed(int(seed))
        x = (torch.arange(c.n_ref, dtype=torch.float64) + 0.5) * (c.length / c.n_ref)
        k = torch.arange(1, c.ic_modes + 1, dtype=torch.float64)
        amp = torch.rand(c.ic_modes, generator=g, dtype=torch.float64) / k
        phase = 2 * math.pi * torch.rand(c.ic_modes, generator=g, dtype=torch.float64)
        u0 = (amp[:, None] * torch.sin(2 * math.pi / c.length * k[:, None] * x + phase[:, None])).sum(0)
        u0 = u0 - u0.mean()
        u0 = c.ic_amplitude * u0 / u0.abs().max()
        # forcing: a fixed spectrum (amplitude ~ 1/sqrt(k), RMS = forcing_amplitude) with random
        # phases, so every simulation is driven equally hard and only the shape differs
        kf = torch.arange(1, c.forcing_modes + 1, dtype=torch.float64)
        fphase = 2 * math.pi * torch.rand(c.forcing_modes, generator=g, dtype=torch.float64)
        famp = kf.rsqrt()
        famp = c.forcing_amplitude * famp / (0.5 * famp.pow(2).sum()).sqrt().clamp_min(1e-12)
        coeffs = torch.cat([famp * torch.cos(fphase), famp * torch.sin(fphase)])
        return u0[None].float(), coeffs.float()

    def corrector_features(self, params: torch.Tensor) -> torch.Tensor | None:
        if not self.config.forcing_modes:
            return None
        solver = self.coarse_solver()
        return forcing_field(params, solver.coords["x"].to(params.device), self.config.length)
