"""1-D Kuramoto-Sivashinsky ``u_t + (u^2/2)_x + u_xx + u_xxxx = 0`` on a periodic domain [0, length).

Pseudo-spectral in space (``n`` equispaced points ``x_j = j length / n``, real FFTs) and exponential
time differencing in time: in Fourier space ``v_t = L v + N(v)`` with the linear operator
``L(k) = k^2 - k^4`` (diagonal, stiff, integrated exactly by ``exp(h L)``) and the nonlinear term
``N(v) = -(i k / 2) FFT(u^2)``.  Schemes (Cox & Matthews 2002), coefficients by the contour
integrals of Kassam & Trefethen (2005) so that they are accurate for every ``h L`` (no
cancellation near ``L = 0``):

* ``etdrk1`` exponential Euler: ``v+ = e^{hL} v + h phi1(hL) N(v)``                 (first order)
* ``etdrk2`` ETD2RK: a predictor as ETD1, then ``+ h phi2(hL) (N(a) - N(v))``          (second order)
* ``etdrk4`` ETDRK4 (four stages)                                                   (fourth order)

with ``phi1(z) = (e^z - 1)/z``, ``phi2(z) = (e^z - 1 - z)/z^2``.  The mean (k = 0) is conserved;
the Nyquist mode (even ``n``) is damped by ``L`` and receives no nonlinear forcing.  Optional
2/3-rule dealiasing of the nonlinear term (``dealias``).

* High fidelity: ``etdrk4`` on a fine grid with many sub-steps per ``dt`` (resolved: no dealiasing).
* Low fidelity: ``etdrk1`` with 2/3 dealiasing on a few points with 2 sub-steps per ``dt``:
  stable, visibly wrong.

Every call advances exactly ``dt`` with a fixed number of equal sub-steps (state-independent, so
finite differences through the solver are smooth and a batched call equals per-sample calls).
Computations run in the state's dtype (float32 or float64) on the state's device; the
coefficients are computed once in float64 and cast on first use per (device, dtype).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from ..errors import UsageError
from ..options import option
from .base import Scenario, ScenarioConfig, Solver, multiple_of

__all__ = ["KS1D", "KS1DConfig", "KS1DScenario", "etd_coefficients", "SCHEMES"]

#: scheme name -> order of accuracy
SCHEMES = {"etdrk1": 1, "etdrk2": 2, "etdrk4": 4}


def etd_coefficients(hl: torch.Tensor, h: float, scheme: str, points: int = 64) -> dict[str, torch.Tensor]:
    """ETD coefficients for ``hl = h L`` (K,) float64 by Kassam-Trefethen contour means: each
    ``phi(z)`` is the mean of ``phi(z + r)`` over ``points`` points ``r`` on the unit circle around
    ``z`` (exact for entire ``phi``, accurate where the direct formula cancels).  Returns float64
    tensors (K,): ``E`` (and ``E2`` for etdrk4) and the scheme's weights (already times ``h``)."""
    hl = hl.to(torch.float64)
    r = torch.exp(1j * math.pi * (torch.arange(1, points + 1, dtype=torch.float64) - 0.5) / points)
    z = hl[:, None].to(torch.complex128) + r[None, :]  # (K, points)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return h * values.mean(-1).real

    ez = torch.exp(z)
    out = {"E": torch.exp(hl)}
    if scheme == "etdrk1":
        out["phi1"] = mean((ez - 1) / z)
    elif scheme == "etdrk2":
        out["phi1"] = mean((ez - 1) / z)
        out["phi2"] = mean((ez - 1 - z) / z**2)
    elif scheme == "etdrk4":
        out["E2"] = torch.exp(hl / 2)
        out["Q"] = mean((torch.exp(z / 2) - 1) / z)
        out["f1"] = mean((-4 - z + ez * (4 - 3 * z + z**2)) / z**3)
        out["f2"] = mean((2 + z + ez * (z - 2)) / z**3)
        out["f3"] = mean((-4 - 3 * z - z**2 + ez * (4 - z)) / z**3)
    else:
        raise UsageError(f"unknown ETD scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return out


class KS1D(Solver):
    """Periodic 1-D Kuramoto-Sivashinsky; ``step(u)`` with ``u`` (B, 1, n), no parameters.

    Args:
        n: grid points (even, >= 4).
        dt: time advanced per ``step``.
        length: domain length (chaotic at 22; not at every larger length: at 32 the dynamics settle).
        scheme: ``"etdrk1"``, ``"etdrk2"`` or ``"etdrk4"``.
        substeps: equal ETD steps per ``dt``.
        nonlinear: factor of the ``(u^2/2)_x`` term (1: KS; 0: the linear equation, solved exactly).
        dealias: Orszag's 2/3 rule in the nonlinear term (modes above 2/3 of the Nyquist wave number
            are dropped before the square and from the product).
        contour_points: points of the Kassam-Trefethen contour means.
        dtype: dtype of ``coords``.
    """

    channels = ("u",)
    check_finite = True  # NaN/inf from a finite state: SolverDivergedError
    stencil_reach = None  # spectral: every output value depends on every input value (dense Jacobian)

    def __init__(
        self,
        n: int,
        dt: float,
        length: float = 22.0,
        *,
        scheme: str = "etdrk4",
        substeps: int = 1,
        nonlinear: float = 1.0,
        dealias: bool = False,
        contour_points: int = 64,
        dtype: torch.dtype = torch.float32,
    ):
        if int(n) != n or n < 4 or n % 2:
            raise UsageError(f"KS1D: n must be an even integer >= 4, got {n}")
        for name, v in (("dt", dt), ("length", length)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UsageError(f"KS1D: {name} must be a positive number, got {v}")
        if scheme not in SCHEMES:
            raise UsageError(f"KS1D: scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
        if int(substeps) != substeps or substeps < 1:
            raise UsageError(f"KS1D: substeps must be an integer >= 1, got {substeps}")
        self.n, self.dt, self.length = int(n), float(dt), float(length)
        self.scheme, self.substeps, self.nonlinear = scheme, int(substeps), float(nonlinear)
        self.h = self.dt / self.substeps
        self.spatial_shape = (self.n,)
        self.coords = {"x": torch.arange(self.n, dtype=dtype) * (self.length / self.n)}
        k = 2 * math.pi / self.length * torch.arange(self.n // 2 + 1, dtype=torch.float64)  # rfft wave numbers
        self.linear = k**2 - k**4  # L(k), (n/2 + 1,)
        kd = k.clone()
        kd[-1] = 0.0  # the Nyquist mode's derivative is not defined on the grid: no nonlinear forcing
        self.dealias = bool(dealias)
        keep = (torch.arange(kd.numel()) <= self.n // 3).to(torch.float64)  # (n/2 + 1,)
        if self.dealias:
            kd = kd * keep
        self._coeffs64 = etd_coefficients(self.h * self.linear, self.h, scheme, contour_points)
        if self.dealias:
            self._coeffs64["keep"] = keep
        self._coeffs64["g"] = -0.5j * self.nonlinear * kd.to(torch.complex128)  # N(v) = g FFT(u^2)
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def describe(self) -> dict:
        return {**super().describe(), "length": self.length, "scheme": self.scheme, "substeps": self.substeps}

    def _coeffs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
            self._cache[key] = {
                name: c.to(device=device, dtype=cdtype if c.is_complex() else dtype)
                for name, c in self._coeffs64.items()
            }
        return self._cache[key]

    def _nonlinear(self, v: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        u = torch.fft.irfft(v * c["keep"] if self.dealias else v, n=self.n)
        return c["g"] * torch.fft.rfft(u * u)

    def _advance(self, v: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        """One ETD step of the Fourier coefficients ``v`` (B, 1, n/2 + 1)."""
        nv = self._nonlinear(v, c)
        if self.scheme == "etdrk1":
            return c["E"] * v + c["phi1"] * nv
        if self.scheme == "etdrk2":
            a = c["E"] * v + c["phi1"] * nv
            return a + c["phi2"] * (self._nonlinear(a, c) - nv)
        a = c["E2"] * v + c["Q"] * nv
        na = self._nonlinear(a, c)
        b = c["E2"] * v + c["Q"] * na
        nb = self._nonlinear(b, c)
        cc = c["E2"] * a + c["Q"] * (2 * nb - nv)
        nc = self._nonlinear(cc, c)
        return c["E"] * v + c["f1"] * nv + 2 * c["f2"] * (na + nb) + c["f3"] * nc

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        if not state.is_floating_point() or state.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"KS1D: state must be float32 or float64, got {state.dtype}")
        c = self._coeffs(state.device, state.dtype)
        v = torch.fft.rfft(state)
        for _ in range(self.substeps):
            v = self._advance(v, c)
        return torch.fft.irfft(v, n=self.n)


@dataclasses.dataclass
class KS1DConfig(ScenarioConfig):
    """Kuramoto-Sivashinsky on [0, length): reference ETDRK4 on ``n_ref`` points with
    ``ref_substeps`` sub-steps per frame, point-sampled (every ``n_ref / n_coarse``-th point) onto
    the coarse grid; coarse solver ``coarse_scheme`` on ``n_coarse`` points with
    ``coarse_substeps`` sub-steps (its nonlinear term 2/3-dealiased unless ``coarse_dealias`` is
    false).  Initial conditions: ``ic_modes`` Fourier modes with random
    amplitudes ~ 1/k and phases, scaled to a maximum of ``ic_amplitude``; ``warmup`` reference
    frames carry every simulation onto the chaotic attractor before frame 0.
    """

    n_ref: int = option(128, "reference grid points", gt=0)
    n_coarse: int = option(32, "coarse grid points", gt=0)
    length: float = option(22.0, "domain length (chaotic at 22, 26, 36, 64; not at 32)", gt=0)
    dt: float = option(0.5, "time between frames", gt=0)
    ref_scheme: Literal["etdrk1", "etdrk2", "etdrk4"] = option("etdrk4", "time scheme of the reference")
    ref_substeps: int = option(8, "reference ETD steps per frame", gt=0, cap=10**6)
    coarse_scheme: Literal["etdrk1", "etdrk2", "etdrk4"] = option("etdrk1", "time scheme of the coarse solver")
    coarse_substeps: int = option(2, "coarse ETD steps per frame", gt=0, cap=10**6)
    coarse_dealias: bool = option(True, "2/3-rule dealiasing in the coarse solver's nonlinear term")
    ic_modes: int = option(8, "Fourier modes of the initial condition", gt=0)
    ic_amplitude: float = option(1.0, "maximum of the initial condition", ge=0)

    constraints = (multiple_of("n_ref", "n_coarse"),)


class KS1DScenario(Scenario):
    name = "ks1d"
    Config = KS1DConfig
    description = (
        "1-D Kuramoto-Sivashinsky (chaotic), pseudo-spectral ETDRK4 reference vs a coarse dealiased "
        "exponential-Euler solver"
    )
    presets = {
        "tiny": dict(n_ref=64, n_coarse=32, frames=8, warmup=40, train_sims=3, test_sims=2),
        "default": dict(n_ref=128, n_coarse=32, frames=48, warmup=200, train_sims=16, test_sims=48),
    }

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {"reference": (1, c.n_ref), "coarse": (1, c.n_coarse)}

    def reference_substeps(self) -> int:
        c = self.config
        return c.ref_substeps * {"etdrk1": 1, "etdrk2": 2, "etdrk4": 4}[c.ref_scheme]

    def reference_solver(self) -> KS1D:
        c = self.config
        return KS1D(c.n_ref, c.dt, c.length, scheme=c.ref_scheme, substeps=c.ref_substeps)

    def coarse_solver(self) -> KS1D:
        c = self.config
        return KS1D(
            c.n_coarse, c.dt, c.length, scheme=c.coarse_scheme, substeps=c.coarse_substeps, dealias=c.coarse_dealias
        )

    def downsample(self, fine: torch.Tensor) -> torch.Tensor:
        """Point sampling (B, C, n_ref) -> (B, C, n_coarse): the coarse grid's points are every
        r-th reference point (block averaging would shift the grid by (r - 1)/2 fine cells)."""
        c = self.config
        return fine[..., :: c.n_ref // c.n_coarse]

    def sample(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A smooth random start (1, n_ref) float32 (the warm-up carries it onto the attractor); no params (0,)."""
        c = self.config
        g = torch.Generator().manual_seed(int(seed))
        x = torch.arange(c.n_ref, dtype=torch.float64) * (c.length / c.n_ref)
        k = torch.arange(1, c.ic_modes + 1, dtype=torch.float64)
        amp = torch.rand(c.ic_modes, generator=g, dtype=torch.float64) / k
        phase = 2 * math.pi * torch.rand(c.ic_modes, generator=g, dtype=torch.float64)
        u0 = (amp[:, None] * torch.sin(2 * math.pi / c.length * k[:, None] * x + phase[:, None])).sum(0)
        u0 = c.ic_amplitude * u0 / u0.abs().max().clamp_min(1e-12)
        return u0[None].float(), torch.zeros(0)
