"""The external-solver adapter does not trust the program (issue 15, finding 10): announced sizes
are checked before allocation, an absurd hello is refused, nested-JSON headers and stale or
duplicate replies are protocol errors, the whole process group dies on close and on a fault (a
grandchild holding stdout neither hides a crash nor survives), and only a bounded stderr tail is
kept.  Every failure is a SolverError."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from zosol.solvers.base import SolverError
from zosol.solvers.external import ExternalSolver

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "solvers" / "burgers1d_numpy.py"

#: a misbehaving program: a correct hello (unless MODE says otherwise), then MODE on the first step
FAKE = textwrap.dedent('''
    import json, os, struct, subprocess, sys
    MODE = sys.argv[1]
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def send(header, payload=b""):
        h = json.dumps({**header, "nbytes": header.get("nbytes", len(payload))}).encode()
        out.write(struct.pack("<I", len(h)) + h + payload)
        out.flush()

    while True:
        raw = inp.read(4)
        if len(raw) < 4:
            sys.exit(0)
        header = json.loads(inp.read(struct.unpack("<I", raw)[0]))
        payload = inp.read(header.get("nbytes", 0))
        rid = header.get("id")
        if header["op"] == "hello":
            shape = [2 ** 40] if MODE == "huge_hello" else [4]
            coords = {"x": ["a", "b"]} if MODE == "bad_coords" else None
            hello = {"ok": True, "id": rid, "protocol": 1, "dt": 0.1, "channels": ["u"], "spatial_shape": shape,
                     "num_params": 0}
            if coords:
                hello["coords"] = coords
            if MODE == "grandchild_then_run":
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            send(hello)
        elif header["op"] == "quit":
            send({"ok": True, "id": rid})
            sys.exit(0)
        elif MODE == "huge_frame":
            send({"ok": True, "id": rid, "shape": header["shape"], "dtype": "float32", "nbytes": 2 ** 40})
        elif MODE == "nested":
            h = ("[" * 200000 + "]" * 200000).encode()
            out.write(struct.pack("<I", len(h)) + h)
            out.flush()
        elif MODE == "grandchild_then_crash":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits stdout
            sys.stderr.write("fake: crashing\\n")
            sys.stderr.flush()
            os._exit(3)
        elif MODE == "stderr_flood":
            chunk = b"x" * (1 << 20)
            for _ in range(20):
                sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.write(b"\\nlast words\\n")
            sys.stderr.flush()
            send({"ok": True, "id": rid, "shape": header["shape"], "dtype": "float32"}, payload[:16])
        else:
            send({"ok": True, "id": rid, "shape": header["shape"], "dtype": "float32"}, payload[:16])
''')


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_solver.py"
    path.write_text(FAKE)
    return lambda mode: [sys.executable, str(path), mode]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().split(")")[-1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    pids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def test_announced_frame_size_is_checked_before_allocation(fake):
    with ExternalSolver(fake("huge_frame"), timeout=10) as solver:
        with pytest.raises(SolverError, match=r"announces a payload of 1099511627776 bytes, expected at most 16"):
            solver.step(torch.zeros(1, 1, 4))


def test_hello_with_a_huge_grid_is_refused(fake):
    t0 = time.monotonic()
    with pytest.raises(SolverError, match=r"hello announces a state of 1 channels x \[1099511627776\]"):
        ExternalSolver(fake("huge_hello"), timeout=10)
    assert time.monotonic() - t0 < 5


def test_hello_with_bad_coords_is_a_solver_error(fake):
    with pytest.raises(SolverError, match="bad coords"):
        ExternalSolver(fake("bad_coords"), timeout=10)


def test_deeply_nested_json_header_is_a_solver_error(fake):
    with ExternalSolver(fake("nested"), timeout=10) as solver:
        with pytest.raises(SolverError, match="garbage output .*RecursionError"):
            solver.step(torch.zeros(1, 1, 4))


def test_duplicate_reply_is_detected_not_returned_for_the_next_call():
    cmd = [sys.executable, str(SCRIPT), "--n", "16", "--duplicate-after", "0"]
    u, p = torch.rand(2, 1, 16), torch.zeros(2, 6)
    with ExternalSolver(cmd, timeout=10) as solver:
        first = solver.step(u, p)
        with pytest.raises(SolverError, match="reply to request id 3 carries id 2 .*stale or duplicate"):
            solver.step(0.5 * u, p)
    with ExternalSolver(cmd, timeout=10, restart=True) as solver:  # with restart: the right answer
        assert torch.equal(solver.step(u, p), first)
        again = solver.step(0.5 * u, p)
        assert solver.restarts == 1
    with ExternalSolver([sys.executable, str(SCRIPT), "--n", "16"], timeout=10) as clean:
        assert torch.equal(again, clean.step(0.5 * u, p))


def test_crash_while_a_grandchild_holds_stdout_is_reported_at_once(fake):
    solver = ExternalSolver(fake("grandchild_then_crash"), timeout=30)
    pgid = solver.pid
    t0 = time.monotonic()
    with pytest.raises(SolverError, match=r"(?s)exited but its output stays open .*exit code 3.*fake: crashing"):
        solver.step(torch.zeros(1, 1, 4))
    assert time.monotonic() - t0 < 5  # not the 30 s timeout
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(pgid) == []  # the grandchild was killed with the group
    solver.close()


def test_close_kills_the_whole_process_group(fake):
    solver = ExternalSolver(fake("grandchild_then_run"), timeout=10)
    pgid = solver.pid
    assert torch.equal(solver.step(torch.ones(1, 1, 4)), torch.ones(1, 1, 4))
    assert len(_group_members(pgid)) == 2  # the program and its grandchild
    solver.close()
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(pgid) == []


def test_stderr_is_a_bounded_tail_in_memory(fake, tmp_path):
    with ExternalSolver(fake("stderr_flood"), timeout=30, stderr_tail=100) as solver:
        for _ in range(3):  # 60 MiB of stderr in all
            solver.step(torch.zeros(1, 1, 4))
        deadline = time.monotonic() + 5
        while "last words" not in solver.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = solver.stderr_text()
        assert text.endswith("last words\n") and len(text) <= 1 << 16
        assert len(solver._stderr._buf) <= 2 * (1 << 16)
        assert solver.stderr_text(20) == "x" * 8 + "\nlast words\n"
