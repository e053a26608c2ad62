"""Adversarial probes of the training / CLI / compare / checkpoint code (issue 15, the run side).

Each probe runs ``python -m zosol.cli ...`` in a fresh directory holding a copy of a tiny
burgers1d dataset and checks what a user is promised: the documented exit code, exactly one
``zosol: ...`` line on stderr (progress bars aside), no traceback, no file outside the output
directory touched, no code run from a file.  Prints one line per probe and a summary::

    PYTHONPATH=. python experiments/probes_run.py [--only SUBSTRING] [--json out.json]

Counts are per probe (a probe is one adversarial input, some run several processes).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]  # probe this checkout, not an installed zosol
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}
TINY = ["--scenario", "burgers1d", "--preset", "tiny"]


class Evil:
    """A pickle that touches a marker file when loaded with weights_only=False."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def zosol(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "zosol.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def message_lines(stderr: str) -> list[str]:
    """stderr without progress bars and warnings lines."""
    out = []
    for line in re.split(r"[\r\n]", stderr):
        if not line.strip() or re.search(r"(step|it)/s|\d+%\|", line):
            continue
        out.append(line)
    return out


def verdict(r: subprocess.CompletedProcess, code: int, match: str = "") -> str | None:
    """None if ``r`` ended as promised (exit ``code``; for code != 0 one zosol line naming ``match``)."""
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        return f"traceback (exit {r.returncode}): {message_lines(r.stderr)[-1:]}"
    if r.returncode != code:
        return f"exit {r.returncode}, wanted {code}: {message_lines(r.stderr)[-2:]}"
    if code:
        lines = [ln for ln in message_lines(r.stderr) if not ln.startswith("zosol: warning")]
        if len(lines) != 1 or not lines[0].startswith("zosol: "):
            return f"not one zosol line: {lines[-3:]}"
        if match and match not in lines[0]:
            return f"message lacks {match!r}: {lines[0]}"
    return None


class Ctx:
    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.foreign = root.parent / (root.name + "-foreign.txt")  # a file outside every output dir
        self.foreign.write_text("precious\n")
        self.marker = root.parent / (root.name + "-PWNED")

    def foreign_ok(self) -> bool:
        return self.foreign.read_bytes() == b"precious\n" and not self.foreign.is_symlink()

    def train(self, *extra: str, out: str = "run", method: str = "non") -> subprocess.CompletedProcess:
        return zosol(self.root, "train", *TINY, "--method", method, "--data", str(self.data), "--out", out, *extra)

    def train_args(self, *extra: str, out: str = "run", method: str = "non") -> list[str]:
        return ["train", *TINY, "--method", method, "--data", str(self.data), "--out", out, *extra]

    def train_raw(self, *extra: str, out: str = "run", method: str = "non") -> subprocess.CompletedProcess:
        """``train`` without the default --data (the probe gives its own)."""
        return zosol(self.root, "train", *TINY, "--method", method, "--out", out, *extra)

    def compare(self, *extra: str, out: str = "cmp", methods: str = "non") -> subprocess.CompletedProcess:
        return zosol(
            self.root,
            "compare",
            *TINY,
            "--quiet",
            "--data",
            str(self.data.parent),
            "--out",
            out,
            "--methods",
            methods,
            *extra,
        )

    def evil_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        good = torch.load(path, weights_only=True) if path.exists() else {}
        torch.save({**good, "format": "zosol-checkpoint", "version": 1, "evil": Evil(str(self.marker))}, path)


PROBES: list[tuple[str, Callable[[Ctx], str | None]]] = []


def probe(name: str):
    def deco(fn):
        PROBES.append((name, fn))
        return fn

    return deco


# ----------------------------------------------------------------------------------------- #1
def _evil(c: Ctx, run: Callable[[], subprocess.CompletedProcess]) -> str | None:
    r = run()
    if c.marker.exists():
        return f"CODE RAN from a checkpoint (exit {r.returncode})"
    return verdict(r, 2, "checkpoint")


@probe("1a train --resume, malicious checkpoint.pt")
def _(c):
    assert c.train("--epochs", "1").returncode == 0
    c.evil_checkpoint(c.root / "run" / "checkpoint.pt")
    return _evil(c, lambda: c.train("--epochs", "1", "--resume"))


@probe("1b compare auto-resume, malicious runs/non/checkpoint.pt")
def _(c):
    c.evil_checkpoint(c.root / "cmp" / "runs" / "non" / "checkpoint.pt")
    return _evil(c, lambda: c.compare())


@probe("1c evaluate, malicious checkpoint.pt")
def _(c):
    assert c.train("--epochs", "1").returncode == 0
    c.evil_checkpoint(c.root / "run" / "checkpoint.pt")
    return _evil(c, lambda: zosol(c.root, "evaluate", "run"))


@probe("1d evaluate, pickle without the zosol format")
def _(c):
    (c.root / "run").mkdir()
    (c.root / "run" / "checkpoint.pt").write_bytes(pickle.dumps(Evil(str(c.marker))))
    return _evil(c, lambda: zosol(c.root, "evaluate", "run", "--data", str(c.data)))


# ----------------------------------------------------------------------------------------- #2
def _planted(
    c: Ctx,
    rel: str,
    run: Callable[[], subprocess.CompletedProcess],
    code: int = 0,
    prepare: Callable[[], None] | None = None,
) -> str | None:
    if prepare:
        prepare()
    p = c.root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(c.foreign)
    r = run()
    if not c.foreign_ok():
        return f"foreign file overwritten through a symlink at {rel} (exit {r.returncode})"
    return verdict(r, code)


for _rel in ("run/checkpoint.pt.tmp", "run/history.json", "run/config.json", "run/run.json", "run/checkpoint.pt"):
    probe(f"2 train, symlink planted at {_rel}")(
        lambda c, rel=_rel: _planted(
            c, rel, lambda: c.train("--epochs", "1", "--resume"), code=2 if rel.endswith(".pt") else 0
        )
    )
for _rel in (
    "cmp/results.json.tmp",
    "cmp/results.md",
    "cmp/results.csv",
    "cmp/frame_mae.tmp.png",
    "cmp/test_simulation.png",
    "cmp/runs/non/history.json",
):
    probe(f"2 compare, symlink planted at {_rel}")(lambda c, rel=_rel: _planted(c, rel, lambda: c.compare()))


# ----------------------------------------------------------------------------------------- #4
def _concurrent(c: Ctx, first: list[str], second: list[str], out: str) -> str | None:
    p1 = subprocess.Popen(
        [PY, "-m", "zosol.cli", *first],
        cwd=c.root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (c.root / out).exists() and time.time() < deadline and p1.poll() is None:
        time.sleep(0.05)
    time.sleep(1.5)  # well into the run (imports take ~1-2 s)
    t0 = time.time()
    r2 = zosol(c.root, *second)
    dt = time.time() - t0
    t0 = time.time()  # the same command's start-up alone: refused at once for a bad option
    zosol(c.root, *second, "--workers", "0")
    startup = time.time() - t0
    p1.communicate(timeout=600)
    problem = verdict(r2, 2, "in use by")
    if problem:
        return f"second run not refused: {problem}; first exit {p1.returncode}"
    if p1.returncode != 0:
        return f"first run failed (exit {p1.returncode})"
    # a process's refusal includes interpreter start-up (seconds on a loaded machine): compare
    # with the same command refused for a bad option
    return None if dt < startup + 1.0 else f"refusal took {dt:.1f} s (start-up alone {startup:.1f} s)"


@probe("4a two train runs into one --out (different --lr)")
def _(c):
    a = ["train", *TINY, "--method", "zo-sol", "--data", str(c.data), "--out", "run", "--epochs", "60"]
    b = a[:-2] + ["--epochs", "2", "--lr", "0.01"]
    problem = _concurrent(c, a, b, "run")
    if problem:
        return problem
    ck = torch.load(c.root / "run" / "checkpoint.pt", weights_only=True)
    cfg = json.loads((c.root / "run" / "config.json").read_text())
    return None if ck["config"] == cfg and cfg["epochs"] == 60 else "config.json and checkpoint.pt disagree"


@probe("4b two compare runs into one --out (different --epochs)")
def _(c):
    a = [
        "compare",
        *TINY,
        "--quiet",
        "--data",
        str(c.data.parent),
        "--out",
        "cmp",
        "--methods",
        "zo-sol",
        "--epochs",
        "40",
    ]
    b = a[:-1] + ["3"]
    problem = _concurrent(c, a, b, "cmp")
    if problem:
        return problem
    res = json.loads((c.root / "cmp" / "results.json").read_text())
    return None if res["train_config"]["ZO-SOL"]["epochs"] == 40 else "results.json holds the other run"


# ----------------------------------------------------------------------------------------- #5
def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            st = Path(f"/proc/{p}/stat").read_text().split()[2]
        except OSError:
            continue
        if st != "Z":
            alive.add(p)
    return alive


def _kill_workers(c: Ctx, sig: int) -> tuple[str | None, subprocess.Popen]:
    args = [
        "train",
        *TINY,
        "--method",
        "zo-sol",
        "--data",
        str(c.data),
        "--out",
        "run",
        "--epochs",
        "400",
        "--workers",
        "2",
    ]
    p = subprocess.Popen(
        [PY, "-m", "zosol.cli", *args],
        cwd=c.root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (c.root / "run" / "checkpoint.pt").exists():
        if p.poll() is not None or time.time() > deadline:
            return f"run ended before the kill (exit {p.returncode}): {p.stderr.read()[-300:]}", p
        time.sleep(0.05)
    kids = _descendants(p.pid)
    os.kill(p.pid, sig)
    t0 = time.time()
    while _alive(kids | {p.pid}) and time.time() - t0 < 5:
        p.poll()
        time.sleep(0.05)
    p.poll()
    left = _alive(kids | {p.pid})
    for k in left:
        os.kill(k, signal.SIGKILL)
    if left:
        return f"{len(left)} process(es) alive 5 s after the signal", p
    return None, p


@probe("5a kill -9 of a --workers 2 run")
def _(c):
    problem, _ = _kill_workers(c, signal.SIGKILL)
    if problem:
        return problem
    ck = c.root / "run" / "checkpoint.pt"
    before = ck.read_bytes()
    time.sleep(1.0)
    return None if ck.read_bytes() == before else "checkpoint changed after the parent died"


@probe("5b SIGTERM of a --workers 2 run")
def _(c):
    problem, p = _kill_workers(c, signal.SIGTERM)
    if problem:
        return problem
    err = p.stderr.read()
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    problem = verdict(r, 143, "stopped")
    if problem:
        return problem
    r = c.train("--epochs", "400", "--workers", "2", "--resume", method="zo-sol")
    return verdict(r, 0)


@probe("5c --workers 10000")
def _(c):
    return verdict(c.train("--workers", "10000", method="zo-sol"), 2, "workers")


@probe("5d --workers 0")
def _(c):
    return verdict(c.train("--workers", "0", method="zo-sol"), 2, "workers")


@probe("5e --workers 12 on this machine (more than its cores)")
def _(c):
    if (os.cpu_count() or 1) >= 12:
        return None
    return verdict(c.train("--workers", "12", method="zo-sol"), 2, "workers")


# ----------------------------------------------------------------------------------------- #6
def _diverging(r, c: Ctx) -> str | None:
    if r.returncode == 0:
        m = re.search(r"test MAE ([0-9.eE+naif-]+)", r.stdout)
        mae = float(m.group(1)) if m else float("nan")
        return None if mae < 1.0 else f"exit 0 with test MAE {mae}"
    return verdict(r, 1, "diverged")


for _m in ("non", "nog-sol", "fo-sol", "zo-sol"):
    probe(f"6a train {_m} --lr 1 (or diverging)")(
        lambda c, m=_m: _diverging(c.train("--lr", "1e3", "--epochs", "3", method=m), c)
    )


@probe("6b compare --lr 1e3 (all methods)")
def _(c):
    r = c.compare("--lr", "1e3", methods="non,nog-sol,fo-sol,zo-sol")
    res = c.root / "cmp" / "results.json"
    if not res.exists():
        return f"no results.json (exit {r.returncode}): {message_lines(r.stderr)[-1:]}"
    methods = json.loads(res.read_text())["methods"]
    md = (c.root / "cmp" / "results.md").read_text()
    unmarked = [
        k
        for k, v in methods.items()
        if k != "SRC" and v.get("status") != "diverged" and not (v.get("mae_mean") is not None and v["mae_mean"] < 1)
    ]
    if unmarked:
        return f"diverged methods not marked: {unmarked}"
    if "diverged" not in md:
        return "results.md does not say which diverged"
    return verdict(r, 1, "diverged")


@probe("6c --zo-mu 1e-30 warns")
def _(c):
    r = c.train("--zo-mu", "1e-30", "--epochs", "1", method="zo-sol")
    return None if "underflow" in r.stderr else f"no warning (exit {r.returncode})"


# ----------------------------------------------------------------------------------------- #7
@probe("7a disk full while checkpointing (ENOSPC from torch.save)")
def _(c):
    code = (
        "import errno, sys, torch, zosol.cli\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "torch.save = full\n"
        f"sys.exit(zosol.cli.main({['train', *TINY, '--method', 'non', '--data', str(c.data), '--out', 'run']!r}))\n"
    )
    r = subprocess.run([PY, "-c", code], cwd=c.root, env=ENV, capture_output=True, text=True)
    problem = verdict(r, 2, "No space left")  # a file-system error is exit 2 (zosol/cli.py)
    if problem:
        return problem
    left = [p.name for p in (c.root / "run").glob("*tmp*")]
    if left:
        return f"left temporary files {left}"
    return verdict(c.train("--resume"), 0)


@probe("7b read-only run directory (a refused write; root ignores chmod, so it is injected)")
def _(c):
    if os.geteuid() != 0:
        (c.root / "run").mkdir()
        os.chmod(c.root / "run", 0o555)
        try:
            return verdict(c.train(), 2, "run")
        finally:
            os.chmod(c.root / "run", 0o755)
    code = (
        "import errno, builtins, os, sys\n"
        "real = builtins.open\n"
        "def ro(f, mode='r', *a, **k):\n"
        "    if any(m in mode for m in 'wax+') and os.path.abspath(str(f)).startswith(os.path.abspath('run')):\n"
        "        raise PermissionError(errno.EACCES, 'Permission denied', str(f))\n"
        "    return real(f, mode, *a, **k)\n"
        "builtins.open = ro\n"
        "import io; io.open = ro\n"
        "real_os_open = os.open\n"
        "def ro_os(f, flags, *a, **k):\n"
        "    if flags & (os.O_WRONLY | os.O_RDWR) and os.path.abspath(str(f)).startswith(os.path.abspath('run')):\n"
        "        raise PermissionError(errno.EACCES, 'Permission denied', str(f))\n"
        "    return real_os_open(f, flags, *a, **k)\n"
        "os.open = ro_os\n"
        "import zosol.cli\n"
        f"sys.exit(zosol.cli.main({['train', *TINY, '--method', 'non', '--data', str(c.data), '--out', 'run']!r}))\n"
    )
    r = subprocess.run([PY, "-c", code], cwd=c.root, env=ENV, capture_output=True, text=True)
    return verdict(r, 2, "Permission denied")


@probe("7i ulimit -f 8 kB while training (EFBIG on the checkpoint)")
def _(c):
    import resource

    r = subprocess.run(
        [PY, "-m", "zosol.cli", "train", *TINY, "--method", "non", "--data", str(c.data), "--out", "run"],
        cwd=c.root,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000)),
    )
    problem = verdict(r, 2, "File too large")
    if problem:
        return problem
    left = [p.name for p in (c.root / "run").iterdir() if "tmp" in p.name]
    return f"left temporary files {left}" if left else verdict(c.train(), 0)


@probe("7c train --out that is a file")
def _(c):
    (c.root / "run").write_text("x")
    return verdict(c.train(), 2, "run")


@probe("7d compare --out that is a file")
def _(c):
    (c.root / "cmp").write_text("x")
    return verdict(c.compare(), 2, "cmp")


@probe("7e train --out with a 300-character name")
def _(c):
    return verdict(c.train(out="r" * 300), 2)


@probe("7f compare --data FILE.h5")
def _(c):
    r = zosol(c.root, "compare", *TINY, "--quiet", "--data", str(c.data), "--out", "cmp", "--methods", "non")
    return verdict(r, 0) if r.returncode == 0 else verdict(r, 2, str(c.data.name))


@probe("7g compare, results.json is a directory")
def _(c):
    (c.root / "cmp" / "results.json").mkdir(parents=True)
    return verdict(c.compare(), 2, "results.json")


@probe("7h evaluate RUN that is a file")
def _(c):
    (c.root / "run").write_text("x")
    return verdict(zosol(c.root, "evaluate", "run", "--data", str(c.data)), 2)


# ----------------------------------------------------------------------------------------- #8
@probe("8a --depth 10**6")
def _(c):
    return verdict(c.train("--depth", str(10**6)), 2, "depth")


@probe("8b grad_checks=10**9")
def _(c):
    r = c.train("--train-set", f"grad_checks={10**9}", "--epochs", "1", method="zo-sol")
    return verdict(r, 0) if r.returncode == 0 else verdict(r, 2, "grad_checks")


@probe("8c --width 10**6")
def _(c):
    return verdict(c.train("--width", str(10**6)), 2, "width")


@probe("8d --batch-size 10**12")
def _(c):
    r = c.train("--batch-size", str(10**12), "--epochs", "1")
    return verdict(r, 0) if r.returncode == 0 else verdict(r, 2, "batch")


@probe("8e --epochs 10**15")
def _(c):
    return verdict(c.train("--epochs", str(10**15)), 2, "epochs")


@probe("8f zo_chunk=10**12")
def _(c):
    r = c.train("--zo-chunk", str(10**12), "--epochs", "1", method="zo-sol")
    return verdict(r, 0) if r.returncode == 0 else verdict(r, 2, "zo_chunk")


# ----------------------------------------------------------------------------------------- #9
def _tampered(c: Ctx, change: Callable[[dict], None], match: str = "checkpoint") -> str | None:
    assert c.train("--epochs", "2").returncode == 0
    path = c.root / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)
    before = path.read_bytes()
    for args in (
        ["evaluate", "run"],
        ["train", *TINY, "--method", "non", "--data", str(c.data), "--out", "run", "--epochs", "2", "--resume"],
    ):
        problem = verdict(zosol(c.root, *args), 2, match)
        if problem:
            return f"{args[0]}: {problem}"
    return None if path.read_bytes() == before else "the checkpoint was changed"


def _first(d: dict):
    return next(iter(d))


_TAMPER = {
    "unknown key": lambda ck: ck.update(surprise=1),
    "wrong tensor shape": lambda ck: ck["model"].update({_first(ck["model"]): torch.zeros(3)}),
    "empty model": lambda ck: ck.update(model={}),
    "position 10**6": lambda ck: ck.update(position=10**6),
    "epoch=-5": lambda ck: ck.update(epoch=-5),
    "epoch 10**9": lambda ck: ck.update(epoch=10**9),
    "model not a dict": lambda ck: ck.update(model=[1, 2]),
    "history missing": lambda ck: ck.pop("history"),
    "optimizer state of another shape": lambda ck: ck["optimizer"]["state"].update(
        {0: {**ck["optimizer"]["state"][0], "exp_avg": torch.zeros(1)}}
    ),
    "window_rng not a tensor": lambda ck: ck.update(window_rng="x"),
    "NaN weights": lambda ck: ck["model"][_first(ck["model"])].fill_(float("nan")),
}
for _name, _fn in _TAMPER.items():
    probe(f"9 checkpoint: {_name}")(lambda c, fn=_fn: _tampered(c, fn))


# ----------------------------------------------------------------------------------------- #11
@probe("11a --device cuda without CUDA")
def _(c):
    if torch.cuda.is_available():
        return None
    return verdict(c.train("--device", "cuda"), 2, "cuda")


@probe("11b --device bogus")
def _(c):
    return verdict(c.train("--device", "bogus"), 2, "bogus")


@probe("11c --train-set zo_reuse=no")
def _(c):
    r = c.train("--train-set", "zo_reuse=no", "--epochs", "1", method="zo-sol")
    if r.returncode == 0:
        cfg = json.loads((c.root / "run" / "config.json").read_text())
        return None if cfg["zo_reuse"] is False else "zo_reuse=no became True"
    return verdict(r, 2, "zo_reuse")


@probe("11d --train-set zo_chunk=abc")
def _(c):
    return verdict(c.train("--train-set", "zo_chunk=abc", method="zo-sol"), 2, "zo_chunk")


@probe("11e compare --out ''")
def _(c):
    r = c.compare(out="")
    if (c.root / "results.json").exists():
        return "wrote into the current directory"
    return verdict(r, 2, "--out")


@probe("11f compare --methods ''")
def _(c):
    r = c.compare(methods="")
    return verdict(r, 2, "methods")


@probe("11g compare --methods 'non,,non'")
def _(c):
    return verdict(c.compare(methods="non,,non"), 2, "methods")


@probe("11h train --train-set epochs=2.5")
def _(c):
    return verdict(c.train("--train-set", "epochs=2.5"), 2, "epochs")


@probe("11i train --train-set lr=nan")
def _(c):
    return verdict(c.train("--train-set", "lr=NaN"), 2, "lr")


# ============================================================================== issue 23
# Files from others are data; nothing written outside --out; every fault one line; nothing orphaned.
def _copy_data(c: Ctx, name: str = "evil.h5") -> Path:
    dst = c.root / name
    shutil.copyfile(c.data, dst)
    return dst


def _h5(path: Path, change: Callable) -> Path:
    import h5py

    with h5py.File(path, "r+") as f:
        change(f)
    return path


def _plant(c: Ctx, name: str, code: str) -> None:
    (c.root / f"{name}.py").write_text(code)


MARK = "import pathlib\npathlib.Path({m!r}).write_text('ran')\n"
for _src in (
    "os:abort",
    "sys:exit",
    "code:interact",
    "tempfile:mkdtemp",
    "zosol.cli:main",
    "venv.__main__:main",
    "signal:pause",
    "os:fork",
    "planted_mod:boom",
):

    def _source_probe(c, src=_src):
        _plant(c, "planted_mod", MARK.format(m=str(c.marker)) + "def boom():\n    pass\n")
        path = _h5(_copy_data(c), lambda f: f.attrs.update(scenario="evil_pde", scenario_source=src))
        before = set(os.listdir(c.root))
        r = zosol(c.root, "info", str(path), timeout=120)
        if c.marker.exists():
            return "the dataset's source module was imported"
        if set(os.listdir(c.root)) - before:
            return f"files appeared: {sorted(set(os.listdir(c.root)) - before)}"
        return verdict(r, 2, "--plugin")

    probe(f"23.1 info of a dataset naming {_src}")(_source_probe)


@probe("23.1 evaluate of a run whose dataset names planted_mod:boom")
def _(c):
    assert c.train("--epochs", "1").returncode == 0
    _plant(c, "planted_mod", MARK.format(m=str(c.marker)) + "def boom():\n    pass\n")
    path = _h5(_copy_data(c), lambda f: f.attrs.update(scenario="evil_pde", scenario_source="planted_mod:boom"))
    (c.root / "run" / "run.json").write_text(json.dumps({"dataset": str(path)}))
    r = zosol(c.root, "evaluate", "run", timeout=120)
    return "the dataset's source module was imported" if c.marker.exists() else verdict(r, 2, "--plugin")


@probe("23.2 --plugin: a planted matplotlib.py does not shadow the installed one")
def _(c):
    _plant(c, "matplotlib", MARK.format(m=str(c.marker)) + "raise ImportError('planted')\n")
    _plant(c, "myplug", "X = 1\n")
    r = subprocess.run(
        [PY, "-P", "-m", "zosol.cli", "info", str(c.data), "--plugin", "myplug", "--plot", "f.png"],
        cwd=c.root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return "a planted module shadowed an installed package" if c.marker.exists() else verdict(r, 0)


def _listeners_not_loopback(pids: set[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
                if t.startswith("socket:["):
                    inodes.add(t[8:-1])
        except OSError:
            continue
    bad = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if (
                f[3] == "0A"
                and f[9] in inodes
                and not f[1].startswith(
                    ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
                )
            ):
                bad.append(f[1])
    return bad


@probe("23.3 --workers 2 listens on loopback only")
def _(c):
    p = subprocess.Popen(
        [PY, "-m", "zosol.cli", *c.train_args("--epochs", "200", "--workers", "2", method="zo-sol")],
        cwd=c.root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[str] = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline and p.poll() is None:
            pids = _descendants(p.pid) | {p.pid}
            seen += _listeners_not_loopback(pids)
            if (c.root / "run" / "checkpoint.pt").exists():
                break
            time.sleep(0.5)
    finally:
        p.kill()
        p.wait()
        time.sleep(1)
    return f"listening on {sorted(set(seen))}" if seen else None


for _link in ("runs", "runs/non", "data"):

    def _symlink_probe(c, link=_link):
        elsewhere = c.root.parent / (c.root.name + "-elsewhere")
        elsewhere.mkdir()
        (c.root / "cmp" / link).parent.mkdir(parents=True, exist_ok=True)
        (c.root / "cmp" / link).symlink_to(elsewhere)
        extra = ["--data", str(c.data)] if link != "data" else []
        r = zosol(c.root, "compare", *TINY, "--quiet", "--methods", "non", "--epochs", "1", *extra, "--out", "cmp")
        if any(elsewhere.iterdir()):
            return f"wrote through cmp/{link} into {sorted(x.name for x in elsewhere.iterdir())}"
        return verdict(r, 2, "symbolic link")

    probe(f"23.4 compare --out with a planted symlink at {_link}")(_symlink_probe)

for _lock in ("run/.zosol.lock", "cmp/.zosol.lock", "gen/burgers1d_tiny.h5.lock"):

    def _hardlink_probe(c, lock=_lock):
        (c.root / lock).parent.mkdir(parents=True, exist_ok=True)
        os.link(c.foreign, c.root / lock)
        if lock.startswith("run"):
            r = c.train("--epochs", "1")
        elif lock.startswith("cmp"):
            r = c.compare("--epochs", "1")
        else:
            r = zosol(c.root, "generate", *TINY, "--quiet", "--out", "gen")
        return "the hard-linked file was rewritten" if not c.foreign_ok() else verdict(r, 2, "hard link")

    probe(f"23.5 hard-linked lock file {_lock}")(_hardlink_probe)


@probe("23.6 train --data nope/missing.h5")
def _(c):
    r = zosol(c.root, "train", *TINY, "--method", "non", "--data", "nope/missing.h5", "--out", "run")
    return "created nope/" if (c.root / "nope").exists() else verdict(r, 2, "--data")


@probe("23.6 train --resume --data nope/missing.h5")
def _(c):
    assert c.train("--epochs", "1").returncode == 0
    r = zosol(c.root, "train", *TINY, "--method", "non", "--data", "nope/missing.h5", "--out", "run", "--resume")
    return "created nope/" if (c.root / "nope").exists() else verdict(r, 2, "--data")


@probe("23.7 generate: a finished part overwritten with finite values")
def _(c):
    import numpy as np

    import zosol.datasets.generate as g
    from zosol.datasets import load_dataset

    good = load_dataset(c.data)
    parts = c.root / "gen" / "burgers1d_tiny.h5.parts"  # an interrupted generation, one part tampered
    parts.mkdir(parents=True)
    (parts / "config.json").write_text(json.dumps({**good.scenario.describe(), "batch": 8}, sort_keys=True))
    sim = good.train[1]
    tr, pa = sim.trajectory.numpy(), sim.params.numpy()
    kept = {"sha256": g.simulation_digest(tr, pa)} if hasattr(g, "simulation_digest") else {}  # its own checksum
    np.savez(parts / "train_1.npz", trajectory=tr + np.float32(0.5), params=pa, **kept)
    r = zosol(c.root, "generate", *TINY, "--quiet", "--out", "gen")
    if r.returncode != 0:
        return verdict(r, 0)
    made = load_dataset(c.root / "gen" / "burgers1d_tiny.h5")
    return None if made.train[1].trajectory.equal(sim.trajectory) else "tampered values in the dataset"


@probe("23.8 info warns when test sims duplicate training ones")
def _(c):
    from zosol.datasets import load_dataset
    from zosol.datasets.hdf5 import write_dataset

    ds = load_dataset(c.data)
    path = write_dataset(c.root / "dup.h5", ds.scenario, ds.train, [ds.train[0]])
    r = zosol(c.root, "info", str(path))
    return None if "duplicate training" in r.stderr else f"no warning (exit {r.returncode})"


@probe("23.9 kill -9 of train with a StatePool scenario leaves no worker")
def _(c):
    _plant(
        c,
        "pool_plug",
        "import time, numpy as np\nfrom zosol.solvers import make_scenario, register\n"
        "def slow(u, p):\n    time.sleep(0.01)\n    return 0.9 * u\n"
        "register('pool_plug', make_scenario('pool_plug', reference=slow, coarse=slow, sample=lambda s: "
        "(np.random.default_rng(s).normal(size=(1, 16)), None), dt=0.1, reference_shape=(16,), coarse_shape=(16,),"
        " batched=False, processes=2, frames=6, train_sims=4, test_sims=1))\n",
    )
    p = subprocess.Popen(
        [
            PY,
            "-m",
            "zosol.cli",
            "train",
            "--plugin",
            "pool_plug",
            "--scenario",
            "pool_plug",
            "--method",
            "zo-sol",
            "--epochs",
            "500",
            "--out",
            "run",
        ],
        cwd=c.root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kids: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and len(kids) < 1 and p.poll() is None:
        kids = _descendants(p.pid)
        time.sleep(0.3)
    time.sleep(2)
    kids |= _descendants(p.pid)
    p.kill()
    p.wait()
    time.sleep(3)
    left = _alive(kids)
    for k in left:
        os.kill(k, signal.SIGKILL)
    return f"{len(left)} worker(s) survived kill -9" if left else (None if kids else "no pool worker seen")


PLUGIN_FAULTS = {
    "raises RuntimeError": "raise RuntimeError('boom')\n",
    "SyntaxError": "def f(:\n    pass\n",
    "ImportError of a name": "from os import no_such_name\n",
    "register('x', 5)": "from zosol.solvers import register\nregister('x', 5)\n",
    "re-registers burgers1d with a string": "from zosol.solvers import register\nregister('burgers1d', 'x')\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
}
for _what, _code in PLUGIN_FAULTS.items():

    def _plugin_probe(c, code=_code):
        _plant(c, "faulty_plug", code)
        return verdict(zosol(c.root, "info", str(c.data), "--plugin", "faulty_plug"), 2, "faulty_plug")

    probe(f"23.10 --plugin that {_what}")(_plugin_probe)

LOADER_FAULTS = {"returns 42": "lambda: 42", "raises KeyError": "lambda: {}['k']"}
for _what, _loader in LOADER_FAULTS.items():

    def _loader_probe(c, loader=_loader):
        _plant(c, "loader_plug", f"from zosol.solvers import register\nregister('loader_x', {loader})\n")
        path = _h5(_copy_data(c), lambda f: f.attrs.update(scenario="loader_x"))
        return verdict(zosol(c.root, "info", str(path), "--plugin", "loader_plug"), 2, "loader_x")

    probe(f"23.10 a registered loader that {_what}")(_loader_probe)

SAMPLES = {
    "wrong shape": "return np.zeros((1, 64)), None",
    "extra dims": "return np.zeros((1, 1, 128)), None",
    "None": "return None",
    "a string": "return 'abc'",
    "params of varying length": "return np.zeros((1, 128)), np.zeros(seed % 2 + 1)",
}
for _what, _body in SAMPLES.items():

    def _sample_probe(c, body=_body):
        _plant(
            c,
            "samp_plug",
            "import numpy as np\nfrom zosol.solvers import make_scenario, register\n"
            f"def sample(seed):\n    {body}\n"
            "register('samp', make_scenario('samp', reference=lambda u, p: u, coarse=lambda u, p: u, "
            "sample=sample, dt=0.1, reference_shape=(128,), coarse_shape=(16,), num_params=1, frames=2, "
            "train_sims=2, test_sims=1))\n",
        )
        r = zosol(c.root, "generate", "--plugin", "samp_plug", "--scenario", "samp", "--quiet", "--out", "d")
        return verdict(r, 2, "sample(")

    probe(f"23.10 sample() returning {_what}")(_sample_probe)


for _rank in (0, 1):

    def _lost_worker_probe(c, rank=_rank):
        p = subprocess.Popen(
            [PY, "-m", "zosol.cli", *c.train_args("--epochs", "3000", "--workers", "2", method="zo-sol")],
            cwd=c.root,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 180
        workers: list[int] = []
        while time.time() < deadline and p.poll() is None and not (c.root / "run" / "checkpoint.pt").exists():
            time.sleep(0.5)
        time.sleep(2)
        for k in sorted(_descendants(p.pid)):
            try:
                if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text():
                    workers.append(k)
            except OSError:
                pass
        if len(workers) < 2:
            p.kill()
            return f"saw {len(workers)} workers"
        os.kill(workers[rank], signal.SIGKILL)
        _, err = p.communicate(timeout=300)
        r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
        return verdict(r, 1, "worker")

    probe(f"23.10 --workers 2 with rank {_rank} killed")(_lost_worker_probe)


@probe("23.10 train --kernel 35 on a 16-cell grid")
def _(c):
    return verdict(c.train("--kernel", "35"), 2, "--kernel")


for _field, _value in (("width", 4096), ("kernel", 99)):

    def _config_probe(c, field=_field, value=_value):
        assert c.train("--epochs", "1").returncode == 0
        path = c.root / "run" / "checkpoint.pt"
        ck = torch.load(path, weights_only=True)
        ck["config"][field] = value
        torch.save(ck, path)
        return verdict(zosol(c.root, "evaluate", "run"), 2, "checkpoint")

    probe(f"23.10 evaluate a checkpoint whose config says {_field} {_value}")(_config_probe)


@probe("23.11 reference step calling sys.exit(0) during generate")
def _(c):
    _plant(
        c,
        "exit_plug",
        "import sys, numpy as np\nfrom zosol.solvers import make_scenario, register\n"
        "def ref(u, p):\n    sys.exit(0)\n"
        "register('exitx', make_scenario('exitx', reference=ref, coarse=lambda u, p: u, sample=lambda s: "
        "(np.zeros((1, 8)), None), dt=0.1, reference_shape=(8,), coarse_shape=(8,), frames=2, train_sims=1, "
        "test_sims=1))\n",
    )
    r = zosol(c.root, "generate", "--plugin", "exit_plug", "--scenario", "exitx", "--quiet", "--out", "d")
    return verdict(r, 1, "sys.exit")


for _args, _match in (
    (["--epochs", "1000000", "--width", "256", "--depth", "8"], "would take at least"),
    (["--threads-global"], "--threads"),
):

    def _time_probe(c, args=_args, match=_match):
        if args == ["--threads-global"]:
            return verdict(zosol(c.root, "--threads", "1000000", "info", str(c.data)), 2, match)
        return verdict(c.train(*args), 2, match)

    probe(f"23.12 {' '.join(_args)} refused up front")(_time_probe)


@probe("23.12 generate --set dt=1e6 refused up front")
def _(c):
    return verdict(zosol(c.root, "generate", *TINY, "--set", "dt=1e6", "--out", "d"), 2, "would take at least")


@probe("23.13 info fifo.h5")
def _(c):
    os.mkfifo(c.root / "fifo.h5")
    try:
        r = zosol(c.root, "info", "fifo.h5", timeout=60)
    except subprocess.TimeoutExpired:
        return "hangs"
    return verdict(r, 2, "regular file")


@probe("23.13 train --data /dev/zero")
def _(c):
    return verdict(c.train_raw("--data", "/dev/zero"), 2, "--data /dev/zero")


def _set_config(**extra):
    def change(f):
        f.attrs["config"] = json.dumps({**json.loads(f.attrs["config"]), **extra})

    return change


def _frames_zero(c: Ctx) -> Path:
    from zosol.datasets import load_dataset
    from zosol.datasets.hdf5 import Simulation, write_dataset

    ds = load_dataset(c.data)
    cut = [Simulation(s.seed, s.trajectory[:1], s.params) for s in ds.train + ds.test]
    return write_dataset(c.root / "zero.h5", ds.scenario, cut[: len(ds.train)], cut[len(ds.train) :])


CRAFTED = {
    "frames=0": lambda c: _frames_zero(c),
    "a 50 MB variable-length string attribute": lambda c: _h5(
        _copy_data(c), lambda f: f.attrs.__setitem__("preset", "x" * (50 << 20))
    ),
    "unknown config keys": lambda c: _h5(_copy_data(c), _set_config(evil=1)),
    "a name that disagrees with the source": lambda c: _h5(
        _copy_data(c), lambda f: f.attrs.__setitem__("scenario_source", "zosol.solvers.karman2d:Karman2DScenario")
    ),
    "seed -1": lambda c: _h5(_copy_data(c), lambda f: f.move("train/0", "train/-1")),
    "seed 2**70": lambda c: _h5(_copy_data(c), lambda f: f.move("train/0", f"train/{2**70}")),
}
for _what, _make in CRAFTED.items():

    def _crafted_probe(c, make=_make):
        r = zosol(c.root, "info", str(make(c)))
        problem = verdict(r, 2)
        if problem is None and len(r.stderr) > 3000:
            return f"error line of {len(r.stderr)} characters"
        return problem

    probe(f"23.14 dataset with {_what}")(_crafted_probe)


for _key, _value in (("scheduler", {"last_epoch": 10**9}), ("history", {"solver_samples": -5})):

    def _resume_probe(c, key=_key, value=_value):
        assert c.train("--epochs", "2", "--train-set", "epochs=2").returncode == 0
        path = c.root / "run" / "checkpoint.pt"
        ck = torch.load(path, weights_only=True)
        ck["epoch"], ck[key] = 1, {**ck[key], **value}
        ck["history"]["loss"] = ck["history"]["loss"][: len(ck["history"]["loss"]) // 2]
        torch.save(ck, path)
        return verdict(c.train("--epochs", "2", "--resume"), 2, "checkpoint")

    probe(f"23.15 resume with {_key} {_value}")(_resume_probe)


@probe("23.16 --workers 2 with a make_scenario plugin")
def _(c):
    _plant(
        c,
        "lam_plug",
        "import numpy as np\nfrom zosol.solvers import make_scenario, register\n"
        "register('lam', make_scenario('lam', reference=lambda u, p: 0.9 * u, coarse=lambda u, p: 0.8 * u, "
        "sample=lambda s: (np.random.default_rng(s).normal(size=(1, 16)), None), dt=0.1, reference_shape=(16,), "
        "coarse_shape=(16,), frames=4, train_sims=2, test_sims=1))\n",
    )
    r = zosol(
        c.root,
        "train",
        "--plugin",
        "lam_plug",
        "--scenario",
        "lam",
        "--method",
        "zo-sol",
        "--epochs",
        "1",
        "--workers",
        "2",
        "--out",
        "run",
    )
    return verdict(r, 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="zosol-probes-"))
    data_dir = base / "data"
    subprocess.run(
        [PY, "-m", "zosol.cli", "generate", *TINY, "--out", str(data_dir), "--quiet"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    data = data_dir / "burgers1d_tiny.h5"
    results = {}
    for i, (name, fn) in enumerate(PROBES):
        if args.only not in name:
            continue
        root = base / f"p{i:02d}"
        root.mkdir()
        c = Ctx(root, data)
        t0 = time.time()
        try:
            problem = fn(c)
        except Exception as e:  # noqa: BLE001 - a probe that could not run is reported, not hidden
            problem = f"probe error: {type(e).__name__}: {e}"
        if problem is None and not c.foreign_ok():
            problem = "foreign file changed"
        if problem is None and c.marker.exists():
            problem = "code ran from a file"
        results[name] = problem
        print(
            f"{'ok  ' if problem is None else 'BAD '} {name} ({time.time() - t0:.0f} s)"
            f"{'' if problem is None else ': ' + problem[:300]}",
            flush=True,
        )
    bad = sum(v is not None for v in results.values())
    print(f"\n{len(results)} probes, {len(results) - bad} handled, {bad} mishandled")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
