"""Zeroth-order optimisation engine (PDE-independent).

Public API:
    cge, rge, ZOEstimate, batched_loss_from_module, write_grads   (estimators)
    cge_structured, Residual, UnsupportedModuleError              (structured forward / feature reuse)
    zo_grasp_scores, fo_grasp_scores, layerwise_pruning_ratios, zo_grasp_lprs, fo_grasp_lprs,
    uniform_lprs, random_masks, MaskScheduler                     (sparsity)
    evaluate_chunked, chunk_size_from_budget, spawn_local, ...    (parallel)
"""
from .estimators import NonFiniteLossError, ZOEstimate, batched_loss_from_module, cge, rge, write_grads
from .parallel import (
    chunk_size_from_budget, estimate_bytes_per_perturbation, evaluate_chunked, iter_chunks,
    measure_peak_memory, resolve_device, spawn_local,
)
from .sparsity import (
    MaskScheduler, fo_grasp_lprs, fo_grasp_scores, layerwise_pruning_ratios, mask_sparsity, random_masks,
    score_correlation, uniform_lprs, zo_grasp_lprs, zo_grasp_scores,
)
from .reuse import Residual, UnsupportedModuleError, cge_structured, check_structured_support

__all__ = [
    "NonFiniteLossError", "ZOEstimate", "cge", "rge", "batched_loss_from_module", "write_grads",
    "cge_structured", "Residual", "UnsupportedModuleError", "check_structured_support",
    "evaluate_chunked", "iter_chunks", "chunk_size_from_budget", "estimate_bytes_per_perturbation",
    "measure_peak_memory", "resolve_device", "spawn_local",
    "zo_grasp_scores", "fo_grasp_scores", "layerwise_pruning_ratios", "zo_grasp_lprs", "fo_grasp_lprs",
    "uniform_lprs", "random_masks", "mask_sparsity", "MaskScheduler", "score_correlation",
]
