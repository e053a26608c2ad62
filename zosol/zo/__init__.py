"""Zeroth-order optimisation engine (PDE-independent).

Layers (each imports only the ones above it; no cycles):
    checks      validators and error types (NonFiniteLossError, UnsupportedModuleError, SCHEMES)
    parallel    chunking, memory budgets, devices, torch.distributed sharding, process groups
                (spawn_local, init_from_env for torchrun)
    plan        the CGE perturbation plan and its assembly (ZOEstimate, CGEPlan, n_params)
    estimators  cge, rge, batched_loss_from_module, write_grads
    structured  the structured perturbed forward over a torch.fx graph (feature reuse, any traceable net)
    reuse       cge_structured: picks the structured or the vmap engine (and says why), Residual
    sparsity    ZO-GraSP -> layer-wise pruning ratios -> masks, MaskScheduler
    jacobian    finite-difference Jacobians of a black-box step (FDJacobian, fd_step): ZO-JAC-SOL
    refjac      reference-subtracted Jacobians of globally coupled steps (RefJacobian, build_references,
                build_frame_references)
    bench_nets  reference networks of the benches (the engine bench is :mod:`zosol.bench.engine`)

``zosol.zo`` exports the estimators (CGE / RGE, structured CGE, sparse ZO) and the Jacobian API;
chunking, memory budgets, devices and process groups are imported from :mod:`zosol.zo.parallel`.
"""

from .checks import SCHEMES, NonFiniteLossError, UnsupportedModuleError
from .estimators import batched_loss_from_module, cge, rge, write_grads
from .jacobian import DiscontinuityError, FDJacobian, JacobianError, fd_step
from .plan import CGEPlan, ZOEstimate, n_params
from .refjac import References, RefJacobian, build_frame_references, build_references
from .reuse import ENGINES, Residual, cge_structured, check_structured_support
from .sparsity import (
    MaskScheduler,
    fo_grasp_lprs,
    fo_grasp_scores,
    layerwise_pruning_ratios,
    mask_sparsity,
    random_masks,
    score_correlation,
    uniform_lprs,
    zo_grasp_lprs,
    zo_grasp_scores,
)

__all__ = [
    "SCHEMES",
    "NonFiniteLossError",
    "UnsupportedModuleError",
    "ZOEstimate",
    "CGEPlan",
    "n_params",
    "cge",
    "rge",
    "batched_loss_from_module",
    "write_grads",
    "cge_structured",
    "Residual",
    "check_structured_support",
    "ENGINES",
    "zo_grasp_scores",
    "fo_grasp_scores",
    "layerwise_pruning_ratios",
    "zo_grasp_lprs",
    "fo_grasp_lprs",
    "uniform_lprs",
    "random_masks",
    "mask_sparsity",
    "MaskScheduler",
    "score_correlation",
    "FDJacobian",
    "fd_step",
    "JacobianError",
    "DiscontinuityError",
    "RefJacobian",
    "References",
    "build_references",
    "build_frame_references",
]
