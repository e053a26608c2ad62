"""Black-box solvers that live outside torch: an external program, or a plain numpy function.

* :class:`ExternalSolver` drives a program written in any language as a persistent subprocess
  that speaks a small framed protocol on its stdin/stdout (specification:
  ``docs/external_solvers.md``).  A frame is a 4-byte little-endian header length, a UTF-8 JSON
  header and ``header["nbytes"]`` raw payload bytes (C-order, little-endian arrays)::

      -> {"op": "hello", "protocol": 1, "id": 1}
      <- {"ok": true, "id": 1, "protocol": 1, "dt": 0.05, "channels": ["u"], "spatial_shape": [16],
          "num_params": 6, "coords": {"x": [...]}, ...}
      -> {"op": "step", "id": 2, "shape": [B, C, *s], "dtype": "float32",
          "params_shape": [B, K] | null, "nbytes": N}  + state bytes + params bytes
      <- {"ok": true, "id": 2, "shape": [B, C, *s], "dtype": "float32", "nbytes": N} + new state bytes
      <- {"ok": false, "id": 2, "error": "message"}         (the program refuses a request)
      -> {"op": "quit", "id": 3}   <- {"ok": true, "id": 3}  (then the program exits)

  The adapter learns ``dt``, the channels, the grid and the number of parameters from the
  handshake; every ``step`` sends the whole batch in one frame.  Failures become
  :class:`~zosol.solvers.base.SolverError` with a message that names the cause: a crash (EOF or
  exit code, with the tail of the program's stderr), a timeout (the process is killed), garbage
  on the pipe, a reply of the wrong shape/dtype/byte count, NaN/inf where the input was finite,
  or an ``{"ok": false}`` refusal.  Nothing the program sends is trusted: a payload larger than the
  expected reply is refused before anything is allocated, a hello announcing an absurd grid is
  refused, malformed or deeply nested headers are protocol errors, and a program that echoes the
  request ``id`` (the reference program does) has stale or duplicate replies detected.  The
  program runs in its own process group, which is killed as a whole on close and on every fault
  (a grandchild holding the pipes cannot outlive it or hide a crash); of its stderr only a
  bounded tail is kept in memory.  With ``restart=True`` a crashed, hung or desynchronised
  process is restarted (at most ``max_restarts`` times over the solver's life) and the failed
  call is re-run once.

* :class:`NumpySolver` wraps ``fn(state: ndarray (B, C, *s), params: ndarray (B, K) | None) ->
  ndarray (B, C, *s)`` in-process (or ``fn(state (C, *s), params (K,) | None) -> (C, *s)`` with
  ``batched=False``), optionally spread over N local processes (``processes=N``: this one and N - 1 workers).

Call sizes: a solver sees the batches zosol makes (up to the full folded ZO-SOL batch, P x B
states) unless it declares a limit: ``batched=False`` (one state per call) or ``max_batch=k``
(an external program may also send ``"max_batch": k`` in its hello reply); zosol then splits
every batch into calls of at most that many states and joins the results in order
(:mod:`zosol.solvers.pool`).  With ``processes=N`` the calls of one batch are spread over N
local processes started once.

Both are ``differentiable = False``: inputs go to CPU numpy float32 (``dtype``) and outputs come
back as new tensors on the input's device and dtype, so no autograd graph can pass through them.
``step`` refuses (``NotDifferentiableError``) inputs that require grad while grad mode is on,
instead of silently returning a result that cuts the gradient; zeroth-order code uses
``solver.blackbox()`` (or calls under ``torch.no_grad``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shlex
import signal
import struct
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..runtime.memory import format_bytes, machine_memory_bytes
from .base import Solver, SolverError, check_state
from .pool import StatePool, run_rows, split_rows

__all__ = [
    "ExternalSolver",
    "NumpySolver",
    "NotDifferentiableError",
    "PROTOCOL_VERSION",
    "encode_frame",
    "MAX_HEADER_BYTES",
]

PROTOCOL_VERSION = 1
#: refuse headers longer than this (a sign of garbage on the pipe)
MAX_HEADER_BYTES = 1 << 20
#: a hello may announce at most this many per-simulation parameters
MAX_PARAMS = 1 << 20
#: bytes of the program's stderr kept in memory (at least; more when ``stderr_tail`` asks for it)
STDERR_KEEP_BYTES = 1 << 16
_DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}


class NotDifferentiableError(SolverError):
    """``step`` of a non-differentiable solver was called on inputs that require grad."""


class _ProcessFault(SolverError):
    """The process crashed, hung, or broke the protocol: it is killed and may be restarted."""


def encode_frame(header: Mapping[str, Any], payload_nbytes: int = 0) -> bytes:
    """Length prefix + JSON header of one frame (``nbytes`` set to ``payload_nbytes``)."""
    h = json.dumps({**header, "nbytes": int(payload_nbytes)}).encode("utf-8")
    return struct.pack("<I", len(h)) + h


# ---------------------------------------------------------------------------------------------


class _HostSolver(Solver):
    """Common part of solvers that compute on host numpy arrays."""

    differentiable = False

    def __init__(self, dtype: str = "float32", check_finite: bool = True):
        if dtype not in _DTYPES:
            raise UsageError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._np_dtype, self._torch_dtype = _DTYPES[dtype]
        self.check_finite = bool(check_finite)

    def step(self, state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Advance ``state`` (B, C, *spatial) by ``dt``; ``params`` (B, K) or None.  Not differentiable."""
        check_state(self, state, params)
        if torch.is_grad_enabled() and (state.requires_grad or (params is not None and params.requires_grad)):
            raise NotDifferentiableError(
                f"{type(self).__name__} is not differentiable (it computes outside torch); call it under "
                f"torch.no_grad, through solver.blackbox(), or train with a zeroth-order method (zo-sol)"
            )
        return self._step(state, params)

    __call__ = step

    def _to_numpy(self, t: torch.Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        return np.ascontiguousarray(t.detach().to(device="cpu", dtype=self._torch_dtype).numpy())

    def _check_output(self, out: Any, x: np.ndarray, who: str) -> np.ndarray:
        if not isinstance(out, np.ndarray):
            raise SolverError(f"{who} returned {type(out).__name__}, expected a numpy array of shape {list(x.shape)}")
        if out.shape != x.shape:
            raise SolverError(
                f"{who} returned shape {list(out.shape)}, expected {list(x.shape)} "
                f"(batch, channels {list(self.channels)}, spatial {list(self.spatial_shape)})"
            )
        if self.check_finite:
            bad = ~np.isfinite(out).reshape(out.shape[0], -1).all(1)
            if bad.any():
                finite_in = np.isfinite(x).reshape(x.shape[0], -1).all(1)
                culprits = np.flatnonzero(bad & finite_in)
                if culprits.size:
                    n_bad = int((~np.isfinite(out[culprits])).sum())
                    raise SolverError(
                        f"{who} returned non-finite values (NaN/inf): {n_bad} entries in {culprits.size} of "
                        f"{out.shape[0]} samples whose input was finite (first: sample {int(culprits[0])})"
                    )
        return out

    def _to_torch(self, out: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        # a read-only result (np.asarray of a JAX array, a view of a cache) is copied: torch would warn
        # that it is not writable, and a tensor sharing it must not be written into
        return torch.from_numpy(out if out.flags.writeable else out.copy()).to(device=like.device, dtype=like.dtype)


def _default_coords(spatial_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """Cell-centre index coordinates (grid units) when the program does not send any."""
    names = ("x", "y", "z")
    return {names[i]: torch.arange(n, dtype=torch.float32) + 0.5 for i, n in enumerate(spatial_shape[:3])}


# ---------------------------------------------------------------------------------------------


def _check_counts(who: str, **counts: int | None) -> None:
    """``max_batch`` (None allowed: no limit) and ``processes`` must be integers >= 1."""
    for what, v in counts.items():
        if v is None and what == "max_batch":
            continue
        if v is None or int(v) != v or v < 1:
            raise UsageError(
                f"{who}: {what} must be an integer >= 1{' or None' if what == 'max_batch' else ''}, got {v!r}"
            )


class StepTimeout(SolverError):
    """An in-process step function ran longer than its ``timeout``."""


@contextlib.contextmanager
def call_timeout(seconds: float | None, who: str) -> Iterator[None]:
    """Interrupt the block with :class:`StepTimeout` after ``seconds`` (SIGALRM; only in the main
    thread, and only Python code or interruptible waits are interrupted; None: no limit)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise StepTimeout(f"{who}: a call ran longer than its timeout of {seconds:g} s (interrupted)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class NumpySolver(_HostSolver):
    """A plain numpy step function as a (non-differentiable) Solver.

    Args:
        fn: ``fn(state (B, C, *spatial) ndarray, params (B, K) ndarray | None) -> (B, C, *spatial)``;
            with ``batched=False``: ``fn(state (C, *spatial), params (K,) | None) -> (C, *spatial)``.
        dt, channels, spatial_shape, num_params, coords: the solver's metadata (coords: name ->
            1-D array; default: cell-centre indices).
        dtype: array dtype handed to ``fn`` ("float32" or "float64").
        check_finite: raise SolverError when ``fn`` returns NaN/inf for finite input.
        batched: False when ``fn`` steps one state at a time (zosol loops over the batch).
        max_batch: at most this many states per call of a batched ``fn`` (None: any number).
        processes: spread the calls of every batch over this many local processes: this one and
            ``processes - 1`` workers started once at the first multi-state step (forked on
            POSIX: ``fn`` may be a closure) and stopped by :meth:`close`; the result equals
            ``processes=1`` exactly.
        timeout: seconds one call of ``fn`` may take (None: no limit; needs ``processes=1``): a
            call still running then is interrupted (SIGALRM, in the main thread) with a SolverError.
    Exceptions raised by ``fn`` (and ``sys.exit`` called in it) become SolverError naming them.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
        *,
        dt: float,
        channels: Sequence[str],
        spatial_shape: Sequence[int],
        num_params: int = 0,
        coords: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        check_finite: bool = True,
        name: str | None = None,
        batched: bool = True,
        max_batch: int | None = None,
        processes: int = 1,
        timeout: float | None = None,
    ):
        super().__init__(dtype, check_finite)
        if not callable(fn):
            raise TypeError(f"NumpySolver needs a callable, got {type(fn).__name__}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise UsageError(f"NumpySolver: timeout must be a positive number of seconds, got {timeout!r}")
        if timeout is not None and processes != 1:
            raise UsageError("NumpySolver: timeout applies to calls in this process; use it with processes=1")
        self.timeout = None if timeout is None else float(timeout)
        if not (math.isfinite(dt) and dt > 0):
            raise UsageError(f"NumpySolver: dt must be positive, got {dt}")
        _check_counts("NumpySolver", max_batch=max_batch, processes=processes)
        self.batched, self.max_batch = bool(batched), None if max_batch is None else int(max_batch)
        self.pool = StatePool(fn, processes, batched=self.batched, max_batch=self.max_batch) if processes != 1 else None
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")
        self.dt = float(dt)
        self.channels = tuple(channels)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.num_params = int(num_params)
        self.coords = (
            {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in coords.items()}
            if coords is not None
            else _default_coords(self.spatial_shape)
        )

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        x, p = self._to_numpy(state), self._to_numpy(params) if self.num_params else None
        # an exception raised by fn is a bug in fn: it reaches the user as it is, with its traceback;
        # sys.exit in fn and a call beyond its timeout are the solver's failures (one line)
        who = f"NumpySolver({self.name})"
        try:
            with call_timeout(self.timeout, who):
                out = (
                    self.pool.map(x, p)
                    if self.pool is not None
                    else run_rows(self.fn, self.batched, self.max_batch, x, p)
                )
        except SystemExit as e:
            raise SolverError(f"{who} called sys.exit({e.code!r:.40}) (a step function must return or raise)") from None
        out = self._check_output(out, x, who)
        return self._to_torch(np.ascontiguousarray(out, dtype=self._np_dtype), state)

    @property
    def processes(self) -> int:
        return 1 if self.pool is None else self.pool.processes

    def close(self) -> None:
        """Stop the worker processes, if any (a later step starts them again)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> NumpySolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "fn": self.name,
            "num_params": self.num_params,
            "batched": self.batched,
            "max_batch": self.max_batch,
            "processes": self.processes,
        }

    def __repr__(self) -> str:
        return f"NumpySolver({self.name}, dt={self.dt}, state={self.state_shape})"


# ---------------------------------------------------------------------------------------------


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process visible in /proc (empty elsewhere)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                out.append((int(name), int(fields[1]), int(fields[3])))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _sessions_of(leader: int) -> set[int]:
    """Every process descending from ``leader`` (by parent pid) and every process of a session or
    group one of them started (a child that called ``setsid()`` leaves the program's group)."""
    table = _processes()
    tree, frontier = {leader}, {leader}
    while frontier:
        frontier = {pid for pid, ppid, _ in table if ppid in frontier} - tree
        tree |= frontier
    return tree | {pid for pid, _, sid in table if sid in tree}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group the program leads (the program and every descendant that stayed in
    it, also after the program itself exited), every descendant and session it started (a child
    that called ``setsid()``), and reap the program."""
    started = _sessions_of(proc.pid) if proc.returncode is None else set()  # not reaped: its pid is its own
    for pid in started - {proc.pid, os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _finalize(proc: subprocess.Popen, files: list) -> None:  # must not reference the solver
    _kill_group(proc)
    for f in files:
        try:
            if isinstance(f, int):
                os.close(f)
            else:
                f.close()
        except Exception:
            pass


class _StderrTail:
    """Drains a pipe in a daemon thread (the program never blocks on stderr), keeping only the last
    ``keep`` bytes in memory.  Owns the pipe: closes it at EOF."""

    def __init__(self, pipe, keep: int):
        self.keep = int(keep)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True, name="zosol-stderr")
        self._thread.start()

    def _drain(self, pipe) -> None:
        fd = pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * self.keep:
                        del self._buf[: -self.keep]
        except OSError:
            pass
        finally:
            pipe.close()

    def text(self, limit: int | None = None, wait: float = 0.0) -> str:
        """The last ``limit`` characters (default: all that is kept); ``wait``: seconds to let the
        thread reach EOF first (after the program died)."""
        if wait:
            self._thread.join(wait)
        with self._lock:
            data = bytes(self._buf[-self.keep :])
        text = data.decode("utf-8", "replace")
        return text if limit is None else text[-limit:]


def _pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _command_list(command: str | Sequence[str]) -> list[str]:
    """The program and its arguments as a list (a string is split with ``shlex``); UsageError when
    empty, OSError off POSIX."""
    if os.name != "posix":
        raise OSError("ExternalSolver needs a POSIX system (select on pipes)")
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    if not command:
        raise UsageError("ExternalSolver: empty command")
    return command


def _program_name(command: list[str]) -> str:
    """The program's file name, or its script's for an interpreter running one
    (``python my_pde.py`` -> ``my_pde.py``)."""
    base = [os.path.basename(c) for c in command]
    interpreted = (
        base[0].startswith(("python", "julia", "Rscript", "node")) and len(base) > 1 and not command[1].startswith("-")
    )
    return base[1] if interpreted else base[0]


class ExternalSolver(_HostSolver):
    """A solver that is an external program speaking the zosol frame protocol on stdin/stdout.

    Args:
        command: the program and its arguments (a list, or a string split with ``shlex``).
        timeout: seconds allowed for one ``step`` (send + compute + reply); on expiry the process
            is killed and SolverError names the timeout.
        startup_timeout: seconds allowed for the start and the ``hello`` handshake (default:
            ``max(timeout, 30)``).
        restart: restart a crashed / hung / desynchronised process and re-run the failed call
            once; at most ``max_restarts`` restarts over the solver's life.
        env, cwd: environment (added to ``os.environ``) and working directory of the program.
        dtype: array dtype on the wire ("float32" or "float64").
        check_finite: raise SolverError when the program returns NaN/inf for finite input.
        expect: optional metadata the program must report, e.g. ``{"dt": 0.05, "num_params": 6}``
            (checked at every handshake; floats to 1e-12 relative).
        stderr_tail: characters of the program's stderr quoted in crash messages.
        name: label used in messages (default: the program's file name).
        pipe_size: requested pipe buffer size in bytes (Linux ``F_SETPIPE_SZ``; capped by
            ``/proc/sys/fs/pipe-max-size``; failures are ignored).

    The program's stderr is drained by a thread (never blocks) that keeps its last
    ``max(4 * stderr_tail, 64 KiB)`` bytes; ``stderr_text()`` returns them.
    Use as a context manager or call :meth:`close`; garbage collection and interpreter exit
    kill a forgotten process.  POSIX only (``select`` on pipes, process groups).
    """

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        timeout: float = 60.0,
        startup_timeout: float | None = None,
        restart: bool = False,
        max_restarts: int = 3,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        dtype: str = "float32",
        check_finite: bool = True,
        expect: Mapping[str, Any] | None = None,
        stderr_tail: int = 2000,
        name: str | None = None,
        pipe_size: int = 1 << 20,
        max_batch: int | None = None,
        processes: int = 1,
    ):
        super().__init__(dtype, check_finite)
        options = dict(
            timeout=timeout,
            startup_timeout=startup_timeout,
            restart=restart,
            max_restarts=max_restarts,
            env=env,
            cwd=cwd,
            dtype=dtype,
            check_finite=check_finite,
            expect=expect,
            stderr_tail=stderr_tail,
            name=name,
            pipe_size=pipe_size,
            max_batch=max_batch,
        )
        _check_counts("ExternalSolver", max_batch=max_batch, processes=processes)
        self.max_batch = None if max_batch is None else int(max_batch)
        self.command = _command_list(command)
        if not (timeout > 0):
            raise UsageError(f"ExternalSolver: timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout) if startup_timeout is not None else max(self.timeout, 30.0)
        self.restart_enabled = bool(restart)
        self.max_restarts = int(max_restarts)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.expect = dict(expect or {})
        self.stderr_tail = int(stderr_tail)
        self.name = name or _program_name(self.command)
        self.pipe_size = int(pipe_size)
        self._init_process_state()
        self._start()
        #: further copies of the program for ``processes > 1`` (each started once, own pipes)
        self._copies = [ExternalSolver(command, **options) for _ in range(int(processes) - 1)]

    # -- process life ------------------------------------------------------------------------
    def _init_process_state(self) -> None:
        """The counters and the process fields before the first start (no process, no pipes)."""
        self.restarts = 0
        self.calls = 0
        self.metadata: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._stderr: _StderrTail | None = None
        self._pidfd: int | None = None
        self._next_id = 0
        self._echoes_id = False  # the program echoed the id of its hello: every reply must
        self._finalizer = None
        self._failure: str | None = None  # why the process died, while not restarted
        self._lock = threading.RLock()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        env = None if self.env is None else {**os.environ, **self.env}
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.cwd,
                bufsize=0,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise SolverError(f"external solver '{self.name}': cannot start {self.command}: {e}") from e
        self._proc = proc
        self._stderr = _StderrTail(proc.stderr, max(4 * self.stderr_tail, STDERR_KEEP_BYTES))
        self._pidfd = _pidfd(proc.pid)
        self._echoes_id = False
        os.set_blocking(proc.stdin.fileno(), False)
        for f in (proc.stdin, proc.stdout):  # fewer context switches for large batches (Linux)
            try:
                import fcntl

                fcntl.fcntl(f.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), self.pipe_size)
            except (ImportError, OSError):
                pass
        self._finalizer = weakref.finalize(
            self, _finalize, proc, [proc.stdin, proc.stdout] + ([] if self._pidfd is None else [self._pidfd])
        )
        self._failure = None
        try:
            reply, _ = self._request({"op": "hello", "protocol": PROTOCOL_VERSION}, (), self.startup_timeout, "hello")
            self._adopt_metadata(reply)
        except SolverError:
            self._shutdown(kill=True)
            raise

    def _hello_metadata(self, reply: dict) -> dict[str, Any]:
        """dt, channels, spatial_shape and num_params of a hello reply, validated and bounded (one
        state must fit in a quarter of this machine's memory) before anything is allocated."""
        who = f"external solver '{self.name}'"
        try:
            if not isinstance(reply.get("channels"), list) or not isinstance(reply.get("spatial_shape"), list):
                raise TypeError("channels and spatial_shape must be lists")
            if len(reply["channels"]) > 1 << 16 or len(reply["spatial_shape"]) > 8:
                raise UsageError("too many channels or dimensions")
            meta = {
                "dt": float(reply["dt"]),
                "channels": tuple(str(c) for c in reply["channels"]),
                "spatial_shape": tuple(int(n) for n in reply["spatial_shape"]),
                "num_params": int(reply.get("num_params", 0)),
            }
            protocol = int(reply.get("protocol", PROTOCOL_VERSION))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise SolverError(
                f"{who}: bad hello reply {str(reply)[:300]} (needs dt, channels, spatial_shape, "
                f"num_params): {type(e).__name__}: {e}"
            ) from None
        if protocol != PROTOCOL_VERSION:
            raise SolverError(f"{who} speaks protocol {reply.get('protocol')}, this zosol speaks {PROTOCOL_VERSION}")
        if (
            not (math.isfinite(meta["dt"]) and meta["dt"] > 0)
            or not meta["channels"]
            or not meta["spatial_shape"]
            or min(meta["spatial_shape"]) < 1
            or not 0 <= meta["num_params"] <= MAX_PARAMS
        ):
            raise SolverError(f"{who}: invalid metadata in hello reply: {str(meta)[:300]}")
        state = len(meta["channels"]) * math.prod(meta["spatial_shape"]) * np.dtype(self._np_dtype).itemsize
        if state > machine_memory_bytes() // 4:
            raise SolverError(
                f"{who}: hello announces a state of {len(meta['channels'])} channels x "
                f"{list(meta['spatial_shape'])} ({format_bytes(state)} per sample), more than a "
                f"quarter of this machine's memory; refused"
            )
        return meta

    def _adopt_metadata(self, reply: dict) -> None:
        who = f"external solver '{self.name}'"
        meta = self._hello_metadata(reply)
        for k, want in self.expect.items():
            have = reply.get(k)
            try:
                same = (
                    math.isclose(float(have), float(want), rel_tol=1e-12)
                    if isinstance(want, float) and have is not None
                    else (
                        list(have) == list(want)
                        if isinstance(want, (list, tuple)) and have is not None
                        else have == want
                    )
                )
            except (TypeError, ValueError, OverflowError):
                same = False
            if not same:
                raise SolverError(f"{who} reports {k}={have!r}, expected {want!r}")
        if self.metadata:  # a restart must come back as the same solver
            old = {k: self.metadata[k] for k in meta}
            if old != meta:
                raise SolverError(f"{who} came back after a restart with other metadata: {meta} (was {old})")
        coords = reply.get("coords")
        try:  # lists from a header of at most MAX_HEADER_BYTES: small
            coords = (
                {str(k): torch.tensor(v, dtype=torch.float32) for k, v in coords.items()}
                if isinstance(coords, dict)
                else _default_coords(meta["spatial_shape"])
            )
        except (TypeError, ValueError, RuntimeError) as e:
            raise SolverError(f"{who}: bad coords in hello reply: {type(e).__name__}: {e}") from None
        declared = reply.get("max_batch")
        if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool) or declared < 1):
            raise SolverError(f"{who}: invalid max_batch {declared!r} in hello reply (an integer >= 1 or absent)")
        self.max_batch = min(filter(None, (self.max_batch, declared)), default=None)
        self.dt, self.channels = meta["dt"], meta["channels"]
        self.spatial_shape, self.num_params = meta["spatial_shape"], meta["num_params"]
        self.coords = coords
        self.metadata = {**{k: v for k, v in reply.items() if k not in ("ok", "nbytes")}, **meta}

    def _shutdown(self, kill: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if not kill and proc.poll() is None:
            try:
                self._request({"op": "quit"}, (), min(self.timeout, 5.0), "quit")
                proc.wait(timeout=min(self.timeout, 5.0))
            except (SolverError, subprocess.TimeoutExpired, OSError):
                pass
        if self._finalizer is not None:
            self._finalizer()  # kills what is left, closes the pipes and the stderr file
        self._proc = None

    def stderr_text(self, limit: int | None = None) -> str:
        """The last ``limit`` characters (default: all that is kept, see the class docstring) of the
        current (or last) process's stderr."""
        return "" if self._stderr is None else self._stderr.text(limit)

    def _tail(self) -> str:
        text = "" if self._stderr is None else self._stderr.text(self.stderr_tail, wait=0.5).rstrip()
        return f"; stderr tail:\n{text}" if text else "; stderr was empty"

    def close(self) -> None:
        """Ask the program (and its copies) to quit (op "quit"), then make sure they are gone.  Idempotent."""
        for copy in getattr(self, "_copies", ()):
            copy.close()
        with self._lock:
            self._shutdown(kill=False)
            self._failure = "the solver was closed"

    def restart(self) -> None:
        """Kill the current process (if any) and start a fresh one (handshake included)."""
        with self._lock:
            self._shutdown(kill=True)
            self._start()

    def __enter__(self) -> ExternalSolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; weakref.finalize also covers interpreter exit
        try:
            if self._proc is not None:
                self._shutdown(kill=True)
        except Exception:
            pass

    # -- framed I/O with deadlines -----------------------------------------------------------
    def _fault(self, kind: str, what: str, detail: str) -> _ProcessFault:
        """Kill the process and build the error for a crash / timeout / protocol failure."""
        proc = self._proc
        code = None
        if proc is not None:
            if kind == "crash":
                try:
                    code = proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    code = None
            _kill_group(proc)  # also when it exited: descendants in its group may hold the pipes
        status = "" if code is None else f" (exit code {code}{self._signal_name(code)})"
        msg = f"external solver '{self.name}': {what} failed: {detail}{status}{self._tail()}"
        self._shutdown(kill=True)
        self._failure = msg
        return _ProcessFault(msg)

    @staticmethod
    def _signal_name(code: int) -> str:
        if code < 0:
            try:
                return f", killed by {signal.Signals(-code).name}"
            except ValueError:
                return ""
        return ""

    def _write_all(self, parts: Sequence[memoryview | bytes], deadline: float, what: str) -> None:
        fd = self._proc.stdin.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            if self._pidfd is not None:
                sel.register(self._pidfd, selectors.EVENT_READ)
            for part in parts:
                view = memoryview(part).cast("B")
                while len(view):
                    left = deadline - time.monotonic()
                    ready = {key.fd for key, _ in sel.select(left)} if left > 0 else set()
                    if fd not in ready:
                        if time.monotonic() >= deadline:
                            raise self._fault(
                                "timeout",
                                what,
                                f"timeout after {self._budget:.3g} s (the program "
                                f"stopped reading its input; process killed)",
                            )
                        if self._pidfd in ready:
                            raise self._fault("crash", what, "the program exited before reading its input")
                        continue
                    try:
                        n = os.write(fd, view)
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        raise self._fault("crash", what, "the program crashed (it closed its input)") from None
                    view = view[n:]

    def _wait_readable(self, sel: selectors.BaseSelector, fd: int, deadline: float, what: str) -> bool:
        """Wait until ``fd`` (stdout) is readable: True; False when the time is up.  A program that
        exited while something else (a grandchild) keeps its stdout open is a crash, reported at
        once (the pidfd wakes us; without one, the exit is polled every 0.2 s)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready = {key.fd for key, _ in sel.select(left if self._pidfd is not None else min(left, 0.2))}
            if fd in ready:
                return True
            if (self._pidfd is not None and self._pidfd in ready) or self._proc.poll() is not None:
                raise self._fault(
                    "crash",
                    what,
                    "the program exited but its output stays open (a process it "
                    "started holds it; the whole process group was killed)",
                )

    def _read_into(self, buf: memoryview, deadline: float, what: str, sel: selectors.BaseSelector) -> None:
        fd = self._proc.stdout.fileno()
        got = 0
        while got < len(buf):
            if not self._wait_readable(sel, fd, deadline, what):
                raise self._fault("timeout", what, f"timeout after {self._budget:.3g} s with no reply (process killed)")
            n = os.readv(fd, [buf[got:]])
            if n == 0:
                raise self._fault(
                    "crash",
                    what,
                    "the program crashed (its output ended"
                    + (f" after {got} of {len(buf)} bytes of a frame" if got else "")
                    + ")",
                )
            got += n

    def _read_frame(self, deadline: float, what: str, max_payload: int) -> tuple[dict, bytearray]:
        """One reply frame; its payload may hold at most ``max_payload`` bytes (checked before
        allocating: a larger announcement is a protocol error and kills the process)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout.fileno(), selectors.EVENT_READ)
            if self._pidfd is not None:
                sel.register(self._pidfd, selectors.EVENT_READ)
            raw = bytearray(4)
            self._read_into(memoryview(raw), deadline, what, sel)
            (hlen,) = struct.unpack("<I", raw)
            if hlen == 0 or hlen > MAX_HEADER_BYTES:
                raise self._fault(
                    "protocol",
                    what,
                    f"garbage output (header length {hlen} is not in "
                    f"1..{MAX_HEADER_BYTES}: not a protocol frame; process killed)",
                )
            hraw = bytearray(hlen)
            self._read_into(memoryview(hraw), deadline, what, sel)
            try:
                header = json.loads(hraw.decode("utf-8"))
                if not isinstance(header, dict):
                    raise UsageError("header is not a JSON object")
                nbytes = int(header.get("nbytes", 0) or 0)
                if nbytes < 0:
                    raise UsageError(f"negative nbytes {nbytes}")
            except (ValueError, UnicodeDecodeError, TypeError, OverflowError, RecursionError) as e:
                raise self._fault(
                    "protocol",
                    what,
                    f"garbage output (bad frame header "
                    f"{bytes(hraw[:80])!r}: {type(e).__name__}: {str(e)[:200]}; "
                    f"process killed)",
                ) from None
            if nbytes > max_payload:
                raise self._fault(
                    "protocol",
                    what,
                    f"the reply announces a payload of {nbytes} bytes, expected at most {max_payload} (process killed)",
                )
            payload = bytearray(nbytes)
            if nbytes:
                self._read_into(memoryview(payload), deadline, what, sel)
        return header, payload

    def _request(
        self, header: dict, payload: Sequence[memoryview | bytes], budget: float, what: str, max_reply: int = 0
    ) -> tuple[dict, bytearray]:
        """Send one request (with a fresh ``id``) and read its reply (payload <= ``max_reply`` bytes).
        A reply carrying another id (stale, duplicate), or none from a program that echoes ids, is a
        protocol error."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                raise self._fault("crash", what, "the program had exited before the request")
            raise SolverError(f"external solver '{self.name}' is not running ({self._failure or 'not started'})")
        self._budget = budget
        deadline = time.monotonic() + budget
        self._next_id += 1
        rid = self._next_id
        nbytes = sum(memoryview(p).nbytes for p in payload)
        parts = [encode_frame({**header, "id": rid}, nbytes), *payload]
        if nbytes <= 1 << 16:  # one write, one wake-up of the program
            parts = [b"".join(parts)]
        self._write_all(parts, deadline, what)
        reply, data = self._read_frame(deadline, what, max_reply)
        if "id" in reply or self._echoes_id:
            if reply.get("id") != rid:
                raise self._fault(
                    "protocol",
                    what,
                    f"reply to request id {rid} carries id {reply.get('id')!r} "
                    f"(a stale or duplicate reply; process killed)",
                )
            self._echoes_id = True
        if not reply.get("ok", False):
            err = str(reply.get("error", f"reply without ok/error: {reply!r}"))
            quoted = err if len(err) <= 500 else f"{err[:500]}... ({len(err):,} characters)"
            raise SolverError(f"external solver '{self.name}' refused {what}: {quoted}")
        return reply, data

    # -- the step ------------------------------------------------------------------------------
    def _step_once(self, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
        what = f"step (batch {x.shape[0]})"
        header = {
            "op": "step",
            "shape": list(x.shape),
            "dtype": self.dtype,
            "params_shape": None if p is None else list(p.shape),
        }
        parts = [memoryview(x).cast("B")] + ([] if p is None else [memoryview(p).cast("B")])
        reply, data = self._request(header, parts, self.timeout, what, max_reply=x.nbytes)
        who = f"external solver '{self.name}'"
        shape = reply.get("shape")
        if reply.get("dtype", self.dtype) != self.dtype:
            raise SolverError(f"{who} returned dtype {reply.get('dtype')!r}, expected {self.dtype!r} in {what}")
        if shape != list(x.shape):
            raise SolverError(
                f"{who} returned shape {shape}, expected {list(x.shape)} in {what} "
                f"(batch, channels {list(self.channels)}, spatial {list(self.spatial_shape)})"
            )
        if len(data) != x.nbytes:
            raise SolverError(
                f"{who} returned {len(data)} bytes, expected {x.nbytes} (shape {list(x.shape)}, {self.dtype}) in {what}"
            )
        out = np.frombuffer(data, dtype=self._np_dtype).reshape(x.shape)
        return self._check_output(out, x, who)

    @property
    def processes(self) -> int:
        return 1 + len(self._copies)

    def _step(self, state: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        x = self._to_numpy(state)
        p = self._to_numpy(params) if self.num_params else None
        blocks = split_rows(x.shape[0], self.processes)
        if len(blocks) == 1:
            return self._to_torch(self._rows(x, p), state)
        from concurrent.futures import ThreadPoolExecutor  # the programs compute; threads only wait

        with ThreadPoolExecutor(len(blocks)) as threads:
            outs = threads.map(
                lambda job: job[0]._rows(x[job[1]], None if p is None else p[job[1]]),
                zip([self, *self._copies], blocks),
            )
            return self._to_torch(np.concatenate(list(outs)), state)

    def _rows(self, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
        """Step ``x`` (B, C, *s) in requests of at most ``max_batch`` states."""
        limit = self.max_batch or x.shape[0]
        if x.shape[0] <= limit:
            return self._call(x, p)
        return np.concatenate(
            [
                self._call(
                    np.ascontiguousarray(x[i : i + limit]),
                    None if p is None else np.ascontiguousarray(p[i : i + limit]),
                )
                for i in range(0, x.shape[0], limit)
            ]
        )

    def _call(self, x: np.ndarray, p: np.ndarray | None) -> np.ndarray:
        """One step request (restarting a failed program once if ``restart``)."""
        with self._lock:
            retried = False
            while True:
                try:
                    if (
                        self._proc is None
                        and self.restart_enabled
                        and self._failure is not None
                        and self._failure != "the solver was closed"
                        and self.restarts < self.max_restarts
                    ):
                        self.restarts += 1
                        self._start()
                    out = self._step_once(x, p)
                    self.calls += 1
                    break
                except _ProcessFault as e:
                    if not self.restart_enabled or retried:
                        raise SolverError(
                            str(e) + (" (the re-run after a restart failed too)" if retried else "")
                        ) from None
                    if self.restarts >= self.max_restarts:
                        raise SolverError(
                            f"{e} (no restart left: {self.restarts} of max_restarts={self.max_restarts} used)"
                        ) from None
                    retried = True
                    self.restarts += 1
                    try:
                        self._start()
                    except SolverError as e2:
                        raise SolverError(f"{e}; the restart failed: {e2}") from None
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "command": self.command,
            "num_params": self.num_params,
            "timeout": self.timeout,
            "restart": self.restart_enabled,
            "metadata": self.metadata,
            "max_batch": self.max_batch,
            "processes": self.processes,
        }

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.alive else "stopped"
        return f"ExternalSolver({self.name!r}, {state}, dt={getattr(self, 'dt', None)})"
