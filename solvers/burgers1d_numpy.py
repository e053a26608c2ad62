#!/usr/bin/env python3
"""The burgers1d coarse solver as an *external program* speaking the zosol solver protocol.

This script stands in for a legacy code that zosol can only run, never differentiate: it needs
numpy and nothing else (it never imports zosol or torch when serving), reads requests on stdin
and writes replies on stdout (protocol: ``docs/external_solvers.md``), and logs to stderr.

Numerics: exactly the low-fidelity ``Burgers1D`` of ``zosol/solvers/burgers1d.py`` as
``Burgers1DScenario.coarse_solver()`` builds it (``order=1, integrator="euler"``): periodic finite
volumes on ``n`` cells, exact Godunov flux of ``u^2/2`` on piecewise-constant states
(first-order upwind), centred second difference for ``nu u_xx``, a static sine/cosine forcing
whose ``2 M`` coefficients are the per-simulation parameters, forward Euler with per-sample
sub-steps ``max(min_substeps, ceil(dt (umax/h + 2 nu/h^2) / cfl))``.  Every array operation is
done in the request's dtype in the same order as the torch code, so the float32 results agree
with the in-process solver to the last bit or within a few ulps.

Usage::

    python solvers/burgers1d_numpy.py --n 16 --nu 0.02 --dt 0.05 --forcing-modes 3
    python solvers/burgers1d_numpy.py --bench            # overhead table (needs zosol)

Fault injection (for tests of the adapter; K counts ``step`` requests of this process, so a
restarted process starts healthy again unless the flag applies to it too):

    --crash-after K      on step K+1: print a traceback-like message to stderr, exit code 3
    --hang-after K       on step K+1: sleep forever without answering
    --nan-after K        from step K+1 on: answer with NaN in the state
    --bad-shape-after K  from step K+1 on: answer with one cell missing (a well-formed frame)
    --garbage-after K    on step K+1: write bytes that are no protocol frame
    --error-after K      from step K+1 on: answer {"ok": false, "error": ...}
    --duplicate-after K  on step K+1: send the reply twice (the next request then reads a stale one)
    --slow MS            sleep MS milliseconds in every step (timeouts that are not hangs)

The same faults can be switched on through the environment variable ``ZOSOL_FAULT``, e.g.
``ZOSOL_FAULT="crash-after=7"`` (comma-separated ``name=K`` pairs), which is convenient when
the command line is fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np

PROTOCOL_VERSION = 1
MAX_HEADER = 1 << 20
DTYPES = {"float32": np.float32, "float64": np.float64}


# ---------------------------------------------------------------------------------------------
# Numerics (mirror of zosol/solvers/burgers1d.py, order=1, integrator="euler")


class CoarseBurgers1D:
    """``step(u (B, 1, n), params (B, 2M) | None) -> (B, 1, n)`` advancing exactly ``dt``."""

    def __init__(
        self,
        n: int,
        nu: float,
        dt: float,
        length: float = 2 * math.pi,
        *,
        cfl: float = 0.9,
        forcing_modes: int = 0,
        u_max: float = 2.0,
    ):
        if int(n) != n or n < 4:
            raise ValueError(f"n must be an integer >= 4, got {n}")
        for name, v in (("nu", nu), ("dt", dt), ("length", length), ("cfl", cfl), ("u_max", u_max)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if forcing_modes < 0:
            raise ValueError(f"forcing_modes must be >= 0, got {forcing_modes}")
        self.n, self.nu, self.dt, self.length = int(n), float(nu), float(dt), float(length)
        self.cfl, self.u_max, self.forcing_modes = float(cfl), float(u_max), int(forcing_modes)
        self.num_params = 2 * self.forcing_modes
        self.h = self.length / self.n
        # python-float arithmetic, as in Burgers1D._substeps_for(u_max)
        self.min_substeps = math.ceil(self.dt * (self.u_max / self.h + 2 * self.nu / self.h**2) / self.cfl)

    def x(self, dtype=np.float32) -> np.ndarray:
        return (np.arange(self.n, dtype=dtype) + dtype(0.5)) * dtype(self.h)

    def metadata(self) -> dict:
        return {
            "name": "burgers1d-coarse (numpy, external)",
            "dt": self.dt,
            "channels": ["u"],
            "spatial_shape": [self.n],
            "num_params": self.num_params,
            "coords": {"x": self.x(np.float64).tolist()},
            "config": {
                "n": self.n,
                "nu": self.nu,
                "dt": self.dt,
                "length": self.length,
                "cfl": self.cfl,
                "forcing_modes": self.forcing_modes,
                "u_max": self.u_max,
            },
        }

    def forcing(self, coeffs: np.ndarray, dtype) -> np.ndarray:
        """(B, 2M) -> (B, 1, n): sum_k a_k sin(2 pi k x / L) + b_k cos(2 pi k x / L)."""
        m = self.forcing_modes
        x = self.x(np.float32).astype(dtype)  # Burgers1D keeps float32 coordinates
        k = np.arange(1, m + 1, dtype=dtype)
        phase = (dtype(2 * math.pi / self.length) * k[:, None]) * x[None, :]  # (M, n)
        c = coeffs.astype(dtype, copy=False)
        f = c[:, :m] @ np.sin(phase) + c[:, m:] @ np.cos(phase)
        return f[:, None, :]

    def rhs(self, u: np.ndarray, f: np.ndarray | None) -> np.ndarray:
        t = u.dtype.type
        left = np.roll(u, 1, -1)
        right = np.roll(u, -1, -1)
        # Godunov flux at face i+1/2 with ul = u_i, ur = u_{i+1}
        flux = t(0.5) * np.maximum(np.maximum(u, t(0)) ** 2, np.minimum(right, t(0)) ** 2)
        out = -(flux - np.roll(flux, 1, -1)) / t(self.h) + t(self.nu) * (right - t(2) * u + left) / t(self.h**2)
        return out if f is None else out + f

    def step(self, state: np.ndarray, params: np.ndarray | None) -> np.ndarray:
        t = state.dtype.type
        f = self.forcing(params, t) if self.forcing_modes else None
        umax = np.nan_to_num(np.abs(state).max(axis=(1, 2)), nan=0.0, posinf=1e30)
        rate = umax / t(self.h) + t(2 * self.nu / self.h**2)
        nsub = np.maximum(np.ceil(t(self.dt) * rate / t(self.cfl)).astype(np.int64), self.min_substeps)
        steps = int(nsub.max())
        if steps > 100 * self.min_substeps + 1000:
            raise FloatingPointError(
                f"velocity {float(umax.max()):.3g} needs {steps} sub-steps: the state is diverging"
            )
        tau = ((t(1) / nsub.astype(t)) * t(self.dt)).reshape(-1, 1, 1)
        u = state
        if bool((nsub == steps).all()):
            for _ in range(steps):
                u = u + tau * self.rhs(u, f)
            return u
        for k in range(steps):  # samples with fewer sub-steps stop early
            active = (k < nsub).reshape(-1, 1, 1)
            u = np.where(active, u + tau * self.rhs(u, f), u)
        return u


# ---------------------------------------------------------------------------------------------
# Protocol (server side)


def read_exactly(stream, n: int) -> bytes | None:
    """n bytes from ``stream``; None on a clean EOF before the first byte."""
    chunks, got = [], 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            if got == 0:
                return None
            raise EOFError(f"stream ended after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_frame(stream) -> tuple[dict, bytes] | None:
    """One frame: uint32 LE header length, UTF-8 JSON header, ``header['nbytes']`` payload bytes."""
    raw = read_exactly(stream, 4)
    if raw is None:
        return None
    (hlen,) = struct.unpack("<I", raw)
    if hlen > MAX_HEADER:
        raise ValueError(f"header of {hlen} bytes is too long")
    header = json.loads(read_exactly(stream, hlen).decode("utf-8"))
    nbytes = int(header.get("nbytes", 0))
    payload = read_exactly(stream, nbytes) if nbytes else b""
    return header, payload


def write_frame(stream, header: dict, payload: bytes | memoryview = b"") -> None:
    header = {**header, "nbytes": len(payload)}
    h = json.dumps(header).encode("utf-8")
    if len(payload) <= 1 << 16:  # one write: one wake-up of the client
        stream.write(b"".join((struct.pack("<I", len(h)), h, payload)))
    else:
        stream.write(struct.pack("<I", len(h)) + h)
        stream.write(payload)
    stream.flush()


def parse_faults(args: argparse.Namespace) -> dict[str, int]:
    faults = {}
    for name in (
        "crash_after",
        "hang_after",
        "nan_after",
        "bad_shape_after",
        "garbage_after",
        "error_after",
        "duplicate_after",
    ):
        v = getattr(args, name)
        if v is not None:
            faults[name] = v
    for item in filter(None, os.environ.get("ZOSOL_FAULT", "").split(",")):
        name, _, value = item.partition("=")
        faults[name.strip().replace("-", "_")] = int(value)
    return faults


def serve(solver: CoarseBurgers1D, faults: dict[str, int], slow_ms: float = 0.0, max_batch: int = 0) -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print() must never corrupt the protocol stream
    calls = 0
    while True:
        frame = read_frame(inp)
        if frame is None:  # the client closed stdin: leave quietly
            return 0
        header, payload = frame
        rid = {"id": header["id"]} if "id" in header else {}  # echoed in every reply
        op = header.get("op")
        if op == "hello":
            limit = {"max_batch": max_batch} if max_batch else {}
            write_frame(out, {"ok": True, **rid, "protocol": PROTOCOL_VERSION, **solver.metadata(), **limit})
        elif op == "quit":
            write_frame(out, {"ok": True, **rid})
            return 0
        elif op == "step":
            calls += 1
            k = calls - 1  # steps answered before this one
            if faults.get("crash_after") == k:
                print(f"burgers1d_numpy: injected crash in step call {calls}", file=sys.stderr, flush=True)
                print(
                    "Traceback (most recent call last):\n  ...\nRuntimeError: injected fault",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)
            if faults.get("hang_after") == k:
                print(f"burgers1d_numpy: injected hang in step call {calls}", file=sys.stderr, flush=True)
                while True:
                    time.sleep(3600)
            if faults.get("garbage_after") == k:
                out.write(b"\xff\xff\xff\x7fthis is not a frame")
                out.flush()
                continue
            if "error_after" in faults and k >= faults["error_after"]:
                write_frame(out, {"ok": False, **rid, "error": f"injected error in step call {calls}"})
                continue
            if max_batch and header["shape"][0] > max_batch:
                write_frame(out, {"ok": False, **rid, "error": f"batch {header['shape'][0]} > max_batch {max_batch}"})
                continue
            try:
                dtype = DTYPES[header.get("dtype", "float32")]
                shape = tuple(header["shape"])
                n_state = int(np.prod(shape)) * np.dtype(dtype).itemsize
                state = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
                params = None
                if header.get("params_shape") is not None:
                    pshape = tuple(header["params_shape"])
                    params = np.frombuffer(payload, dtype=dtype, offset=n_state, count=int(np.prod(pshape))).reshape(
                        pshape
                    )
                if len(shape) != 3 or shape[1:] != (1, solver.n):
                    raise ValueError(f"state shape {list(shape)} is not (B, 1, {solver.n})")
                if solver.num_params and (params is None or params.shape != (shape[0], solver.num_params)):
                    raise ValueError(
                        f"params shape {None if params is None else list(params.shape)} is not "
                        f"({shape[0]}, {solver.num_params})"
                    )
                new = solver.step(state, params)
            except Exception as e:  # report, stay alive
                write_frame(out, {"ok": False, **rid, "error": f"{type(e).__name__}: {e}"})
                continue
            if slow_ms:
                time.sleep(slow_ms / 1000)
            if "nan_after" in faults and k >= faults["nan_after"]:
                new = new.copy()
                new[..., 0] = np.nan
            if "bad_shape_after" in faults and k >= faults["bad_shape_after"]:
                new = np.ascontiguousarray(new[..., :-1])
            new = np.ascontiguousarray(new, dtype=dtype)
            for _ in range(2 if faults.get("duplicate_after") == k else 1):
                write_frame(
                    out,
                    {"ok": True, **rid, "shape": list(new.shape), "dtype": header.get("dtype", "float32")},
                    memoryview(new).cast("B"),
                )
        else:
            write_frame(out, {"ok": False, **rid, "error": f"unknown op {op!r}"})


# ---------------------------------------------------------------------------------------------
# Overhead benchmark (the only part that imports zosol/torch, lazily)


def bench(args: argparse.Namespace, sizes=(1, 64, 1024, 16384), repeats: int = 20) -> list[dict]:
    """ms per ``step`` call: in-process torch ``Burgers1D`` vs this program via ``ExternalSolver``."""
    import torch

    from zosol.solvers.burgers1d import Burgers1D
    from zosol.solvers.external import ExternalSolver

    torch.set_num_threads(1)
    inproc = Burgers1D(
        args.n,
        args.nu,
        args.dt,
        args.length,
        order=1,
        integrator="euler",
        cfl=args.cfl,
        forcing_modes=args.forcing_modes,
        u_max=args.u_max,
    )
    local = CoarseBurgers1D(
        args.n, args.nu, args.dt, args.length, cfl=args.cfl, forcing_modes=args.forcing_modes, u_max=args.u_max
    )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--n",
        str(args.n),
        "--nu",
        str(args.nu),
        "--dt",
        str(args.dt),
        "--length",
        repr(args.length),
        "--cfl",
        str(args.cfl),
        "--forcing-modes",
        str(args.forcing_modes),
        "--u-max",
        str(args.u_max),
    ]
    rows = []
    g = torch.Generator().manual_seed(0)

    def timed(fn, reps, blocks=5):  # median of blocks: robust to other load on the machine
        fn()  # warm-up
        times = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps * 1e3)
        return sorted(times)[blocks // 2]

    with ExternalSolver(cmd, timeout=120) as ext:
        for b in sizes:
            u = (0.5 * torch.randn(b, 1, args.n, generator=g)).clamp(-args.u_max, args.u_max)  # usual sub-steps
            p = 0.3 * torch.randn(b, 2 * args.forcing_modes, generator=g) if args.forcing_modes else None
            un, pn = u.numpy(), None if p is None else p.numpy()
            reps = max(2, min(repeats * 5, int(repeats * 256 / b)))
            t_in = timed(lambda: inproc.step(u, p), reps)
            t_np = timed(lambda: local.step(un, pn), reps)
            t_ext = timed(lambda: ext.step(u, p), reps)
            rows.append(
                {
                    "batch": b,
                    "inprocess_torch_ms": t_in,
                    "numpy_local_ms": t_np,
                    "external_ms": t_ext,
                    "ratio_external_vs_torch": t_ext / t_in,
                    "protocol_overhead_ms": t_ext - t_np,
                }
            )
    print(f"burgers1d coarse step, n={args.n}, forcing_modes={args.forcing_modes} (torch threads: 1)")
    print(
        "| batch | in-process torch (ms) | numpy in-process (ms) | external process (ms) | ext / torch "
        "| protocol overhead (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['inprocess_torch_ms']:.3f} | {r['numpy_local_ms']:.3f} | {r['external_ms']:.3f} "
            f"| {r['ratio_external_vs_torch']:.2f} | {r['protocol_overhead_ms']:.3f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=16, help="cells (burgers1d tiny: 16, default: 32)")
    ap.add_argument("--nu", type=float, default=0.02)
    ap.add_argument("--dt", type=float, default=0.05)
    ap.add_argument("--length", type=float, default=2 * math.pi)
    ap.add_argument("--forcing-modes", type=int, default=3)
    ap.add_argument("--u-max", type=float, default=2.0)
    ap.add_argument("--cfl", type=float, default=0.9)
    ap.add_argument("--bench", action="store_true", help="print the overhead table and exit (imports zosol)")
    ap.add_argument("--bench-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64, 1024, 16384])
    ap.add_argument("--crash-after", type=int)
    ap.add_argument("--hang-after", type=int)
    ap.add_argument("--nan-after", type=int)
    ap.add_argument("--bad-shape-after", type=int)
    ap.add_argument("--garbage-after", type=int)
    ap.add_argument("--error-after", type=int)
    ap.add_argument("--duplicate-after", type=int)
    ap.add_argument("--slow", type=float, default=0.0, metavar="MS")
    ap.add_argument("--max-batch", type=int, default=0, help="declare (and enforce) at most K states per step")
    args = ap.parse_args(argv)
    if args.bench:
        bench(args, sizes=args.bench_sizes)
        return 0
    solver = CoarseBurgers1D(
        args.n, args.nu, args.dt, args.length, cfl=args.cfl, forcing_modes=args.forcing_modes, u_max=args.u_max
    )
    try:
        return serve(solver, parse_faults(args), args.slow, args.max_batch)
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
