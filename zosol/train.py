"""One training loop for every corrector method; the gradient source is what differs.

* ``non``     NON: m = 1 on pre-computed (coarse step of a reference frame, next reference frame)
              pairs; the corrector never sees its own corrections.
* ``nog-sol`` NOG-SOL: the unrolled m-step window with the gradient cut at every solver call
              (black-box solver, autograd through the network only; List et al. 2024).
* ``fo-sol``  FO-SOL: autograd through the differentiable coarse solver over the window.
* ``zo-sol``  ZO-SOL: the solver is only queried through its black-box view; the gradient is
              DeepZero's coordinate-wise estimate (``zosol.zo``), optionally sparse, evaluated
              for all perturbations as one folded batch.

Runs are reproducible from ``config.seed`` and resumable: the run directory holds
``checkpoint.pt`` (model, optimizer, scheduler, gradient masks, RNG state, epoch and position within
it),
written atomically every epoch and at most every ``checkpoint_seconds``.  A divergence guard
stops a run whose loss or parameters become non-finite, leaving the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .datasets.hdf5 import FidelityDataset
from .models import build_corrector, n_params
from .rollout import window_loss
from .solvers.base import BlackBox, Solver, SolverError
from . import zo

__all__ = ["TrainingError", "TrainingDiverged", "CheckpointError", "TrainResult", "SolverCounter", "train",
           "make_corrector", "load_run", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """Training stopped (solver failure, divergence); the last good checkpoint is intact."""


class TrainingDiverged(TrainingError):
    """The loss, the gradient or the parameters became non-finite."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another config or dataset."""


class SolverCounter:
    """Wraps a solver's ``step`` and counts calls and sample-steps (batch entries advanced)."""

    def __init__(self, step):
        self._step = step
        self.calls = 0
        self.samples = 0

    def __call__(self, state: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.samples += state.shape[0]
        return self._step(state, params)


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    history: dict[str, Any]
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_corrector(dataset: FidelityDataset, config: TrainConfig) -> torch.nn.Module:
    """The corrector network that ``config`` describes, sized for the dataset's scenario."""
    sc = dataset.scenario
    solver = sc.coarse_solver()
    sim = (dataset.train or dataset.test)[0]
    feats = sc.corrector_features(sim.params[None])
    in_ch = len(solver.channels) + (0 if feats is None else feats.shape[1])
    torch.manual_seed(config.seed)
    return build_corrector(config.model, len(solver.spatial_shape), in_ch, len(solver.channels),
                           width=config.width, depth=config.depth, kernel=config.kernel,
                           padding_mode=sc.padding_mode)


def _fingerprint(dataset: FidelityDataset) -> dict[str, Any]:
    return {**dataset.scenario.describe(), "train_seeds": [s.seed for s in dataset.train]}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_run(run_dir: str | os.PathLike, dataset: FidelityDataset) -> tuple[torch.nn.Module, dict]:
    """The trained corrector and the checkpoint dict of a run directory, validated against the
    dataset the run must have been trained on."""
    ckpt = _load_checkpoint(Path(run_dir) / "checkpoint.pt")
    if ckpt["dataset"] != _fingerprint(dataset):
        raise CheckpointError(f"{run_dir}: the run was trained on another dataset "
                              f"({ckpt['dataset'].get('scenario')}, {ckpt['dataset'].get('preset')})")
    model = make_corrector(dataset, TrainConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def _load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint (train first, or check the run directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"{path}: unreadable checkpoint (corrupt or truncated?): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "zosol-checkpoint":
        raise CheckpointError(f"{path}: not a zosol checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this zosol reads "
                              f"{CHECKPOINT_VERSION}; retrain")
    return ckpt


class _Windows:
    """Training windows of length m: starts (sim i, frame t), t = 0..T-m, in a seeded order."""

    def __init__(self, dataset: FidelityDataset, m: int, device: torch.device):
        traj, params = dataset.stacked("train")
        self.traj = traj.to(device)
        self.params = params.to(device)
        self.num_params = dataset.scenario.coarse_solver().num_params
        feats = dataset.scenario.corrector_features(params)
        self.features = None if feats is None else feats.to(device)
        n, t1 = traj.shape[:2]
        if t1 - 1 < m:
            raise ValueError(f"window {m} is longer than the {t1 - 1} frames of the dataset; lower --window")
        self.starts = torch.tensor([(i, t) for i in range(n) for t in range(t1 - m)], dtype=torch.long)
        self.m = m

    def batch(self, idx: torch.Tensor):
        i, t = self.starts[idx, 0], self.starts[idx, 1]
        steps = t[:, None] + torch.arange(1, self.m + 1)
        start = self.traj[i, t]
        targets = self.traj[i[:, None], steps]
        params = self.params[i] if self.num_params else None
        feats = None if self.features is None else self.features[i]
        return i, t, start, targets, params, feats


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def train(dataset: FidelityDataset, config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
          resume: bool = False, progress: bool = True, solver: Solver | BlackBox | None = None,
          checkpoint_seconds: float = 60.0, stop_after_steps: int | None = None, workers: int = 1) -> TrainResult:
    """Train a corrector on ``dataset`` as ``config`` says; returns the model and its history.

    ``solver``: the coarse solver to train with (default: the scenario's own; e.g. an external
    process).  ZO-SOL and NOG-SOL only ever call its black-box view.  ``run_dir``: where the
    checkpoint goes (None: no checkpoints).  ``resume``: continue from ``run_dir``'s checkpoint.
    ``stop_after_steps``: stop (with a checkpoint) after this many optimizer steps in this call,
    for tests of resumption.  ``workers``: ZO-SOL evaluates its perturbation chunks in this many
    local processes (torch.distributed, gloo on CPU / NCCL on GPU; one thread each); the result is
    identical to one process.
    """
    config.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and config.method == "zo-sol":
        if solver is not None:
            raise ValueError("workers > 1 runs the scenario's own solver in every process; "
                             "pass solver=None or workers=1")
        return _train_in_processes(dataset, config, run_dir, workers, resume=resume, progress=progress,
                                   checkpoint_seconds=checkpoint_seconds, stop_after_steps=stop_after_steps)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    lead = not distributed or torch.distributed.get_rank() == 0  # the process that writes and reports
    device = torch.device(config.device)
    scenario = dataset.scenario
    if not dataset.train:
        raise ValueError(f"{dataset.path}: no training simulations")
    base_solver = solver if solver is not None else scenario.coarse_solver()
    if config.method == "fo-sol" and not getattr(base_solver, "differentiable", False):
        raise ValueError(f"fo-sol needs a differentiable solver; {type(base_solver).__name__} is a black box "
                         f"(use zo-sol or nog-sol)")
    blackbox = SolverCounter(base_solver.blackbox().step)
    # differentiable solver for FO-SOL and for ZO-SOL's gradient checks: the given solver if it is
    # differentiable, else the scenario's in-process coarse solver (its twin)
    diff_solver = base_solver if getattr(base_solver, "differentiable", False) else scenario.coarse_solver()
    fo_step = SolverCounter(diff_solver.step)
    m = config.effective_window
    windows = _Windows(dataset, m, device)

    model = make_corrector(dataset, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(windows.starts) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = lambda k: config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * k / total_steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    window_rng = torch.Generator().manual_seed(config.seed)

    if config.method == "non":  # coarse step of every reference frame, computed once
        with torch.no_grad():
            traj = windows.traj
            flat = traj[:, :-1].reshape(-1, *traj.shape[2:])
            p = windows.params.repeat_interleave(traj.shape[1] - 1, 0) if windows.num_params else None
            coarse_next = blackbox(flat, p).view(traj.shape[0], traj.shape[1] - 1, *traj.shape[2:])

    history: dict[str, Any] = {"loss": [], "epoch_loss": [], "grad_cosine_vs_fo": [], "wall_time": 0.0,
                               "solver_calls": 0, "solver_samples": 0, "zo_queries": 0, "lprs": None}
    epoch, position, perm = 0, 0, None
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / "checkpoint.pt" if run_dir is not None else None

    if resume:
        if ckpt_path is None:
            raise ValueError("resume needs a run directory")
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt["config"] != config.to_dict():
            diff = {k: (ckpt["config"].get(k), v) for k, v in config.to_dict().items() if ckpt["config"].get(k) != v}
            raise CheckpointError(f"{ckpt_path}: checkpoint from another config (checkpoint vs now: {diff}); "
                                  f"use the same options or a new run directory")
        if ckpt["dataset"] != _fingerprint(dataset):
            raise CheckpointError(f"{ckpt_path}: checkpoint from another dataset; use the dataset it was trained on")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        window_rng.set_state(ckpt["window_rng"])
        history = ckpt["history"]
        epoch, position, perm = ckpt["epoch"], ckpt["position"], ckpt["perm"]
        blackbox.calls, blackbox.samples = history["solver_calls"], history["solver_samples"]
    elif run_dir is not None and lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def save() -> None:
        """Bring the history's time and solver counters up to date; write the checkpoint."""
        history["wall_time"] = wall_before + time.perf_counter() - started
        history["solver_calls"] = blackbox.calls + fo_step.calls
        history["solver_samples"] = blackbox.samples + fo_step.samples
        if ckpt_path is None or not lead:
            return
        _atomic_save({"format": "zosol-checkpoint", "version": CHECKPOINT_VERSION, "config": config.to_dict(),
                      "dataset": _fingerprint(dataset), "epoch": epoch, "position": position, "perm": perm,
                      "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "window_rng": window_rng.get_state(),
                      "masks": None if mask_schedule is None else mask_schedule.masks(min(epoch, config.epochs - 1)),
                      "history": history}, ckpt_path)

    params_dict = lambda: dict(model.named_parameters())  # noqa: E731
    zo_sparse = config.method == "zo-sol" and config.zo_sparsity > 0
    if zo_sparse and history["lprs"] is None:
        history["lprs"] = _layer_ratios(model, windows, blackbox, fo_step, config)
    mask_schedule = zo.MaskScheduler(params_dict(), history["lprs"], config.zo_mask_every, config.seed) \
        if zo_sparse else None
    check_steps = set()
    if config.method == "zo-sol" and config.grad_checks and getattr(diff_solver, "differentiable", False):
        check_steps = {round(k * (total_steps - 1) / max(config.grad_checks - 1, 1)) for k in range(config.grad_checks)}

    def fo_grads(batch) -> dict[str, torch.Tensor]:
        _, _, start, targets, params, feats = batch
        model.zero_grad(set_to_none=True)
        window_loss(fo_step, model, start, targets, params, feats, 1, config.loss).sum().backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters()}

    bar = tqdm(total=total_steps, initial=epoch * steps_per_epoch + position, desc=f"train {config.method}",
               unit="step", disable=not (progress and lead))
    started, last_save, done_here = time.perf_counter(), time.perf_counter(), 0
    wall_before = history["wall_time"]
    try:
        while epoch < config.epochs:
            if perm is None:
                perm = torch.randperm(len(windows.starts), generator=window_rng)
                position = 0
            masks = mask_schedule.masks(epoch) if mask_schedule is not None else None
            while position < steps_per_epoch:
                step_index = epoch * steps_per_epoch + position
                batch = windows.batch(perm[position * config.batch_size:(position + 1) * config.batch_size])
                _, _, start, targets, params, feats = batch
                optimizer.zero_grad(set_to_none=True)
                try:
                    if config.method == "zo-sol":
                        est = zo.cge_structured(
                            model, lambda forward, p: window_loss(blackbox, forward, start, targets, params, feats,
                                                                  p, config.loss),
                            mu=config.zo_mu, scheme=config.zo_scheme, masks=masks, chunk_size=config.zo_chunk,
                            reuse=config.zo_reuse, batch_size=start.shape[0], distributed=distributed)
                        history["zo_queries"] += est.queries
                        with torch.no_grad():
                            loss = window_loss(blackbox, model, start, targets, params, feats, 1, config.loss)[0]
                        if step_index in check_steps:
                            fo = fo_grads(batch)
                            sel = _flat(masks).bool().to(device) if masks is not None else None
                            g_fo, g_zo = _flat(fo), est.flat()
                            if sel is not None:
                                g_fo, g_zo = g_fo[sel], g_zo[sel]
                            cos = float(torch.nn.functional.cosine_similarity(g_fo, g_zo, dim=0))
                            history["grad_cosine_vs_fo"].append({"step": step_index, "epoch": epoch, "cosine": cos})
                            optimizer.zero_grad(set_to_none=True)
                        zo.write_grads(model, est.grads)
                    else:
                        if config.method == "non":
                            i, t = batch[0], batch[1]
                            cached = coarse_next[i, t]
                            step_fn = lambda s, p: cached  # noqa: E731
                        else:
                            step_fn = fo_step if config.method == "fo-sol" else blackbox
                        loss = window_loss(step_fn, model, start, targets, params, feats, 1, config.loss)[0]
                        if torch.isfinite(loss):
                            loss.backward()
                except SolverError as e:
                    raise TrainingError(f"coarse solver failed at epoch {epoch}, step {position}: {e}") from e
                except zo.NonFiniteLossError as e:
                    raise TrainingDiverged(f"training diverged at epoch {epoch}, step {position}: a perturbed "
                                           f"rollout's loss is not finite ({e}); try a lower --lr or --zo-mu") from e
                loss_value = float(loss.detach())
                grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
                if not math.isfinite(loss_value) or not grads_ok:
                    raise TrainingDiverged(
                        f"training diverged at epoch {epoch}, step {position}: loss {loss_value}"
                        f"{'' if grads_ok else ', non-finite gradient'}; try a lower --lr or a smaller --window")
                optimizer.step()
                scheduler.step()
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise TrainingDiverged(f"training diverged at epoch {epoch}, step {position}: "
                                           f"non-finite parameters; try a lower --lr")
                history["loss"].append(loss_value)
                position += 1
                done_here += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3g}", epoch=epoch)
                if stop_after_steps is not None and done_here >= stop_after_steps:
                    save()
                    return TrainResult(model, config, history, run_dir, {"stopped_early": True})
                if ckpt_path is not None and time.perf_counter() - last_save > checkpoint_seconds:
                    save()
                    last_save = time.perf_counter()
            recent = history["loss"][-steps_per_epoch:]
            history["epoch_loss"].append(sum(recent) / len(recent))
            epoch, position, perm = epoch + 1, 0, None
            save()
            last_save = time.perf_counter()
    finally:
        bar.close()
    history["parameters"] = n_params(model)
    save()
    if ckpt_path is not None and lead:
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    return TrainResult(model, config, history, run_dir)


def _train_worker(rank: int, world_size: int, dataset: FidelityDataset, config: TrainConfig, run_dir: Path,
                  kwargs: dict) -> None:
    """One process of a multi-process ZO-SOL run; failures are written to ``run_dir/failure.json``."""
    try:
        train(dataset, config, run_dir, **kwargs)
    except (TrainingError, SolverError, CheckpointError, ValueError) as e:
        if rank == 0:
            (run_dir / "failure.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise


def _train_in_processes(dataset: FidelityDataset, config: TrainConfig, run_dir: str | os.PathLike | None,
                        workers: int, **kwargs) -> TrainResult:
    """Run :func:`train` in ``workers`` processes (see ``workers``) and load rank 0's result."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zosol-run-") as scratch:
        run = Path(run_dir) if run_dir is not None else Path(scratch)
        run.mkdir(parents=True, exist_ok=True)
        failure = run / "failure.json"
        failure.unlink(missing_ok=True)
        try:
            zo.spawn_local(_train_worker, workers, args=(dataset, config, run, kwargs))
        except Exception as e:  # a worker failed: re-raise what it reported, with its own type
            if failure.exists():
                info = json.loads(failure.read_text())
                failure.unlink()
                kind = {"TrainingError": TrainingError, "TrainingDiverged": TrainingDiverged,
                        "SolverError": SolverError, "CheckpointError": CheckpointError}.get(info["type"], ValueError)
                raise kind(info["message"]) from None
            raise TrainingError(f"a training worker process failed: {e}") from e
        model, ckpt = load_run(run, dataset)
        stopped = kwargs.get("stop_after_steps") is not None and ckpt["epoch"] < config.epochs
        return TrainResult(model, config, ckpt["history"], Path(run_dir) if run_dir is not None else None,
                           {"stopped_early": True} if stopped else {})


def _stacked_params_loss(model: torch.nn.Module, loss_of_forward, batch_size: int):
    """``loss_of_forward(forward, P)`` as a loss of stacked parameter sets ``{name: (P, *shape)}``
    (torch.func.functional_call + vmap), the form ``zosol.zo``'s sparsity scores take."""
    def batched(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        p = next(iter(stacked.values())).shape[0]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == batch_size:  # shared input
                y = torch.func.vmap(lambda w: torch.func.functional_call(model, w, (x,)))(stacked)
            else:
                xs = x.reshape(p, batch_size, *x.shape[1:])
                y = torch.func.vmap(lambda w, xi: torch.func.functional_call(model, w, (xi,)))(stacked, xs)
            return y.reshape(p * batch_size, *y.shape[2:])
        return loss_of_forward(forward, p)
    return batched


def _layer_ratios(model: torch.nn.Module, windows: _Windows, blackbox, fo_step, config: TrainConfig) -> dict[str, float]:
    """Layer-wise pruning ratios (LPRs) for sparse ZO-SOL, scored on one batch of m = 1 windows."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    # The output layer starts at zero ("no correction"), so its GraSP scores are all zero and a
    # global threshold would prune it entirely, freezing the corrector at zero: keep it dense.
    output_layer = next(reversed(list(params))).rsplit(".", 1)[0] + "."
    prunable = lambda name, p: p.dim() > 1 and not name.startswith(output_layer)  # noqa: E731
    if config.zo_lpr == "uniform":
        return zo.uniform_lprs(params, config.zo_sparsity, prunable)
    g = torch.Generator().manual_seed(config.seed + 2)
    idx = torch.randperm(len(windows.starts), generator=g)[:config.batch_size]
    _, _, start, targets, p_sim, feats = windows.batch(idx)
    step = fo_step if config.zo_lpr == "fo-grasp" else blackbox
    loss = _stacked_params_loss(
        model, lambda f, p: window_loss(step, f, start, targets[:, :1], p_sim, feats, p, config.loss), start.shape[0])
    if config.zo_lpr == "fo-grasp":
        return zo.fo_grasp_lprs(loss, params, config.zo_sparsity, prunable)
    return zo.zo_grasp_lprs(loss, params, config.zo_sparsity, prunable, generator=g)
