"""The CGE perturbation plan and its assembly, written once for every CGE path.

``CGEPlan.build(params, masks, scheme, mu)`` lists the perturbations (coordinate, signed step);
``plan.run(eval_chunk, base_loss, ...)`` evaluates them in chunks (:mod:`.parallel`) and assembles
the gradient.  :func:`zosol.zo.cge` (batched loss over parameter copies) and
:func:`zosol.zo.cge_structured` (structured perturbed forward) differ only in ``eval_chunk``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .checks import check_loss_values, check_masks, check_mu, check_scheme
from .parallel import evaluate_chunked

__all__ = [
    "ZOEstimate",
    "CGEPlan",
    "n_params",
    "param_layout",
    "flatten_params",
    "unflatten",
    "split_flat",
    "selected_coordinates",
    "perturbation_plan",
    "assemble_cge",
]

# (name, shape, offset, numel) per parameter tensor, in ``params`` order
Layout = list


def n_params(model: nn.Module) -> int:
    """Number of trainable parameters (the dimension ``d`` a full CGE perturbs)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class ZOEstimate(Mapping):
    """Result of a ZO gradient estimate; behaves like ``dict[str, Tensor]`` of gradients.

    Attributes:
        grads: name -> gradient tensor with the parameter's shape (and device/dtype).
        queries: number of loss evaluations (perturbed parameter vectors evaluated).
        loss: loss at the unperturbed parameters when it was evaluated (forward
            scheme, RGE), else None.
        info: extra diagnostics (number of coordinates, engine, chunk size, ...).
    """

    grads: dict
    queries: int
    loss: float | None = None
    info: dict = field(default_factory=dict)

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.grads[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)

    def flat(self) -> torch.Tensor:
        """All gradients concatenated, shape ``(d,)``."""
        return torch.cat([g.reshape(-1) for g in self.grads.values()])


def param_layout(params: Mapping) -> Layout:
    """``[(name, shape, offset, numel), ...]`` of the flat parameter vector, in ``params`` order."""
    layout, off = [], 0
    for k, p in params.items():
        layout.append((k, tuple(p.shape), off, p.numel()))
        off += p.numel()
    return layout


def flatten_params(params: Mapping, device: torch.device) -> torch.Tensor:
    """All parameters concatenated (detached) on ``device``, shape ``(d,)``."""
    return torch.cat([p.detach().reshape(-1).to(device) for p in params.values()])


def unflatten(flat: torch.Tensor, layout: Layout) -> dict:
    """``flat`` of shape ``(P, d)`` -> dict name -> view of shape ``(P, *shape)``."""
    return {k: flat[:, o : o + n].reshape((flat.shape[0],) + shp) for k, shp, o, n in layout}


def selected_coordinates(params: Mapping, masks: Mapping | None) -> tuple[torch.Tensor, Layout]:
    """Global flat indices (sorted, CPU int64) of the perturbed coordinates, and the layout."""
    layout = param_layout(params)
    d = layout[-1][2] + layout[-1][3] if layout else 0
    bm = check_masks(params, masks)
    if bm is None:
        return torch.arange(d, dtype=torch.long), layout
    flat = torch.cat([bm[k].reshape(-1) for k in params])
    return torch.nonzero(flat, as_tuple=False).reshape(-1), layout


def perturbation_plan(coords: torch.Tensor, scheme: str, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturbation list for CGE: ``(coordinate index (N,), signed step (N,) float64)``.

    forward: one ``+mu`` per coordinate; central: ``+mu, -mu`` interleaved per coordinate.
    """
    if scheme == "forward":
        return coords, torch.full((coords.numel(),), mu, dtype=torch.float64)
    idx = coords.repeat_interleave(2)
    step = torch.tensor([mu, -mu], dtype=torch.float64).repeat(coords.numel())
    return idx, step


def assemble_cge(
    values: torch.Tensor,
    base: torch.Tensor | None,
    idx: torch.Tensor,
    scheme: str,
    mu: float,
    params: Mapping,
    layout: Layout,
) -> dict:
    """Perturbed loss values ``(N,)`` -> gradient dict (float64 arithmetic, then the parameters' dtype)."""
    d = layout[-1][2] + layout[-1][3]
    g = torch.zeros(d, dtype=torch.float64)
    values = values.detach().to("cpu", torch.float64)
    if scheme == "forward":
        g[idx] = (values - float(base)) / mu
    else:
        g[idx[0::2]] = (values[0::2] - values[1::2]) / (2.0 * mu)
    return split_flat(g, params, layout)


def split_flat(g: torch.Tensor, params: Mapping, layout: Layout) -> dict:
    """Flat gradient ``(d,)`` -> dict name -> tensor with each parameter's shape, device and dtype."""
    return {k: g[o : o + n].reshape(shp).to(device=params[k].device, dtype=params[k].dtype) for k, shp, o, n in layout}


@dataclass
class CGEPlan:
    """All perturbations of one CGE: coordinates ``coords`` (C,), perturbation list ``idx``/``step`` (N,)."""

    params: dict
    layout: Layout
    coords: torch.Tensor
    idx: torch.Tensor
    step: torch.Tensor
    scheme: str
    mu: float

    @classmethod
    def build(cls, params: Mapping, masks: Mapping | None, scheme: str, mu: float) -> CGEPlan:
        """Validate ``mu``/``scheme``/``masks`` and list the perturbations of the unmasked coordinates."""
        mu, scheme = check_mu(mu), check_scheme(scheme)
        params = dict(params)
        coords, layout = selected_coordinates(params, masks)
        idx, step = perturbation_plan(coords, scheme, mu)
        return cls(params, layout, coords, idx, step, scheme, mu)

    @property
    def n(self) -> int:
        """Number of perturbed queries (without the forward scheme's base query)."""
        return int(self.idx.numel())

    def run(
        self,
        eval_chunk: Callable[[int, int], torch.Tensor],
        base_loss: Callable[[], torch.Tensor],
        chunk_size: int | None,
        distributed: bool = False,
        group=None,
        device: torch.device | None = None,
        progress: bool = False,
        info: dict | None = None,
        what: str = "batched_loss",
    ) -> ZOEstimate:
        """Evaluate all perturbations and assemble the estimate.

        ``eval_chunk(s, e) -> (e - s,)`` losses of perturbations ``s:e``; ``base_loss() -> (1,)`` the
        unperturbed loss (forward scheme only).  Chunks are sharded over ranks if ``distributed``.
        """
        base, queries = None, self.n
        if self.scheme == "forward":
            base = check_loss_values(base_loss(), 1, what)[0].detach().double().cpu()
            queries += 1

        def checked(s: int, e: int) -> torch.Tensor:
            return check_loss_values(eval_chunk(s, e), e - s, what)

        values = evaluate_chunked(
            checked,
            self.n,
            chunk_size,
            distributed,
            group,
            dtype=torch.float64,
            device=device if distributed else None,
            progress=progress,
        )
        grads = assemble_cge(values, base, self.idx, self.scheme, self.mu, self.params, self.layout)
        d = self.layout[-1][2] + self.layout[-1][3]
        meta = {
            "coordinates": int(self.coords.numel()),
            "d": int(d),
            "scheme": self.scheme,
            "chunk_size": chunk_size,
            **(info or {}),
        }
        return ZOEstimate(grads, queries, None if base is None else float(base), meta)
