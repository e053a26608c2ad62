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
