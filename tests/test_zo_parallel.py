"""Chunking helpers and 2-process torch.distributed sharding == 1 process."""

import pytest
import torch
from zo_workers import dist_check_worker

from zosol.zo import chunk_size_from_budget, estimate_bytes_per_perturbation, iter_chunks
from zosol.zo.parallel import shard_chunks, spawn_local


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
