"""Command line: a thin layer over the Python API.

    zosol generate --scenario S --preset P --out DIR      fidelity dataset (HDF5), resumable
    zosol info FILE [--plot PNG]                           what a dataset holds + coarse error (+ figure)
    zosol train --scenario S --method M [--resume]         train one corrector
    zosol evaluate RUN [--animate GIF]                     MAE of a trained run on the test sims
    zosol compare --scenario S --preset P --out DIR        SRC / NON / NOG-SOL / FO-SOL / ZO-SOL / ZO-JAC-SOL
    zosol bench engine|solvers|sol                         speed benchmarks

Training options are derived from ``TrainConfig``'s field declarations (``zosol.options``): every
field is an ``--option`` of ``train`` and ``compare`` (``zo_reuse`` -> ``--zo-reuse true|false``),
parsed and checked as declared.

User errors (bad options, missing or corrupt files, a checkpoint of another config, a job too
large for this machine, a file in use by another zosol process, a file-system error such as a
read-only directory or a full disk) end with a one-line message and exit code 2; a failed run
(solver failure, divergence) with exit code 1; Ctrl-C with 130; SIGTERM (a scheduler's stop)
with 143, after checkpointing.  Checkpoints and finished data are never lost: rerun the command
(with ``--resume`` for train).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import UsageError

__all__ = ["main"]


def _parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``["frames=16", "nu=0.05"]`` -> {"frames": 16, "nu": 0.05} (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for key, value in _split_sets(items, "--set").items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_methods(text: str | None) -> list[str] | None:
    """``--methods non,zo-sol`` -> ["non", "zo-sol"]; None when not given; no empty or repeated names."""
    if text is None:
        return None
    names = [m.strip() for m in text.split(",")]
    if not all(names):
        from .methods import names

        raise UsageError(
            f"--methods '{text}' has an empty name; give a comma-separated subset of "
            f"{','.join(names())} (or leave --methods out for all)"
        )
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise UsageError(f"--methods names {', '.join(twice)} twice")
    return names


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (``--lr 0.01``, ``--train-set lr=0.01``),
    parsed as their ``TrainConfig`` declarations say (booleans only as true or false)."""
    from .config import TrainConfig
    from .options import parse_text, specs

    declared = specs(TrainConfig)
    out = {
        n: parse_text(s, getattr(args, n))
        for n, s in declared.items()
        if n != "method" and getattr(args, n, None) is not None
    }
    for key, text in _split_sets(getattr(args, "train_set", None)).items():
        out[key] = parse_text(declared[key], text) if key in declared else text
    return out


def _split_sets(items: Sequence[str] | None, flag: str = "--train-set") -> dict[str, str]:
    """``["lr=0.01"]`` -> {"lr": "0.01"} (the values of ``flag KEY=VALUE`` options)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"{flag} expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _metavar(spec: Any) -> str:
    if spec.kind == "choice":
        return "{" + ",".join(map(str, spec.choices)) + "}"
    return {bool: "{true,false}", int: "N", float: "X"}.get(spec.kind, "TEXT")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One ``--option`` per ``TrainConfig`` field (except ``method``), with the declared help."""
    from .config import TrainConfig
    from .options import describe, specs

    g = p.add_argument_group("training options (default: the preset's)")
    for name, spec in specs(TrainConfig).items():
        if name != "method":  # train: --method, compare: --methods
            g.add_argument(_option_flag(name), dest=name, metavar=_metavar(spec), help=describe(spec))
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing ZO-SOL's perturbation chunks (identical result; default 1; at most "
        "the CPU cores; they die with this process, SIGTERM checkpoints all of them)",
    )
    g.add_argument(
        "--train-set",
        dest="train_set",
        action="append",
        metavar="KEY=VALUE",
        help="a TrainConfig field by name (the same as its --option)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from .datasets import generate

    path = generate(
        args.scenario,
        args.preset,
        args.out,
        batch=args.batch,
        overwrite=args.overwrite,
        overrides=_parse_sets(args.set),
        progress=not args.quiet,
    )
    print(path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .evaluation import evaluate

    if args.plot:
        from .figures import image_format, missing_matplotlib

        if not missing_matplotlib():
            image_format(args.plot)  # refuse an unknown suffix before any work
    ds = load_dataset(args.file)
    summary = ds.summary()
    twins = ds.duplicated_test_sims()
    if twins:
        shown = ", ".join(f"{seed} ({why})" for seed, why in list(twins.items())[:5])
        print(
            f"zosol: warning: {len(twins)} of {len(ds.test)} test simulations duplicate training ones: {shown}"
            f"{' ...' if len(twins) > 5 else ''}; errors on them are measured on training data",
            file=sys.stderr,
        )
        summary["test_duplicates_train"] = {str(k): v for k, v in twins.items()}
    src = evaluate(ds)
    summary["coarse_error_vs_reference"] = {"mae_mean": src["mae_mean"], "mae_std": src["mae_std"]}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for k, v in summary.items():
            print(f"{k:>26}: {v}")
    if args.plot:
        _plot_dataset(ds, args.plot)
    return 0


def _plot_dataset(ds, path: str, count: int = 4) -> None:
    """The reference trajectories of the first ``count`` simulations (test first), drawn as
    ``compare`` draws a test simulation (zosol.figures), into ``path``."""
    from .figures import FieldMeta, missing_matplotlib, save_figure, trajectory_figure

    if missing_matplotlib():
        print(f"zosol: note: {missing_matplotlib()}", file=sys.stderr)
        return
    sims = [(f"test {i}", s) for i, s in enumerate(ds.test)] + [(f"train {i}", s) for i, s in enumerate(ds.train)]
    shown = {f"{name} (seed {s.seed})": s.trajectory.numpy() for name, s in sims[:count]}
    meta = FieldMeta.of(ds.scenario.coarse_solver(), ds.scenario.name)
    save_figure(trajectory_figure(shown, meta, title=f"{ds.scenario.name}: reference", error=False), path)
    print(f"wrote {path}")


def _dataset_for(args: argparse.Namespace):
    from .datasets import generate, load_dataset
    from .datasets.hdf5 import data_option

    data = data_option(args.data, "datasets")
    if data is not None and data.is_file():
        return load_dataset(data, args.scenario)
    path = generate(args.scenario, args.preset, data or "datasets", overrides=_parse_sets(args.set))
    return load_dataset(path, args.scenario)


def _twin(args: argparse.Namespace):
    """The solver ``--twin MODULE:OBJECT`` names, or None."""
    from .solvers import load_twin

    return load_twin(args.twin) if getattr(args, "twin", None) else None


def _twin_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--twin",
        metavar="MODULE:OBJECT",
        help="a differentiable twin of the coarse solver, for FO-SOL and the gradient checks: a zosol Solver "
        "(e.g. TorchSolver(...)) or a function returning one, in MODULE (imported like --plugin)",
    )


def _run_options(args: argparse.Namespace, **controls: Any):
    """The command's run controls, checked once (``--workers`` at most the CPU cores)."""
    from .runtime.options import RunOptions

    return RunOptions(workers=args.workers, bound_by_cores=True, **controls)


def _resume(run_dir, resume: bool) -> bool | str:
    """``zosol train``'s resumption in its (open) run directory: a run there needs ``--resume``;
    ``--resume`` with no checkpoint yet starts from scratch, with a note."""
    if run_dir.has_checkpoint():
        if not resume:
            raise UsageError(
                f"{run_dir.path} already holds a run; pass --resume to continue it or choose another --out"
            )
    elif resume:
        print(f"zosol: note: no checkpoint in {run_dir.path} yet: starting from scratch", file=sys.stderr)
    return "auto" if resume else False


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import train_config
    from .runtime.launch import is_lead, lead_first
    from .runtime.rundir import RunDirectory

    options = _run_options(args)
    config = train_config(args.train_preset or args.preset, args.scenario, method=args.method, **_train_overrides(args))
    out = f"runs/{args.scenario}_{args.preset}_{args.method}" if args.out is None else args.out
    # in a torchrun launch rank 0 checks, locks and writes the run directory; the others only name it
    with RunDirectory(out, writer=is_lead(), what="--out") as run_dir:
        resume = _resume(run_dir, args.resume) if run_dir.writer else ("auto" if args.resume else False)
        dataset = lead_first(lambda: _dataset_for(args))
        return _train_and_report(args, dataset, config, run_dir, options.but(resume=resume))


def _train_and_report(args: argparse.Namespace, dataset, config, run_dir, options) -> int:
    from .evaluation import evaluate
    from .runtime.launch import is_lead
    from .training import train

    result = train(dataset, config, run_dir, options=options, twin=_twin(args))
    ev = evaluate(dataset, result.model, device=config.device)
    if is_lead():
        print(
            f"{args.method}: test MAE {ev['mae_mean']:.5f} +- {ev['mae_std']:.5f} "
            f"(train {result.history['wall_time']:.1f} s) -> {run_dir.path}"
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .evaluation import evaluate
    from .runtime.rundir import RunDirectory
    from .training import load_run

    if args.animate:
        from .figures import animation_format

        animation_format(args.animate)  # refuse an unknown suffix (or .mp4 without ffmpeg) before any work
    run = RunDirectory.existing(args.run)
    dataset = load_dataset(args.data or run.dataset())
    model, ckpt = load_run(run, dataset, other_data=bool(args.data))
    if ckpt["dataset_differences"]:
        print(
            f"note: {run.path} was trained on another {dataset.scenario.name} dataset (differs in "
            f"{'; '.join(ckpt['dataset_differences'])}); evaluating on {dataset.path}",
            file=sys.stderr,
        )
    ev = evaluate(dataset, model)
    src = evaluate(dataset)
    out = {
        "run": str(run.path),
        "dataset": str(dataset.path),
        "dataset_differences": ckpt["dataset_differences"],
        "method": ckpt["config"]["method"],
        "epochs_done": ckpt["epoch"],
        "mae_mean": ev["mae_mean"],
        "mae_std": ev["mae_std"],
        "mae_per_sim": ev["mae_per_sim"],
        "src_mae_mean": src["mae_mean"],
    }
    if args.animate:
        from .methods import display_name

        out["animation"] = _animate_run(dataset, src, ev, display_name(out["method"]), args.animate)
    print(json.dumps(out, indent=1))
    return 0


def _animate_run(dataset, src: dict, ev: dict, name: str, path: str) -> dict | str:
    """The first test simulation: reference, SRC and the run's rollout, and the errors, animated
    into ``path`` (zosol.figures); what was written, or why nothing was."""
    from .figures import FieldMeta, missing_matplotlib, write_animation

    if missing_matplotlib():
        print(f"zosol: note: {missing_matplotlib()}", file=sys.stderr)
        return missing_matplotlib()
    sc = dataset.scenario
    shown = {
        "reference": dataset.test[0].trajectory.numpy(),
        "SRC": src["prediction"][0].numpy(),
        name: ev["prediction"][0].numpy(),
    }
    meta = FieldMeta.of(sc.coarse_solver(), sc.name)
    info = write_animation(shown, meta, path, title=f"{sc.name}: test simulation 0")
    return {"file": str(info.path), "frames": len(info.frames), "bytes": info.bytes}


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, stopped_methods
    from .report import markdown_table
    from .training import TrainingError

    options = _run_options(args, progress=not args.quiet, resume="auto")
    if not args.out:
        raise UsageError("--out must not be empty; name the output directory")
    methods = _parse_methods(args.methods)
    kwargs = {"methods": methods} if methods is not None else {}
    results = compare(
        args.scenario,
        args.preset,
        args.out,
        data_dir=args.data,
        train_preset=args.train_preset,
        overrides=_train_overrides(args),
        scenario_overrides=_parse_sets(args.set),
        options=options,
        twin=_twin(args),
        animation=args.animation,
        **kwargs,
    )
    print()
    print(markdown_table(results))
    drawn = results.get("figures", {})
    figures = ", frame_mae.png, test_simulation.png" if drawn else ""
    figures += f", {drawn['animation']['file']}" if "animation" in drawn else ""
    print(f"total {results['total_time']:.0f} s; wrote {args.out}/results.json, results.md, results.csv{figures}")
    stopped = stopped_methods(results)
    if stopped:
        raise TrainingError(
            f"{', '.join(f'{k} {v}' for k, v in stopped.items())} (see 'message' in "
            f"{args.out}/results.json; the last good checkpoints are in {args.out}/runs); "
            f"the other methods' results are written"
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    scenarios = args.scenarios.split(",") if args.scenarios else None
    if args.what == "engine":
        from .bench.engine import run_engine_bench

        run_engine_bench(json_path=args.json, quick=args.quick)
    elif args.what == "sol":
        from .bench.sol import run_sol_bench

        run_sol_bench(json_path=args.json, quick=args.quick, scenarios=scenarios)
    else:
        from .bench.solvers import run_solver_bench

        run_solver_bench(json_path=args.json, quick=args.quick, scenarios=scenarios)
    return 0


def _plugin_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import MODULE first (it registers scenarios or training methods of your own; repeatable)",
    )


def _scenario_args(q: argparse.ArgumentParser) -> None:
    _plugin_arg(q)
    q.add_argument(
        "--max-hours",
        type=float,
        metavar="H",
        help="refuse a job whose optimistic time estimate exceeds H hours (default 24; the estimate of a "
        "long job is printed before it starts)",
    )
    q.add_argument(
        "--scenario",
        required=True,
        help="burgers1d, burgers2d, karman2d, ks1d, or a scenario of your own (--plugin MODULE)",
    )
    q.add_argument("--preset", default="default", help="tiny, default or paper (default: %(default)s)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scenario config field")


def _add_data_commands(sub: Any) -> None:
    """``generate``, ``info`` and ``bench``."""
    q = sub.add_parser("generate", help="generate a fidelity dataset (HDF5)")
    _scenario_args(q)
    q.add_argument("--out", default="datasets", help="output directory (default: %(default)s)")
    q.add_argument("--batch", type=int, default=8, help="simulations run as one batch")
    q.add_argument("--overwrite", action="store_true", help="regenerate even if the file exists")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_cmd_generate)

    q = sub.add_parser("info", help="describe a dataset file and its coarse-solver error")
    q.add_argument("file")
    _plugin_arg(q)
    q.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the reference trajectories of a few simulations as compare draws a test simulation "
        "(format from the suffix: .png, .pdf, .svg, ...)",
    )
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_info)

    q = sub.add_parser("bench", help="speed benchmarks")
    q.add_argument(
        "what",
        choices=["engine", "solvers", "sol"],
        help="engine: ZO estimators; solvers: coarse-step throughput; sol: time per training step "
        "of FO-SOL, ZO-JAC-SOL and ZO-SOL",
    )
    q.add_argument("--json", help="also write the figures as JSON")
    q.add_argument("--quick", action="store_true", help="smaller sizes")
    q.add_argument("--scenarios", help="solvers / sol bench: comma-separated scenarios (default: all)")
    q.set_defaults(func=_cmd_bench)


def _add_training_commands(sub: Any) -> None:
    """``train``, ``evaluate`` and ``compare``."""
    from .config import TrainConfig
    from .figures import ANIMATION_CHOICES
    from .methods import names
    from .options import describe, specs

    q = sub.add_parser("train", help="train one corrector")
    _scenario_args(q)
    _twin_arg(q)
    q.add_argument("--method", required=True, help=describe(specs(TrainConfig)["method"]))
    q.add_argument(
        "--data", help="an existing dataset file, or an existing directory to generate it in (default: datasets)"
    )
    q.add_argument("--out", help="run directory (default: runs/<scenario>_<preset>_<method>)")
    q.add_argument("--train-preset", help="training preset (default: the scenario preset)")
    q.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_train_options(q)
    q.set_defaults(func=_cmd_train)

    q = sub.add_parser("evaluate", help="test MAE of a trained run")
    q.add_argument("run", help="run directory")
    _plugin_arg(q)
    q.add_argument(
        "--data",
        help="dataset file (default: the one the run was trained on; another of the same scenario, channels and "
        "grid is allowed, e.g. more test simulations: what differs is printed)",
    )
    q.add_argument(
        "--animate",
        metavar="FILE",
        help="animate the first test simulation: reference, SRC, this run and their errors (.gif; .mp4 with ffmpeg)",
    )
    q.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("compare", help="train and compare SRC and the training methods")
    _scenario_args(q)
    _twin_arg(q)
    q.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    q.add_argument(
        "--data", help="an existing dataset file, or an existing directory to generate it in (default: OUT/data)"
    )
    q.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(names())} (default: all, less any a scenario leaves out "
        f"by default, saying why)",
    )
    q.add_argument("--train-preset", help="training preset (default: the scenario preset)")
    q.add_argument("--quiet", action="store_true")
    g = q.add_mutually_exclusive_group()
    g.add_argument(
        "--animation",
        choices=ANIMATION_CHOICES,
        default="auto",
        help="animation of the first test simulation beside the figures: auto = test_simulation.mp4 when "
        "ffmpeg is on PATH, else .gif (default: %(default)s)",
    )
    g.add_argument("--no-animation", dest="animation", action="store_const", const="none", help="write no animation")
    _add_train_options(q)
    q.set_defaults(func=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``zosol`` command line."""
    from . import __version__

    p = argparse.ArgumentParser(
        prog="zosol",
        description="Zeroth-order Solver-in-the-Loop training of neural correctors for black-box PDE solvers.",
    )
    p.add_argument("--version", action="version", version=f"zosol {__version__}")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads (default: $OMP_NUM_THREADS if set, else 1: the built-in "
        "presets run many small tensor operations, where one thread was fastest)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    return p


def _preload_plugins(argv: Sequence[str] | None) -> None:
    """Import the ``--plugin`` modules before the parser is built, so that the option groups of
    the methods they register become ``--options``; a plugin that fails to import is reported
    later, with the command's other errors."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append")
    known, _ = pre.parse_known_args(argv)
    for module in known.plugin or []:
        from .solvers import load_plugin

        with contextlib.suppress(ValueError):
            load_plugin(module)


def main(argv: Sequence[str] | None = None) -> int:
    _preload_plugins(argv)
    args = build_parser().parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= _cores():
        print(
            f"zosol: error: --threads {args.threads}: use 1 to {_cores()} (the CPU cores this process may use)",
            file=sys.stderr,
        )
        return 2
    threads = args.threads or (None if os.environ.get("OMP_NUM_THREADS") else 1)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from .runtime import stop

    previous = stop.install_sigterm_handler()
    try:
        with warnings.catch_warnings():
            from .training.errors import show_warning

            warnings.showwarning = show_warning
            return _run(args)
    finally:
        stop.restore_sigterm_handler(previous)


#: longest message line printed (a refused input is quoted as an excerpt, never whole)
MAX_MESSAGE_CHARS = 2000


def _line(text: object) -> str:
    """``text`` as one line of at most MAX_MESSAGE_CHARS characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= MAX_MESSAGE_CHARS else s[: MAX_MESSAGE_CHARS - 40] + f" ... ({len(s):,} characters in all)"


def _run(args: argparse.Namespace) -> int:
    """The command, its failures turned into an exit code: zosol's own errors (:mod:`zosol.errors`) and
    file-system errors in one line (2: fix the input, 1: the run failed), anything else (a bug) with its
    traceback."""
    from .errors import ZosolError
    from .runtime import stop
    from .runtime.files import os_error_message

    try:
        from .datasets.budget import set_time_limit

        set_time_limit(getattr(args, "max_hours", None))
        for module in getattr(args, "plugin", None) or []:
            from .solvers import load_plugin

            load_plugin(module)
        return _run_command(args)
    except stop.Terminated as e:
        print(
            f"zosol: {_line(e)}"
            if "resume" in str(e)
            else f"zosol: {_line(e or 'stopped by SIGTERM')}; finished work is "
            f"saved, rerun the command (with --resume for train)",
            file=sys.stderr,
        )
        return stop.EXIT_CODE
    except KeyboardInterrupt:
        print(
            "zosol: interrupted; finished work is saved, rerun the command (with --resume for train)", file=sys.stderr
        )
        return 130
    except ZosolError as e:
        print(f"zosol: {'failed' if e.exit_code == 1 else 'error'}: {_line(e)}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # a scenario's, plugin's or solver's code exited instead of raising
        print(
            f"zosol: failed: code of a scenario, plugin or solver called sys.exit({_line(repr(e.code))[:40]}) "
            f"instead of returning or raising; finished work is kept, fix that code and rerun the command",
            file=sys.stderr,
        )
        return 1
    except FileNotFoundError as e:
        print(f"zosol: error: {_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only directory, full disk, a file where a directory belongs, ...
        print(
            f"zosol: error: cannot write or read {_line(os_error_message(e))} (finished work is kept; fix this "
            f"and rerun the command)",
            file=sys.stderr,
        )
        return 2
    except Exception:  # not one of zosol's errors: a bug (in zosol, a plugin, torch, ...) keeps its traceback
        traceback.print_exc()
        print(
            "zosol: internal error (the traceback above); this is a bug, not a mistake in your input: please "
            "report it with the traceback and the command (finished work is kept)",
            file=sys.stderr,
        )
        return 1


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``; ``train`` and ``compare`` started by ``torchrun`` first join its process
    group (see :mod:`zosol.runtime.launch`), and a rank that is lost ends the job in one line."""
    if args.command not in ("train", "compare"):
        return args.func(args)
    import torch.distributed as dist

    from .runtime import stop
    from .runtime.launch import join_launcher_group, lost_local_ranks, lost_ranks_message

    joined = join_launcher_group(getattr(args, "device", None))
    if joined is None:
        return args.func(args)
    rank, size, backend = joined
    if args.workers > 1:
        raise UsageError("--workers starts local processes itself; under torchrun set --nproc-per-node instead")
    if rank == 0:
        print(
            f"zosol: torchrun launch: rank 0 of {size} ({backend}); rank 0 writes checkpoints and results",
            file=sys.stderr,
        )
    try:
        return args.func(args)
    except stop.Terminated as e:  # the launcher stops the other ranks when one fails
        dead = lost_local_ranks()
        if not dead:
            raise
        print(f"zosol: failed: {lost_ranks_message(e, dead)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a collective with a vanished peer (gloo: a plain RuntimeError)
        from .runtime.workers import lost_a_peer

        if not lost_a_peer(e):
            raise
        print(f"zosol: failed: {lost_ranks_message(e, lost_local_ranks())}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
