"""Benchmarks (``zosol bench engine|solvers|sol``), all timed with :mod:`zosol.bench.timing`.

* :mod:`~zosol.bench.engine`   the ZO engine alone: naive vs batched (vmap) vs structured CGE;
  imports nothing of zosol but :mod:`zosol.zo` and the timing helper (``python -m zosol.bench.engine``).
* :mod:`~zosol.bench.solvers`  coarse-step throughput of every scenario against batch size.
* :mod:`~zosol.bench.sol`      time per training step of FO-SOL, ZO-JAC-SOL and ZO-SOL side by side.
"""
