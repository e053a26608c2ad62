"""Adversarial inputs to train / evaluate / compare and their checkpoints (issue 15, the run side):
code in checkpoints, planted symlinks, concurrent runs, orphaned workers and SIGTERM,
divergence, file-system errors, tampered checkpoints, oversized configs, bad options.

Every failure must be one ``zosol: ...`` line with exit 2 (user error) or 1 (failed run), 143 for
SIGTERM, no traceback, nothing written outside the output directory, and a rerun that reaches
the result of an undisturbed run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zosol.cli import main

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}
TINY = ["--scenario", "burgers1d", "--preset", "tiny"]


def _train(data, out, *extra, method="non"):
    return ["train", *TINY, "--method", method, "--data", str(data), "--out", str(out), *extra]


def _compare(data, out, *extra, methods="non"):
    return [
        "compare",
        *TINY,
        "--quiet",
        "--data",
        str(Path(data).parent),
        "--out",
        str(out),
        "--methods",
        methods,
        *extra,
    ]


def _progress(line: str) -> bool:
    """A progress-bar line (tqdm)."""
    return "%|" in line or "/step" in line or "step/s" in line or "it/s" in line


def _failed(capsys, argv, code, match=""):
    """Run ``zosol argv``; it must exit ``code`` with one ``zosol: ...`` stderr line holding ``match``."""
    capsys.readouterr()
    got = main(argv)
    out = capsys.readouterr()
    lines = [
        ln
        for ln in out.err.replace("\r", "\n").splitlines()
        if ln.strip() and not _progress(ln) and not ln.startswith(("zosol: warning", "zosol: note"))
    ]
    assert got == code, out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    assert len(lines) == 1 and lines[0].startswith("zosol: "), lines
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_h5):
    """A finished 2-epoch NON run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train(tiny_h5, run, "--epochs", "2")) == 0
    return run


@pytest.fixture
def run_copy(tmp_path, trained_run):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    good = torch.load(path, weights_only=True) if path.exists() else {"format": "zosol-checkpoint", "version": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**good, "hook": Evil(str(marker))}, path)


# ------------------------------------------------------------------------------ 1: code in files
@pytest.mark.parametrize("entry", ["train --resume", "compare", "evaluate", "load_run"])
def test_a_malicious_checkpoint_never_runs_code(tmp_path, tiny_h5, run_copy, capsys, entry):
    marker = tmp_path / "PWNED"
    if entry == "compare":
        _poison(tmp_path / "cmp" / "runs" / "non" / "checkpoint.pt", marker)
        _failed(capsys, _compare(tiny_h5, tmp_path / "cmp"), 2, "checkpoint")
    elif entry == "load_run":
        from zosol.datasets import load_dataset
        from zosol.training import CheckpointError, load_run

        _poison(run_copy / "checkpoint.pt", marker)
        with pytest.raises(CheckpointError, match="checkpoint"):
            load_run(run_copy, load_dataset(tiny_h5))
    else:
        _poison(run_copy / "checkpoint.pt", marker)
        argv = (
            _train(tiny_h5, run_copy, "--epochs", "2", "--resume")
            if entry.startswith("train")
            else ["evaluate", str(run_copy)]
        )
        _failed(capsys, argv, 2, "checkpoint")
    assert not marker.exists()


def test_genuine_checkpoints_load_with_weights_only(trained_run):
    ck = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert ck["format"] == "zosol-checkpoint" and ck["epoch"] == 2


# ------------------------------------------------------------------------------ 2: symlinks
RUN_FILES = ["checkpoint.pt.tmp", "history.json", "config.json", "run.json", "history.json.tmp"]
COMPARE_FILES = [
    "results.json",
    "results.json.tmp",
    "results.md",
    "results.csv",
    "frame_mae.png",
    "frame_mae.tmp.png",
    "test_simulation.png",
    "test_simulation.gif",
    "runs/non/history.json",
    "runs/non/config.json",
]


def test_planted_symlinks_are_never_followed(tmp_path, tiny_h5, capsys):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("precious")
    run, cmp = tmp_path / "run", tmp_path / "cmp"
    for rel in RUN_FILES:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).symlink_to(foreign)
    for rel in COMPARE_FILES:
        (cmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (cmp / rel).symlink_to(foreign)
    assert main(_train(tiny_h5, run, "--epochs", "1", "--resume")) == 0
    assert main(_compare(tiny_h5, cmp, "--epochs", "1")) == 0
    assert foreign.read_text() == "precious"
    for f in ("history.json", "config.json", "run.json", "checkpoint.pt"):
        assert (run / f).is_file() and not (run / f).is_symlink(), f
    written = ("results.json", "results.md", "results.csv", "frame_mae.png", "test_simulation.gif")
    for f in (*written, "runs/non/history.json"):
        assert (cmp / f).is_file() and not (cmp / f).is_symlink(), f
    assert json.loads((cmp / "results.json").read_text())["methods"]["NON"]["epochs"] == 1


# ------------------------------------------------------------------------------ 4: locks
def _start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "zosol.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_for(path: Path, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_second_run_on_a_directory_is_refused_at_once(tmp_path, tiny_h5, capsys, command):
    out = tmp_path / "out"
    first = (
        _train(tiny_h5, out, "--epochs", "5000", method="zo-sol")
        if command == "train"
        else _compare(tiny_h5, out, "--epochs", "5000", methods="zo-sol")
    )
    proc = _start(first, tmp_path)
    try:
        _wait_for(out / ("checkpoint.pt" if command == "train" else "runs/zo-sol/checkpoint.pt"), proc)
        before = {p: p.read_bytes() for p in out.rglob("*.json")}
        t0 = time.perf_counter()
        second = (
            _train(tiny_h5, out, "--epochs", "2", "--lr", "0.5", "--resume", method="zo-sol")
            if command == "train"
            else _compare(tiny_h5, out, "--epochs", "2", methods="zo-sol")
        )
        line = _failed(capsys, second, 2, "in use by")
        assert time.perf_counter() - t0 < 1.0
        assert f"pid {proc.pid}" in line
        assert {p: p.read_bytes() for p in out.rglob("*.json")} == before
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------ 5: workers
def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            found.add(k)
            todo.append(k)
    return found


def _alive(pids) -> set[int]:
    alive = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(p)
        except OSError:
            pass
    return alive


def _signal_a_two_worker_run(tmp_path, tiny_h5, sig, epochs):
    run = tmp_path / "run"
    proc = _start(_train(tiny_h5, run, "--epochs", str(epochs), "--workers", "2", method="zo-sol"), tmp_path)
    try:
        _wait_for(run / "checkpoint.pt", proc)
        family = _descendants(proc.pid) | {proc.pid}
        assert len(family) >= 3  # the parent and two workers
        os.kill(proc.pid, sig)
        t0 = time.time()
        while _alive(family) and time.time() - t0 < 5:
            proc.poll()
            time.sleep(0.05)
        proc.poll()
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in _alive(family)}
        assert not left, f"alive 5 s after the signal: {left}"
    finally:
        for p in _alive(_descendants(proc.pid) | {proc.pid}):
            os.kill(p, signal.SIGKILL)
    return proc, run


def test_kill_9_of_a_two_worker_run_leaves_no_process(tmp_path, tiny_h5, capsys):
    proc, run = _signal_a_two_worker_run(tmp_path, tiny_h5, signal.SIGKILL, 5000)
    before = (run / "checkpoint.pt").read_bytes()
    time.sleep(0.5)
    assert (run / "checkpoint.pt").read_bytes() == before  # nobody is training any more
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] >= 1


def _sigterm_two_workers(tmp_path, tiny_h5, epochs):
    """SIGTERM a 2-worker run: every process gone within 5 s, exit 143, one line, a checkpoint."""
    proc, run = _signal_a_two_worker_run(tmp_path, tiny_h5, signal.SIGTERM, epochs)
    err = proc.stderr.read().decode()
    assert proc.returncode == 143, err[-2000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not _progress(ln)]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], lines
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] < epochs
    return run


def test_sigterm_of_a_two_worker_run_checkpoints_and_exits_143(tmp_path, tiny_h5):
    _sigterm_two_workers(tmp_path, tiny_h5, 5000)


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_undisturbed_run(tmp_path, tiny_h5, capsys):
    epochs = 60
    run = _sigterm_two_workers(tmp_path, tiny_h5, epochs)
    assert main(_train(tiny_h5, run, "--epochs", str(epochs), "--resume", method="zo-sol")) == 0
    assert main(_train(tiny_h5, tmp_path / "clean", "--epochs", str(epochs), method="zo-sol")) == 0
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    assert a["history"]["loss"] == b["history"]["loss"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize(
    "n, match",
    [
        ("0", "--workers must be"),
        ("-3", "--workers must be"),
        ("10000", "cores"),
        (str((os.cpu_count() or 1) + 1), "cores"),
    ],
)
def test_workers_are_bounded_by_the_cores(tmp_path, tiny_h5, cli_user_error, n, match):
    cli_user_error(_train(tiny_h5, tmp_path / "run", "--workers", n, method="zo-sol"), match)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 6: divergence
@pytest.mark.parametrize("method", ["non", "nog-sol", "fo-sol", "zo-sol"])
def test_divergence_is_one_line_exit_1_and_keeps_the_checkpoint(tmp_path, tiny_h5, capsys, method):
    run = tmp_path / "run"
    _failed(capsys, _train(tiny_h5, run, "--lr", "1e3", "--epochs", "4", method=method), 1, "diverge")
    if (run / "checkpoint.pt").exists():  # the last good one
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
    # a rerun reaches the same result
    _failed(capsys, _train(tiny_h5, run, "--lr", "1e3", "--epochs", "4", "--resume", method=method), 1, "diverge")


def test_compare_marks_a_diverged_method_and_finishes_the_others(tmp_path, tiny_h5, capsys):
    out = tmp_path / "cmp"
    # NON tolerates a large step size on tiny; the SOL methods do not
    line = _failed(
        capsys,
        _compare(tiny_h5, out, "--lr", "1e3", "--epochs", "4", methods="non,nog-sol,fo-sol,zo-sol"),
        1,
        "diverged",
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"SRC", "NON", "NOG-SOL", "FO-SOL", "ZO-SOL"}
    diverged = [k for k, v in res["methods"].items() if v.get("status") == "diverged"]
    assert diverged and all(name in line for name in diverged)
    for k, v in res["methods"].items():
        if k not in diverged:
            assert v["mae_mean"] < 1.0
        else:
            assert v["mae_mean"] is None and v["message"]
    md = (out / "results.md").read_text()
    assert all(f"| {name} | diverged" in md for name in diverged)
    assert "diverged" in (out / "results.csv").read_text()
    again = tmp_path / "again"
    shutil.copytree(out, again)
    _failed(
        capsys,
        _compare(tiny_h5, again, "--lr", "1e3", "--epochs", "4", methods="non,nog-sol,fo-sol,zo-sol"),
        1,
        "diverged",
    )
    res2 = json.loads((again / "results.json").read_text())
    for k in res["methods"]:
        assert res2["methods"][k].get("mae_per_sim") == res["methods"][k].get("mae_per_sim"), k


def test_an_exploding_evaluation_is_not_a_success(tmp_path, tiny_h5, capsys):
    """A corrector whose training loss stayed finite but whose test rollout explodes."""
    from zosol.datasets import load_dataset
    from zosol.evaluation import EvaluationDiverged, evaluate

    class Blowup(torch.nn.Module):
        def forward(self, x):
            return 50.0 * x[:, :1]  # the state channel, grown 50x per step

    with pytest.raises(EvaluationDiverged, match="diverge"):
        evaluate(load_dataset(tiny_h5), Blowup())


def test_a_zero_order_step_that_underflows_warns(tmp_path, tiny_h5, capsys):
    assert main(_train(tiny_h5, tmp_path / "run", "--zo-mu", "1e-30", "--epochs", "1", method="zo-sol")) == 0
    err = capsys.readouterr().err
    warn = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("zosol: warning")]
    assert len(warn) == 1 and "underflow" in warn[0] and "--zo-mu" in warn[0], err[-1500:]


# ------------------------------------------------------------------------------ 7: file system
def test_disk_full_while_checkpointing(tmp_path, tiny_h5, capsys, monkeypatch):
    """The disk fills after the first checkpoint: one line, the first checkpoint intact, no
    temporary files, and --resume reaches the undisturbed result."""
    run, real, saved = tmp_path / "run", torch.save, []

    def fills_up(obj, f, *a, **k):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(real(obj, f, *a, **k))

    monkeypatch.setattr(torch, "save", fills_up)
    _failed(capsys, _train(tiny_h5, run, "--epochs", "3"), 2, "No space left on device")
    monkeypatch.undo()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "run.json"]
    assert main(_train(tiny_h5, run, "--epochs", "3", "--resume")) == 0
    assert main(_train(tiny_h5, tmp_path / "clean", "--epochs", "3")) == 0
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    assert a["history"]["loss"] == b["history"]["loss"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_disk_full_while_writing_the_results(tmp_path, tiny_h5, capsys, monkeypatch):
    out = tmp_path / "cmp"
    import zosol.runtime.files as fsutil

    real = fsutil.atomic_save

    def full(path, writer, **kw):
        if Path(path).name.startswith("results"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, writer, **kw)

    monkeypatch.setattr(fsutil, "atomic_save", full)
    _failed(capsys, _compare(tiny_h5, out, "--epochs", "1"), 2, "No space left on device")
    assert not list(out.glob("results*")) and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert main(_compare(tiny_h5, out, "--epochs", "1")) == 0
    assert main(_compare(tiny_h5, tmp_path / "clean", "--epochs", "1")) == 0
    a = json.loads((out / "results.json").read_text())["methods"]["NON"]["mae_per_sim"]
    assert a == json.loads((tmp_path / "clean" / "results.json").read_text())["methods"]["NON"]["mae_per_sim"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_run_directory(tmp_path, tiny_h5, cli_user_error):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        cli_user_error(_train(tiny_h5, run), "not writable")
    finally:
        run.chmod(0o755)
    assert list(run.iterdir()) == []


def test_a_write_refused_by_the_file_system(tmp_path, tiny_h5, cli_user_error, monkeypatch):
    """Root ignores chmod, so the refusal is injected where the kernel raises it (the temporary
    file of an atomic write): one line naming the directory, nothing left behind."""
    import zosol.runtime.files as fsutil

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))

    monkeypatch.setattr(fsutil, "_new_temp", refused)
    run = tmp_path / "run"
    cli_user_error(_train(tiny_h5, run), f"cannot write or read {run}: Permission denied")
    cli_user_error(_compare(tiny_h5, tmp_path / "cmp"), "Permission denied")
    assert not [p for p in run.iterdir() if p.name != ".zosol.lock"]


def test_file_size_limit_while_checkpointing(tmp_path, tiny_h5, capsys):
    """``ulimit -f`` 8 kB: config.json and run.json fit, the checkpoint (~13 kB) does not (EFBIG)."""
    import resource

    limit = 8_000
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "zosol.cli", *_train(tiny_h5, run, "--epochs", "2")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ln.strip() and not _progress(ln)]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and "File too large" in lines[0] and "checkpoint.pt" in lines[0], lines
    assert sorted(q.name for q in run.iterdir()) == ["config.json", "run.json"]
    assert main(_train(tiny_h5, run, "--epochs", "2")) == 0
    assert main(_train(tiny_h5, tmp_path / "clean", "--epochs", "2")) == 0
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "clean" / "checkpoint.pt", weights_only=True)
    assert a["history"]["loss"] == b["history"]["loss"]


def test_output_paths_that_cannot_be_used(tmp_path, tiny_h5, cli_user_error):
    (tmp_path / "afile").write_text("keep")
    cli_user_error(_train(tiny_h5, tmp_path / "afile"), "not a directory")
    cli_user_error(_compare(tiny_h5, tmp_path / "afile"), "not a directory")
    cli_user_error(["evaluate", str(tmp_path / "afile"), "--data", str(tiny_h5)], "not a directory")
    assert (tmp_path / "afile").read_text() == "keep"
    cli_user_error(_train(tiny_h5, tmp_path / ("r" * 300)), "too long")
    (tmp_path / "cmp" / "results.json").mkdir(parents=True)
    cli_user_error(_compare(tiny_h5, tmp_path / "cmp"), "results.json")
    assert not (tmp_path / "cmp" / "runs").exists()  # refused before training


def test_compare_accepts_a_dataset_file(tmp_path, tiny_h5, capsys):
    argv = [
        "compare",
        *TINY,
        "--quiet",
        "--data",
        str(tiny_h5),
        "--out",
        str(tmp_path / "cmp"),
        "--methods",
        "non",
        "--epochs",
        "1",
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["dataset"] == str(tiny_h5)


# ------------------------------------------------------------------------------ 9: checkpoint contents
def _first(d):
    return next(iter(d))


TAMPER = {
    "unknown key": lambda ck: ck.update(surprise=1),
    "wrong tensor shape": lambda ck: ck["model"].update({_first(ck["model"]): torch.zeros(3)}),
    "empty model": lambda ck: ck.update(model={}),
    "position out of range": lambda ck: ck.update(position=10**6),
    "negative epoch": lambda ck: ck.update(epoch=-5),
    "epoch past the end": lambda ck: ck.update(epoch=10**9),
    "model not a dict": lambda ck: ck.update(model=[1, 2]),
    "history missing": lambda ck: ck.pop("history"),
    "optimizer state of another shape": lambda ck: ck["optimizer"]["state"].update(
        {0: {**ck["optimizer"]["state"][0], "exp_avg": torch.zeros(1)}}
    ),
    "window_rng not a tensor": lambda ck: ck.update(window_rng="x"),
    "config with an unknown field": lambda ck: ck["config"].update(bogus=1),
    "perm of another length": lambda ck: ck.update(perm=torch.arange(3)),
    "NaN weights": lambda ck: ck["model"][_first(ck["model"])].fill_(float("nan")),
    # issue 23 item 15: counters and the schedule, checked on resume
    "scheduler last_epoch 10**9": lambda ck: ck["scheduler"].update(last_epoch=10**9),
    "scheduler base lr": lambda ck: ck["scheduler"].update(base_lrs=[5.0]),
    "history solver_samples -5": lambda ck: ck["history"].update(solver_samples=-5),
    "history wall_time inf": lambda ck: ck["history"].update(wall_time=float("inf")),
    # issue 23 item 10: a config of a huge network is checked before anything is built
    "config width 4096": lambda ck: ck["config"].update(width=4096),
    "config kernel 99": lambda ck: ck["config"].update(kernel=99),
}

#: what only matters for continuing a run (evaluate reads the weights alone)
RESUME_ONLY = {"perm of another length", "scheduler last_epoch 10**9"}


@pytest.mark.parametrize("change", list(TAMPER))
def test_tampered_checkpoints_are_one_line_errors(run_copy, tiny_h5, capsys, change):
    path = run_copy / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    TAMPER[change](ck)
    torch.save(ck, path)
    before = path.read_bytes()
    if change not in RESUME_ONLY:
        _failed(capsys, ["evaluate", str(run_copy)], 2, "checkpoint")
    _failed(capsys, _train(tiny_h5, run_copy, "--epochs", "2", "--resume"), 2, "checkpoint")
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------ 8: sizes
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--depth", str(10**6)], "depth"),
        (["--width", str(10**6)], "width"),
        (["--width", "4096", "--depth", "1000"], "GiB"),
        (["--train-set", f"grad_checks={10**9}"], "grad_checks"),
        (["--epochs", str(10**15)], "epochs"),
        (["--batch-size", str(10**12)], "batch_size"),
        (["--zo-chunk", str(10**12)], "zo_chunk"),
    ],
)
def test_training_sizes_are_bounded_up_front(tmp_path, tiny_h5, cli_user_error, extra, match):
    t0 = time.perf_counter()
    cli_user_error(_train(tiny_h5, tmp_path / "run", *extra, method="zo-sol"), match)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ 11: options
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--device", "bogus"], "bogus"),
        (["--train-set", "zo_reuse=no"], "zo_reuse"),
        (["--train-set", "zo_chunk=abc"], "zo_chunk"),
        (["--train-set", "epochs=2.5"], "epochs"),
        (["--train-set", "lr=NaN"], "lr"),
        (["--train-set", "zo_reuse=1"], "zo_reuse"),
    ],
)
def test_bad_training_option_values(tmp_path, tiny_h5, cli_user_error, extra, match):
    cli_user_error(_train(tiny_h5, tmp_path / "run", *extra, method="zo-sol"), match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, tiny_h5, cli_user_error):
    cli_user_error(_train(tiny_h5, tmp_path / "run", "--device", "cuda"), "CUDA is not available")
    cli_user_error(_compare(tiny_h5, tmp_path / "cmp", "--device", "cuda:1"), "CUDA is not available")


def test_zo_reuse_false_is_false(tmp_path, tiny_h5, capsys):
    assert (
        main(_train(tiny_h5, tmp_path / "run", "--train-set", "zo_reuse=false", "--epochs", "1", method="zo-sol")) == 0
    )
    assert json.loads((tmp_path / "run" / "config.json").read_text())["zo_reuse"] is False


def test_compare_refuses_an_empty_out_or_method_list(tmp_path, tiny_h5, cli_user_error, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_user_error(_compare(tiny_h5, ""), "--out")
    assert list(tmp_path.iterdir()) == []
    cli_user_error(_compare(tiny_h5, tmp_path / "c", methods=""), "--methods")
    cli_user_error(_compare(tiny_h5, tmp_path / "c", methods="non,,fo-sol"), "--methods")
    cli_user_error(_compare(tiny_h5, tmp_path / "c", methods="non,non"), "twice")
