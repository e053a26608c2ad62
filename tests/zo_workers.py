"""Worker functions that tests start in other processes (``spawn_local``); importable by module name
because pytest's ``pythonpath`` puts ``tests/`` on ``sys.path`` (spawned children inherit it)."""

from __future__ import annotations

import torch
from zo_nets import cnn1d_corrector

from zosol.zo import batched_loss_from_module, cge, cge_structured, rge


def dist_check_worker(rank: int, world_size: int, out_prefix: str | None) -> dict:
    """CGE (generic and structured) and RGE of a tiny model, sharded over the group if ``world_size > 1``.

    Returns the flat estimates; if ``out_prefix`` is given also saves them to ``{out_prefix}.{rank}.pt``.
    """
    model = cnn1d_corrector(hidden=(4, 4), kernel=3, seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, 8, generator=g), torch.randn(4, 1, 8, generator=g)
    params = dict(model.named_parameters())
    bl = batched_loss_from_module(model, lambda o: ((o - y) ** 2).mean(), x)

    def lof(forward, P):
        return ((forward(x).reshape(P, -1) - y.reshape(1, -1)) ** 2).mean(1)

    dd = world_size > 1
    res = {
        "cge_fwd": cge(bl, params, mu=1e-3, chunk_size=17, distributed=dd).flat(),
        "cge_central": cge(bl, params, mu=1e-3, scheme="central", chunk_size=17, distributed=dd).flat(),
        "structured": cge_structured(model, lof, mu=1e-3, chunk_size=17, distributed=dd).flat(),
        "rge": rge(bl, params, q=40, chunk_size=7, generator=torch.Generator().manual_seed(3), distributed=dd).flat(),
    }
    if out_prefix is not None:
        torch.save(res, f"{out_prefix}.{rank}.pt")
    return res
