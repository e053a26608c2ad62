#!/usr/bin/env python3
"""1-D viscous Burgers, u_t + (u^2 / 2)_x = nu u_xx on a periodic [0, 2 pi), stepped by py-pde.

py-pde (``pip install py-pde``, or ``pip install -e ".[pypde]"`` in a zosol checkout) compiles
its right-hand side with numba: nothing here can be differentiated, so zosol trains through it
zeroth-order.  It steps one state at a time (py-pde has no batch axis).  Two ways to use it:

* as a **plugin** (in-process): ``PYTHONPATH=solvers zosol compare --plugin burgers1d_pypde
  --scenario burgers1d_pypde --preset tiny``.  Importing this module registers the scenario
  ``burgers1d_pypde``: reference = py-pde on ``N_REF`` cells with RK4 sub-steps, coarse = py-pde
  on ``N_COARSE`` cells with forward-Euler sub-steps (the black box a corrector corrects);
  the reference is averaged onto the coarse grid.
* as an **external program** speaking zosol's protocol (docs/external_solvers.md), without zosol:
  ``python solvers/burgers1d_pypde.py --n 32``; its hello reply says ``"max_batch": 1``, so zosol
  sends one state per request (``ExternalSolver(cmd, processes=N)`` runs N copies).

Each grid size compiles once per process (numba: 10-50 s on a busy CPU), at construction.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys

import numpy as np

DT, NU, N_REF, N_COARSE = 0.05, 0.02, 128, 32


def make_step(n: int, *, nu: float = NU, dt: float = DT, substeps: int = 10, scheme: str = "euler"):
    """A py-pde step ``step(u (1, n), params None) -> (1, n)`` advancing one state by ``dt`` in
    ``substeps`` fixed steps of ``scheme`` ("euler" or "rk4"); compiled here, once."""
    import pde  # py-pde

    grid = pde.CartesianGrid([(0.0, 2 * math.pi)], [n], periodic=True)
    eq = pde.PDE({"u": f"-d_dx(u**2) / 2 + {nu!r} * laplace(u)"})
    field = pde.ScalarField(grid)
    solver = pde.solvers.EulerSolver(eq) if scheme == "euler" else pde.solvers.RungeKuttaSolver(eq)
    stepper = solver.make_stepper(field, dt=dt / substeps)
    stepper(field, 0.0, dt)  # the first call compiles

    def step(u: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
        field.data[:] = u[0]
        stepper(field, 0.0, dt)
        return field.data[None].copy()

    step.__name__ = f"pypde_burgers_{scheme}_{n}"
    return step


def sample(seed: int, n: int = N_REF) -> tuple[np.ndarray, None]:
    """Initial state (1, n): a sum of 4 random sines, zero mean, max |u| = 1; no parameters."""
    rng = np.random.default_rng(seed)
    x = (np.arange(n) + 0.5) * (2 * math.pi / n)
    k = np.arange(1, 5)[:, None]
    u = (rng.random((4, 1)) / k * np.sin(k * x + 2 * math.pi * rng.random((4, 1)))).sum(0)
    u -= u.mean()
    return (u / np.abs(u).max())[None], None


def build(processes: int = 1):
    """The scenario ``burgers1d_pypde`` (reference and coarse solver compiled here, once)."""
    from zosol.solvers import make_scenario

    return make_scenario(
        "burgers1d_pypde",
        reference=make_step(N_REF, scheme="rk4"),
        coarse=make_step(N_COARSE),
        sample=sample,
        dt=DT,
        reference_shape=(N_REF,),
        coarse_shape=(N_COARSE,),
        batched=False,
        frames=32,
        train_sims=8,
        test_sims=3,
        presets={"tiny": dict(frames=8, train_sims=3, test_sims=2)},
        physics={
            "equation": "u_t + (u^2/2)_x = nu u_xx",
            "nu": NU,
            "n_ref": N_REF,
            "n_coarse": N_COARSE,
            "solver": "py-pde",
        },
    )


# ---- the external protocol (docs/external_solvers.md), no zosol needed ----------------------


def _read(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data and len(data) == n else None


def _write(stream, header: dict, payload: bytes = b"") -> None:
    h = json.dumps({**header, "nbytes": len(payload)}).encode()
    stream.write(struct.pack("<I", len(h)) + h + payload)
    stream.flush()


def serve(n: int, scheme: str, substeps: int) -> int:
    step = make_step(n, scheme=scheme, substeps=substeps)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the stream
    while (raw := _read(inp, 4)) is not None:
        header = json.loads(_read(inp, struct.unpack("<I", raw)[0]))
        payload = _read(inp, header["nbytes"]) if header.get("nbytes") else b""
        rid = {"id": header["id"]} if "id" in header else {}  # echoed in every reply
        if header["op"] == "hello":
            x = ((np.arange(n) + 0.5) * (2 * math.pi / n)).tolist()
            _write(
                out,
                {
                    "ok": True,
                    **rid,
                    "protocol": 1,
                    "dt": DT,
                    "channels": ["u"],
                    "spatial_shape": [n],
                    "num_params": 0,
                    "max_batch": 1,
                    "coords": {"x": x},
                    "name": f"py-pde burgers {scheme}",
                },
            )
        elif header["op"] == "quit":
            _write(out, {"ok": True, **rid})
            return 0
        elif header["op"] == "step" and header["shape"][0] == 1:
            dtype = np.dtype(header["dtype"])
            u = np.frombuffer(payload, dtype, int(np.prod(header["shape"]))).reshape(header["shape"])
            new = step(u[0].astype(np.float64)).astype(dtype)[None]
            _write(out, {"ok": True, **rid, "shape": list(new.shape), "dtype": header["dtype"]}, new.tobytes())
        else:
            _write(
                out,
                {
                    "ok": False,
                    **rid,
                    "error": f"cannot do {header.get('op')} with shape {header.get('shape')} "
                    f"(one state per step: max_batch 1)",
                },
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=N_COARSE, help="cells (default: %(default)s)")
    ap.add_argument("--scheme", choices=["euler", "rk4"], default="euler")
    ap.add_argument("--substeps", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        return serve(args.n, args.scheme, args.substeps)
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    try:
        from zosol.solvers import register
    except ImportError:  # used as a plain module without zosol: nothing to register
        pass
    else:
        register("burgers1d_pypde", build)
