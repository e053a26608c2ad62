"""Chunking helpers and 2-process torch.distributed sharding == 1 process."""

import pytest
import torch
from zo_workers import dist_check_worker

from zosol.zo.parallel import (
    chunk_size_from_budget,
    estimate_bytes_per_perturbation,
    iter_chunks,
    shard_chunks,
    spawn_local,
)


def test_iter_and_shard_chunks():
    assert iter_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert iter_chunks(10, None) == [(0, 10)]
    ch = iter_chunks(10, 3)
    parts = shard_chunks(ch, 0, 2) + shard_chunks(ch, 1, 2)
    assert sorted(parts) == ch
    with pytest.raises(ValueError, match="chunk_size"):
        iter_chunks(5, 0)


def test_chunk_size_from_budget():
    from zo_nets import cnn1d_corrector

    m = cnn1d_corrector(hidden=(8, 8))
    bpp = estimate_bytes_per_perturbation(m, torch.randn(8, 2, 32))
    assert bpp > 8 * 32 * 8 * 4
    c = chunk_size_from_budget(bpp, 64 * 2**20)
    assert c >= 1 and c * bpp <= 64 * 2**20
    assert chunk_size_from_budget(bpp, 1) == 1
    with pytest.raises(ValueError):
        chunk_size_from_budget(0, 10)


def test_distributed_requires_process_group():
    from zosol.zo import cge

    with pytest.raises(ValueError, match="not initialised"):
        cge(lambda pd: torch.zeros(next(iter(pd.values())).shape[0]), {"w": torch.zeros(3)}, distributed=True)


def test_two_process_sharding_equals_single_process(tmp_path):
    out = str(tmp_path / "res")
    spawn_local(dist_check_worker, 2, args=(out,), backend="gloo")
    r0 = torch.load(out + ".0.pt")
    r1 = torch.load(out + ".1.pt")
    ref = dist_check_worker(0, 1, None)  # same computation in this single process
    for name in ref:
        assert torch.equal(r0[name], ref[name]), name
        assert torch.equal(r1[name], ref[name]), name


# Chunk after chunk, a few MB-sized tensors are allocated, filled and freed together (as a ZO
# estimate's chunks do): minor page faults of the last 20 rounds, with and without keep_freed_memory.
CHURN = """
import resource, sys, torch
from zosol.zo.parallel import evaluate_chunked, keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def chunk(s, e):
    xs = [torch.empty(2**19).fill_(float(i)) for i in range(8)]  # 8 x 2 MB
    return torch.stack([x.sum() for x in xs])[: e - s]

if sys.argv[1] == "chunked":  # the ZO engine's chunk runner applies it itself
    run = lambda: evaluate_chunked(chunk, 8, 8)
else:
    run = lambda: chunk(0, 8)
for _ in range(5):
    run()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    run()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def test_keep_freed_memory_stops_page_fault_churn():
    """Freed chunk tensors stay in the process (glibc): 20 rounds of 8 x 2 MB touch fresh pages without
    it (thousands of minor faults per round) and almost none with it (ZO-SOL's kernel time, issue 22)."""
    import os
    import subprocess
    import sys

    from zosol.zo.parallel import _glibc_mallopt

    if _glibc_mallopt() is None:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    faults = {}
    for mode in ("plain", "keep", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        applied, n = out.stdout.split()
        faults[mode] = int(n)
        assert applied == {"plain": "None", "keep": "True", "chunked": "None"}[mode]
    assert faults["plain"] > 20 * 512  # at least a quarter of the 20 x 16 MB touched anew
    assert faults["keep"] < faults["plain"] / 10 and faults["chunked"] < faults["plain"] / 10, faults
    # the user's own malloc settings win
    out = subprocess.run(
        [sys.executable, "-c", CHURN, "keep"],
        env={**env, "MALLOC_TRIM_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.split()[0] == "False", out.stderr[-2000:]
