"""Runs launched as several processes: ``torchrun`` (one machine or many, Slurm calling it) or
``--workers N`` (local processes, :func:`zosol.zo.parallel.spawn_local`); both join a process group from
the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) through :func:`zosol.zo.parallel.init_from_env`.

What is shared and what is not: every rank reads the same dataset (rank 0 generates it first, the
others wait), runs the same training loop on it, and a shardable gradient source (ZO-SOL,
ZO-JAC-SOL) splits its perturbation / probe chunks over all ranks; only rank 0 writes
checkpoints, results and plots, and a resumed run starts every rank from rank 0's checkpoint.

When a rank dies, the others fail in their next collective (or are stopped by torchrun);
:func:`lost_ranks_message` turns that into one line naming the ranks that are gone.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..zo.parallel import init_from_env, launched_with_env

__all__ = [
    "join_launcher_group",
    "world",
    "is_lead",
    "rank_label",
    "lead_first",
    "broadcast_from_lead",
    "lost_local_ranks",
    "lost_ranks_message",
]

T = TypeVar("T")

#: (host, pid) of every rank, filled by :func:`join_launcher_group`
_PEERS: list[tuple[str, int]] = []
#: bytes of a host name exchanged between ranks
_HOST_BYTES = 255


def join_launcher_group(device: str | None = None) -> tuple[int, int, str] | None:
    """Join the process group of a ``torchrun`` launch (None when this process was not started by
    one).  NCCL when ``device`` is CUDA and CUDA is available (GPU ``LOCAL_RANK`` per local rank),
    gloo otherwise.  Records every rank's host and pid.  Returns ``(rank, world_size, backend)``.
    (The launcher's SIGTERM, sent when another rank failed, stops the loop as any SIGTERM does:
    :mod:`zosol.runtime.stop`.)"""
    if not launched_with_env():
        return None
    from .stop import die_with_parent

    die_with_parent(os.getppid())  # kill -9 of torchrun leaves no rank training on
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    info = init_from_env("nccl" if cuda else "gloo")
    register_peers()
    return info


def _group_device() -> torch.device:
    """Where this group's collectives take their tensors (NCCL: this rank's GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def register_peers() -> None:
    """Exchange (host, pid) of every rank of the current group (for :func:`lost_ranks_message`),
    as tensors (nothing is unpickled from another rank)."""
    host = socket.gethostname().encode("utf-8")[:_HOST_BYTES]
    mine = torch.zeros(_HOST_BYTES + 2, dtype=torch.long)
    mine[0], mine[1] = os.getpid(), len(host)
    mine[2 : 2 + len(host)] = torch.tensor(list(host), dtype=torch.long)
    mine = mine.to(_group_device())
    peers = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, mine)
    rows = [p.cpu().tolist() for p in peers]
    _PEERS[:] = [(bytes(r[2 : 2 + r[1]]).decode("utf-8", "replace"), int(r[0])) for r in rows]


def world() -> tuple[int, int, str | None]:
    """``(rank, world_size, backend)`` of this process (``(0, 1, None)`` outside a group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    return 0, 1, None


def is_lead() -> bool:
    """True in the process that writes and reports (rank 0, or a single process)."""
    return world()[0] == 0


def rank_label() -> str:
    """``"rank 0 of 2"`` in a process group, ``""`` otherwise."""
    rank, size, _ = world()
    return f"rank {rank} of {size}" if size > 1 else ""


def lead_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then (after a barrier) on the other ranks: e.g. rank 0 generates a
    dataset, the others then find it complete and only read it.  A failure on rank 0 is raised
    there and stops the job (the others are stopped by the launcher)."""
    rank, size, _ = world()
    if size == 1:
        return fn()
    if rank == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def broadcast_from_lead(make: Callable[[], T]) -> T:
    """``make()`` evaluated on rank 0 and sent to every rank (e.g. a checkpoint read from rank 0's
    disk, which other machines do not see)."""
    rank, size, _ = world()
    if size == 1:
        return make()
    device = _group_device()
    if rank == 0:
        value = make()
        buffer = io.BytesIO()
        torch.save(value, buffer)  # plain data only: the other ranks read it with weights_only=True
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
        length = torch.tensor([data.numel()], dtype=torch.long, device=device)
    else:
        length = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(length, src=0)
    if rank != 0:
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    if rank == 0:
        return value
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


def _gone(pid: int) -> bool:
    """True if ``pid`` (on this host) has exited (or is a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def lost_local_ranks(wait: float = 3.0) -> list[int]:
    """Other ranks on this host whose process has exited; waits up to ``wait`` s, since a peer's
    socket closes (and this rank's collective fails) while the peer is still being torn down.
    From here on the launcher's SIGTERM is ignored: this rank is on its way out."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = world()[0]
    host, deadline = socket.gethostname(), time.monotonic() + wait
    while True:
        dead = [r for r, (h, pid) in enumerate(_PEERS) if h == host and r != rank and _gone(pid)]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def lost_ranks_message(error: BaseException, dead: list[int]) -> str:
    """One line for a rank that lost its peers: which ranks are gone (``dead``, from
    :func:`lost_local_ranks`), else the collective's error, and how to continue."""
    rank, size, _ = world()
    if dead:
        cause = ", ".join(f"rank {r} (pid {_PEERS[r][1]})" for r in dead) + " stopped"
    else:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        cause = f"lost contact with another of the {size} ranks (on another host, or it failed): {first}"
    return (
        f"rank {rank} of {size}: {cause}; the job stops here, the last checkpoint is kept "
        f"(rerun the same command with --resume)"
    )
