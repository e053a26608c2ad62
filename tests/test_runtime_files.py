"""Atomic writes and advisory locks (zosol/runtime/files.py): planted symlinks are never followed,
temporary names are unique, failures leave the target as it was, a second lock holder is refused
in one line naming the holder."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zosol.runtime.files import (
    FileLock,
    LockedError,
    atomic_save,
    atomic_save_path,
    atomic_write_bytes,
    atomic_write_text,
    os_error_message,
)
from zosol.runtime.memory import format_bytes


def test_atomic_write_replaces_a_planted_symlink_not_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # symlinks at the target and at every old fixed temporary name
    for name in ("results.json", "results.json.tmp", "checkpoint.pt.tmp", "x.h5.tmp"):
        (out / name).symlink_to(victim)
    atomic_write_text(out / "results.json", "{}")
    assert victim.read_text() == "precious"
    assert not (out / "results.json").is_symlink() and (out / "results.json").read_text() == "{}"
    # no temporary file left behind
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt.tmp",
        "results.json",
        "results.json.tmp",
        "x.h5.tmp",
    ]


def test_atomic_save_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_save(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]

    def boom_path(tmp: Path):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save_path(target, boom_path)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_refuses_to_replace_a_directory(tmp_path):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_bytes(tmp_path / "results.json", b"{}")
    assert os_error_message(info.value).endswith("results.json: is a directory, cannot replace it by a file")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_temporary_names_are_unique_and_private(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, oct(os.stat(src).st_mode & 0o777)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    for _ in range(3):
        atomic_save_path(tmp_path / "d.h5", lambda p: p.write_bytes(b"x"))
    assert len({name for name, _ in seen}) == 3
    assert all(name.startswith(".d.h5.") and name.endswith(".tmp") for name, _ in seen)


def test_lock_refuses_a_second_holder_naming_it(tmp_path):
    target = tmp_path / "x.h5"
    with FileLock(target, "dataset x.h5"):
        with pytest.raises(LockedError, match=rf"dataset x.h5 is in use by pid {os.getpid()} on host "):
            FileLock(target, "dataset x.h5").acquire()
    assert not Path(str(target) + ".lock").exists()  # removed on release
    with FileLock(target):  # free again
        pass


def test_lock_of_a_process_killed_with_sigkill_is_free(tmp_path):
    target = tmp_path / "x.h5"
    code = (
        "import sys, time; from zosol.runtime.files import FileLock; l = FileLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout.readline().strip() == b"locked"
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=f"pid {p.pid} on host"):
            FileLock(target).acquire()
        assert time.monotonic() - t0 < 1.0
    finally:
        p.kill()
        p.wait()
    with FileLock(target):  # the kernel released the dead holder's lock
        pass


def test_lock_file_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "x.h5.lock").symlink_to(victim)
    with pytest.raises(LockedError, match="symlink"):
        FileLock(tmp_path / "x.h5").acquire()
    assert victim.read_text() == "precious"


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**30) == "3 GiB"
