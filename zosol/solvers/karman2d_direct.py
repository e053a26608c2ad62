"""The wake flow's coarse step in plain torch with a factored pressure matrix (``karman2d`` ``coarse="direct"``).

Same numerics as the PhiFlow 3.4 step of :class:`zosol.solvers.karman2d.Karman2D`, written out on the
staggered (MAC) layout of that module (``state[:, 0]`` = x-velocity on the right face of each cell,
``state[:, 1]`` = y-velocity on the bottom face, row 0 = wall):

1. **Semi-Lagrangian advection** (``advect.semi_lagrangian``, Euler back-trace): every face value is
   looked up at ``face - dt * v(face)`` by bilinear interpolation.  The other velocity component at a
   face is the mean of its 4 neighbours.  Outside the grid each component is padded by one layer as
   PhiFlow's extrapolation says (vx: inflow ``U`` at ``x = 0``, copy at the outflow, 0 at the walls;
   vy: 0 at the inflow and the walls, copy at the outflow) and clamped beyond it.
2. **Explicit diffusion** (``diffuse.explicit``): ``v + nu tau laplace(v)`` with the same padding, on
   every face except the outflow faces of vx (PhiFlow's Laplacian of the staggered grid leaves them out,
   so they keep their value).
3. **Pressure projection around the cylinder** (``fluid.make_incompressible``): faces are scaled by
   ``1 - solid`` (PhiFlow's soft obstacle mask), the pressure solves ``A p = active * div v`` with
   ``A p = div(hard * grad p)`` on active cells (identity inside the cylinder; p = 0 beyond the outflow,
   zero flux through the inflow and the walls), then ``v <- v - hard * grad p``.  The masks
   ``solid``, ``hard`` (faces between two fluid cells) and ``active`` (fluid cells) are read from
   PhiFlow once (:func:`obstacle_masks`), so the geometry is PhiFlow's to the bit.

The obstacle does not move, so ``A`` is fixed: it is factored once (sparse band LU, LAPACK via SciPy,
float64; :class:`PressureLU`) and every step solves all batch members as right-hand sides of that one
factorization --
exact up to round-off, no iteration count that depends on the state, no solver tolerance.
:class:`PressureSolve` is the differentiable twin of the solve: its backward pass is one solve with
the transposed factor (``A^T y = g``), so autograd through the whole step is exact (FO-SOL) and finite
differences of the step see no solver noise (ZO-SOL).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.linalg import lapack

from ..errors import UsageError

__all__ = [
    "obstacle_masks",
    "pressure_matrix",
    "PressureLU",
    "PressureSolve",
    "pad_components",
    "advect",
    "diffuse",
    "project",
    "cg_solve",
]


def obstacle_masks(
    nx: int, ny: int, length: float, height: float, center: tuple[float, float], radius: float
) -> dict[str, torch.Tensor]:
    """PhiFlow's obstacle masks of ``make_incompressible`` on the staggered layout, float64.

    Returns ``solid`` (2, ny, nx): fraction of each face inside the cylinder (soft mask,
    ``resample(..., soft=True, balance=1)``); ``hard`` (2, ny, nx): 1 on faces between two accessible
    cells (and on the outflow faces), else 0; ``active`` (ny, nx): 1 on cells whose centre is outside
    the cylinder.  Row 0 of the y-channel (the wall) is 0 in ``solid`` and ``hard``.
    """
    from phi import field as phi_field
    from phi.geom import union
    from phi.physics.fluid import _accessible_extrapolation
    from phi.torch import flow
    from phiml.math import extrapolation as ex

    bc = {"x-": flow.vec(x=1.0, y=0.0), "x+": flow.ZERO_GRADIENT, "y": ex.ZERO}
    v = flow.StaggeredGrid(0.0, bc, flow.Box(x=length, y=height), x=nx, y=ny)
    geometry = flow.Sphere(x=center[0], y=center[1], radius=radius)
    solid = flow.resample(geometry, v, soft=True, balance=1)
    accessible = flow.Field(v.geometry, ~union([geometry]), _accessible_extrapolation(v.extrapolation))
    hard = phi_field.stagger(accessible, flow.math.minimum, v.boundary, at=v.sampled_at, dims=v.vector.item_names)

    def faces(f) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(f.values[{"~vector": "x"}].numpy("y,x")), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(f.values[{"~vector": "y"}].numpy("y,x")), dtype=torch.float64)
        return torch.stack([x, torch.cat([torch.zeros(1, nx, dtype=torch.float64), y], 0)])

    active = torch.as_tensor(np.asarray(accessible.values.numpy("y,x")), dtype=torch.float64)
    return {"solid": faces(solid), "hard": faces(hard), "active": active}


def pressure_matrix(hard: torch.Tensor, active: torch.Tensor, dx: float, dy: float) -> sp.csc_matrix:
    """The pressure operator ``A`` (ny*nx, ny*nx) of the projection, cells numbered ``j * nx + i``.

    Active rows: ``(A p)_c = div(hard * grad p)_c``; the outflow face of the last column sees p = 0
    beyond the domain, inflow and wall faces carry no flux.  Inactive rows (inside the cylinder): identity.
    """
    ny, nx = active.shape
    hx, hy = hard[0].numpy(), hard[1].numpy()
    idx = np.arange(ny * nx).reshape(ny, nx)
    rows, cols, vals = [], [], []

    def couple(a: np.ndarray, b: np.ndarray | None, w: np.ndarray) -> None:
        """Face of weight w between cells a and b (None: p = 0 beyond it): flux w (p_b - p_a) into a."""
        rows.append(a), cols.append(a), vals.append(-w)
        if b is not None:
            rows.extend([a, b, b]), cols.extend([b, b, a]), vals.extend([w, -w, w])

    couple(idx[:, :-1].ravel(), idx[:, 1:].ravel(), hx[:, :-1].ravel() / dx**2)  # interior x-faces
    couple(idx[:, -1], None, hx[:, -1] / dx**2)  # outflow faces
    couple(idx[:-1, :].ravel(), idx[1:, :].ravel(), hy[1:, :].ravel() / dy**2)  # interior y-faces
    a = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(ny * nx, ny * nx)
    ).tocsr()
    act = active.numpy().ravel()
    a = sp.diags(act) @ a + sp.diags(1.0 - act)
    return a.tocsc()


class PressureLU:
    """LU factorization of :func:`pressure_matrix`, once; solves batches of right-hand sides.

    The cells are renumbered column by column (``i * ny + j``), which makes ``A`` a band matrix of
    half-bandwidth ``ny``; LAPACK's band LU (``dgbtrf``, partial pivoting) factors it and ``dgbtrs``
    solves all right-hand sides of a batch in one call.  (SuperLU, ``scipy.sparse.linalg.splu``, gives
    the same solution but its multi-right-hand-side solve was ~6x slower here: 203 ms vs 32 ms for
    64 right-hand sides at 64x32, one thread.)

    ``solve(rhs, transpose)``: rhs (B, ny, nx) -> p (B, ny, nx) of rhs's dtype and device (float64 on
    the CPU inside).  ``transpose=True`` solves ``A^T p = rhs`` (the adjoint, for the backward pass).
    """

    def __init__(self, hard: torch.Tensor, active: torch.Tensor, dx: float, dy: float):
        self.matrix = pressure_matrix(hard, active, dx, dy)
        self.shape = ny, nx = tuple(active.shape)
        self._order = np.arange(ny * nx).reshape(ny, nx).T.ravel()  # band position -> cell index
        banded = self.matrix[self._order][:, self._order].tocoo()
        self._k = k = ny
        ab = np.zeros((3 * k + 1, ny * nx))
        ab[2 * k + banded.row - banded.col, banded.col] = banded.data
        self._lu, self._piv, info = lapack.dgbtrf(ab, k, k)
        if info != 0:
            raise UsageError(
                f"PressureLU: the pressure matrix is singular (LAPACK dgbtrf info {info}); check the obstacle masks"
            )
        self._inverses: dict = {}
        #: right-hand sides per LAPACK call (see ``solve``)
        self.block = 64

    def solve(self, rhs: torch.Tensor, transpose: bool = False, dense: bool | None = None) -> torch.Tensor:
        """Solve for a batch rhs (B, ny, nx).  ``dense`` (default: on any device but the CPU) multiplies
        by the explicit inverse ``A^{-1}`` (computed once from the factor, cached per device and dtype)
        instead: one batched matrix product, which is what suits a GPU."""
        if dense if dense is not None else rhs.device.type != "cpu":
            inv = self._inverse(rhs.device, rhs.dtype)
            flat = rhs.reshape(rhs.shape[0], -1)
            return (flat @ (inv if transpose else inv.T)).reshape(rhs.shape)
        b = rhs.shape[0]
        flat = rhs.detach().reshape(b, -1).to("cpu", torch.float64).numpy()
        out = np.empty_like(flat)
        # blocks of right-hand sides that stay in cache: 1024 at once were ~15x slower per sample than 128
        for i in range(0, b, self.block):
            x, info = lapack.dgbtrs(
                self._lu,
                self._k,
                self._k,
                np.asfortranarray(flat[i : i + self.block, self._order].T),
                self._piv,
                trans=1 if transpose else 0,
            )
            out[i : i + self.block, self._order] = x.T
        return torch.from_numpy(out).reshape(b, *self.shape).to(rhs.device, rhs.dtype)

    def _inverse(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._inverses:
            n = self.shape[0] * self.shape[1]
            eye = torch.eye(n, dtype=torch.float64).reshape(n, *self.shape)
            self._inverses[key] = self.solve(eye, dense=False).reshape(n, n).T.contiguous().to(device, dtype)
        return self._inverses[key]


class PressureSolve(torch.autograd.Function):
    """``p = A^{-1} rhs`` for rhs (B, ny, nx); backward ``grad_rhs = A^{-T} grad_p`` (the same factor)."""

    @staticmethod
    def forward(ctx, rhs: torch.Tensor, lu: PressureLU) -> torch.Tensor:
        ctx.lu = lu
        return lu.solve(rhs)

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        return ctx.lu.solve(grad_p, transpose=True), None


def cg_solve(matrix: sp.spmatrix, rhs: torch.Tensor, tol: float = 1e-10, max_iterations: int = 20_000) -> torch.Tensor:
    """Iterative check of the direct solve: batched conjugate gradients on ``-A`` (symmetric positive
    definite), float64.  rhs (B, ny, nx) -> p (B, ny, nx); raises RuntimeError when not converged."""
    neg = torch.sparse_csr_tensor(
        *(
            torch.from_numpy(np.asarray(t))
            for t in ((-matrix).tocsr().indptr, (-matrix).tocsr().indices, (-matrix).tocsr().data)
        ),
        size=matrix.shape,
        dtype=torch.float64,
    )
    b = -rhs.detach().reshape(rhs.shape[0], -1).double().T
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = (r * r).sum(0)
    stop = tol**2 * (b * b).sum(0).clamp_min(1e-300)
    for _ in range(max_iterations):
        if bool((rr <= stop).all()):
            return x.T.reshape(rhs.shape).to(rhs.dtype)
        ad = neg @ d
        alpha = rr / (d * ad).sum(0)
        x, r = x + alpha * d, r - alpha * ad
        rr_new = (r * r).sum(0)
        d, rr = r + rr_new / rr * d, rr_new
    raise RuntimeError(f"cg_solve: no convergence to {tol:g} in {max_iterations} iterations")


def pad_components(state: torch.Tensor, inflow: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each velocity component with PhiFlow's one-layer boundary padding.

    ``state`` (B, 2, H, W) -> ``xp`` (B, H+2, W+2): vx at x = c dx, y = (r - 1/2) dy (column 0 = inflow
    ``U``, last column a copy of the outflow faces, rows 0 and H+1 = 0); ``yp`` (B, H+1, W+2): vy at
    x = (c - 1/2) dx, y = r dy (rows 0 and H = walls = 0, column 0 = 0, last column a copy)."""
    vx, vy = state[:, 0], state[:, 1]
    xp = torch.cat([torch.full_like(vx[:, :, :1], inflow), vx, vx[:, :, -1:]], 2)
    xp = F.pad(xp, (0, 0, 1, 1))
    yf = torch.cat([torch.zeros_like(vy[:, :1]), vy[:, 1:], torch.zeros_like(vy[:, :1])], 1)
    yp = torch.cat([torch.zeros_like(yf[:, :, :1]), yf, yf[:, :, -1:]], 2)
    return xp, yp


def _bilinear(grid: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of grid (B, R, C) at fractional indices r, c (B, H, W), clamped to the grid."""
    rows, cols = grid.shape[1:]
    coords = torch.stack([2 * c / (cols - 1) - 1, 2 * r / (rows - 1) - 1], -1)
    return F.grid_sample(grid[:, None], coords, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def advect(state: torch.Tensor, dt: float, dx: float, dy: float, inflow: float) -> torch.Tensor:
    """Semi-Lagrangian self-advection of a staggered state (B, 2, H, W) by ``dt`` (row 0 of vy stays 0)."""
    b, _, h, w = state.shape
    xp, yp = pad_components(state, inflow)
    dev, dtype = state.device, state.dtype
    jj = torch.arange(h, device=dev, dtype=dtype)[:, None]
    ii = torch.arange(w, device=dev, dtype=dtype)[None, :]
    # x-faces at ((i + 1) dx, (j + 1/2) dy): xp index (r, c) = (j + 1, i + 1)
    vy_at_x = 0.25 * (yp[:, :-1, 1:-1] + yp[:, :-1, 2:] + yp[:, 1:, 1:-1] + yp[:, 1:, 2:])
    new_x = _bilinear(xp, jj + 1 - dt * vy_at_x / dy, ii + 1 - dt * state[:, 0] / dx)
    # y-faces at ((i + 1/2) dx, j dy), j >= 1: yp index (r, c) = (j, i + 1)
    vx_at_y = 0.25 * (xp[:, 1:h, :-2] + xp[:, 1:h, 1:-1] + xp[:, 2 : h + 1, :-2] + xp[:, 2 : h + 1, 1:-1])
    new_y = _bilinear(yp, jj[1:] - dt * state[:, 1, 1:] / dy, ii + 1 - dt * vx_at_y / dx)
    return torch.stack([new_x, torch.cat([torch.zeros_like(new_y[:, :1]), new_y], 1)], 1)


def diffuse(state: torch.Tensor, amount: torch.Tensor, dx: float, dy: float, inflow: float) -> torch.Tensor:
    """Explicit diffusion ``v + amount * laplace(v)``; amount (B,) = nu * tau per sample."""
    xp, yp = pad_components(state, inflow)
    lap_x = (xp[:, 1:-1, 2:] - 2 * state[:, 0] + xp[:, 1:-1, :-2]) / dx**2 + (
        xp[:, 2:, 1:-1] - 2 * state[:, 0] + xp[:, :-2, 1:-1]
    ) / dy**2
    lap_x = torch.cat(
        [lap_x[:, :, :-1], torch.zeros_like(lap_x[:, :, -1:])], 2
    )  # PhiFlow: outflow faces keep their value
    vy = state[:, 1, 1:]
    lap_y = (yp[:, 1:-1, 2:] - 2 * vy + yp[:, 1:-1, :-2]) / dx**2 + (
        yp[:, 2:, 1:-1] - 2 * vy + yp[:, :-2, 1:-1]
    ) / dy**2
    lap = torch.stack([lap_x, torch.cat([torch.zeros_like(lap_y[:, :1]), lap_y], 1)], 1)
    return state + amount[:, None, None, None] * lap


def divergence(state: torch.Tensor, dx: float, dy: float, inflow: float) -> torch.Tensor:
    """Cell divergence (B, H, W) of a staggered state (inflow ``U`` on the left face, walls 0)."""
    vx = torch.cat([torch.full_like(state[:, 0, :, :1], inflow), state[:, 0]], 2)
    vy = torch.cat([torch.zeros_like(state[:, 1, :1]), state[:, 1, 1:], torch.zeros_like(state[:, 1, :1])], 1)
    return (vx[:, :, 1:] - vx[:, :, :-1]) / dx + (vy[:, 1:] - vy[:, :-1]) / dy


def project(
    state: torch.Tensor, masks: dict[str, torch.Tensor], lu: PressureLU, dx: float, dy: float, inflow: float, solve=None
) -> torch.Tensor:
    """Pressure projection around the obstacle (see module docstring); state (B, 2, H, W).

    ``solve(rhs) -> p`` (B, H, W) defaults to the factored direct solve with its adjoint backward."""
    v = state * (1 - masks["solid"])
    rhs = divergence(v, dx, dy, inflow) * masks["active"]
    p = PressureSolve.apply(rhs, lu) if solve is None else solve(rhs)
    gx = (torch.cat([p[:, :, 1:], torch.zeros_like(p[:, :, :1])], 2) - p) / dx
    gy = torch.cat([torch.zeros_like(p[:, :1]), (p[:, 1:] - p[:, :-1]) / dy], 1)
    return v - masks["hard"] * torch.stack([gx, gy], 1)
