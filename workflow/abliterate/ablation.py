"""Directional ablation of the residual-writing matrices, as LoRA factors or as direct weight edits.

Notation. ``W`` is always the (out_features = hidden, in_features) view of a component's weight
(transformers ``Conv1D`` and transposed expert tensors are viewed, not copied), ``r`` a unit vector of
the residual space (hidden,), ``λ`` the kernel weight of the component's layer. Every edit is
``W′ = W + ΔW`` with ``ΔW = B A`` where B is (out, k) and A is (k, in):

* ``RowNorm.NONE``: ``ΔW = −λ r (rᵀW)``; ``B = −λ r``, ``A = rᵀW`` (rank 1). With λ = 1 this removes
  the component's ability to write along ``r``: ``rᵀW′ = 0``.
* ``RowNorm.PRE``: with row norms ``n_i = ‖W_i,:‖`` (rows are output features) and ``Ŵ = diag(1/n) W``,
  ``ΔW = −λ diag(n) r (rᵀŴ)``; ``B = −λ (n ⊙ r)``, ``A = rᵀŴ = (r ⊘ n)ᵀ W`` (still rank 1, and Ŵ is
  never formed).
* ``RowNorm.FULL``: ``W′ = diag(n) · rownormalise(Ŵ − λ r rᵀŴ)``, which keeps every row norm of W.
  ``ΔW = W′ − W`` is dense and not low-rank in general; it is approximated by
  ``torch.svd_lowrank(ΔW, q=rank + oversampling, niter)`` under a fixed seed, truncated to ``rank``,
  with ``sqrt(S)`` split over both factors: ``B = U sqrt(S)``, ``A = sqrt(S) Vᵀ``.

Several directions (``AblationParams.n_directions`` = k > 1): ``R`` (k, hidden) holds orthonormal
rows ``r_i`` with weights ``λ_i`` (λ for ``r_1``, λ·``secondary_weight`` for the others), and the edit
is ``ΔW = −Σᵢ λᵢ rᵢ (rᵢᵀW)``, one rank-k update through ``torch.matmul(R, W)``:

* NONE: ``B = −Rᵀ diag(λ)`` (out, k), ``A = R W`` (k, in); PRE: ``B = −diag(n) Rᵀ diag(λ)``,
  ``A = (R ⊘ n) W``.
* FULL: ``Ŵ − Rᵀ diag(λ) (R Ŵ)`` with rows renormalised as above, approximated at rank
  ``full_rank + k − 1`` (the k directions' own rank plus the row rescaling's ``full_rank − 1``), so
  k = 1 keeps today's ``full_rank``.

A trial with k = 1 runs the single-direction code unchanged (a test compares it bit for bit).

Rules: no (hidden, hidden) projector is ever built (``torch.matmul(r, W)`` and rank-1 ``addr_``); the
projection math runs in float32, with the weight cast to float32 once (a no-op for float32 weights)
and the factors cast once to the weight's dtype for a direct edit; each edit runs on its weight's
own device, so models split by ``device_map`` work.

How an edit reaches a model, trial after trial, is :mod:`abliterate.editors`' job (LoRA factors or
in-place edits, stacked per component kind or one by one); this module defines what the edit is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import devices, hf_compat, io
from .architecture import KINDS, Component, unwrap
from .errors import ConfigError, NumericalError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

ADAPTER = "default"
FULL_OVERSAMPLING = 8
FULL_NITER = 4
DIRECT_EDITS_FILE = "direct_edits.safetensors"


class RowNorm(str, Enum):
    NONE = "none"
    PRE = "pre"
    FULL = "full"


@dataclass(frozen=True)
class Kernel:
    """Ablation weight over layers: ``max_weight`` at ``max_weight_position``, falling linearly to
    ``min_weight`` at ``min_weight_distance`` layers away, 0 beyond."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self) -> None:
        if not self.min_weight_distance > 0:
            raise ConfigError(
                f"Kernel.min_weight_distance must be > 0, got {self.min_weight_distance}"
            )

    def weight_at(self, layer: float) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        t = distance / self.min_weight_distance
        return self.max_weight + t * (self.min_weight - self.max_weight)


_KERNEL_FIELDS = tuple(f.name for f in dataclasses.fields(Kernel))
# Flat keys besides direction_index and <kind>.<field> (trial parameters, selected.json)
N_DIRECTIONS = "n_directions"
SECONDARY_WEIGHT = "secondary_weight"
OFF = "off"  # the kinds a trial leaves unedited (a sampled max_weight < 0), comma-separated


@dataclass(frozen=True)
class AblationParams:
    """One trial's parameters. ``direction_index`` None: each layer i uses its own direction
    (``directions[i + 1]``, the output of layer i); a float in [0, n_layers - 1] is a layer index
    whose output's direction all layers use (see :func:`direction_for`). ``kernels`` is keyed by
    component kind; a missing kind is not edited (a kind switched off, ``off``, is one).
    ``n_directions`` directions of each layer's set are ablated, the first with the kernel's λ and
    the others with λ·``secondary_weight``."""

    direction_index: float | None
    kernels: dict[str, Kernel]
    n_directions: int = 1
    secondary_weight: float = 0.0
    off: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = (set(self.kernels) | set(self.off)) - set(KINDS)
        if unknown:
            raise ConfigError(
                f"unknown component kinds {sorted(unknown)} in kernels; known: {list(KINDS)}"
            )
        if set(self.off) & set(self.kernels):
            raise ConfigError(f"component kinds {sorted(set(self.off) & set(self.kernels))} are both off and edited")
        if int(self.n_directions) != self.n_directions or self.n_directions < 1:
            raise ConfigError(f"n_directions must be an integer >= 1, got {self.n_directions!r}")
        if not 0.0 <= self.secondary_weight <= 1.0:
            raise ConfigError(f"secondary_weight must lie in [0, 1], got {self.secondary_weight!r}")

    def direction_weights(self, weight: float) -> list[float]:
        """λᵢ of the k directions for a layer whose kernel weight is ``weight``."""
        return [weight] + [weight * self.secondary_weight] * (self.n_directions - 1)

    @classmethod
    def constant(
        cls, weight: float, direction_index: float | None = None, kinds=KINDS
    ) -> AblationParams:
        """The same weight on every layer of every kind (for tests and baselines)."""
        kernel = Kernel(weight, 0.0, weight, 1e9)
        return cls(direction_index, {kind: kernel for kind in kinds})

    def to_flat(self) -> dict[str, float]:
        """Flat float dict (Optuna params, JSON): ``direction_index`` (absent when None) and
        ``<kind>.<field>`` for each kernel field."""
        flat: dict[str, Any] = {}
        if self.direction_index is not None:
            flat["direction_index"] = float(self.direction_index)
        if self.n_directions > 1:  # k = 1 keeps the flat form of single-direction trials
            flat[N_DIRECTIONS] = int(self.n_directions)
            flat[SECONDARY_WEIGHT] = float(self.secondary_weight)
        if self.off:
            flat[OFF] = ",".join(sorted(self.off))
        for kind in sorted(self.kernels):
            for name in _KERNEL_FIELDS:
                flat[f"{kind}.{name}"] = float(getattr(self.kernels[kind], name))
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> AblationParams:
        index = flat.get("direction_index")
        fields: dict[str, dict[str, float]] = {}
        for key, value in flat.items():
            if key in ("direction_index", N_DIRECTIONS, SECONDARY_WEIGHT, OFF):
                continue
            kind, _, name = key.partition(".")
            if name not in _KERNEL_FIELDS:
                raise ConfigError(
                    f"unknown ablation parameter {key!r}; expected <kind>.{{{', '.join(_KERNEL_FIELDS)}}}"
                )
            fields.setdefault(kind, {})[name] = float(value)
        kernels = {}
        for kind, values in fields.items():
            missing = set(_KERNEL_FIELDS) - set(values)
            if missing:
                raise ConfigError(f"ablation parameters for {kind!r} lack {sorted(missing)}")
            kernels[kind] = Kernel(**values)
        off = flat.get(OFF) or ""
        return cls(None if index is None else float(index), kernels, int(flat.get(N_DIRECTIONS, 1)),
                   float(flat.get(SECONDARY_WEIGHT, 0.0)), tuple(k for k in str(off).split(",") if k))


def off_kinds(flat: Mapping[str, Any]) -> list[str]:
    """The component kinds a flat parameter dict switches off (``off``: comma-separated kinds)."""
    off = flat.get(OFF)
    return [k for k in off.split(",") if k] if isinstance(off, str) else []


def direction_for(directions: torch.Tensor, layer: float) -> torch.Tensor:
    """Unit direction at the output of decoder layer ``layer`` (fractional: the outputs of its floor
    and ceiling layers are interpolated), on the table's device, float32.

    ``directions`` is the directions rule's (n_layers + 1, hidden) table, row 0 the embedding output
    and row ``l + 1`` the output of layer ``l``; so ``layer`` lies in [0, n_layers - 1] and the last
    layer's output is reachable. Heretic's ``modf(direction_index + 1)`` means the same.
    """
    last = directions.shape[0] - 2
    if not 0 <= layer <= last:
        raise ConfigError(f"direction_index {layer} is outside [0, {last}] (a decoder layer index)")
    row = layer + 1
    lo = math.floor(row)
    frac = float(row - lo)
    v = directions[lo] if frac == 0 else torch.lerp(directions[lo], directions[lo + 1], frac)
    norm = torch.linalg.vector_norm(v)
    if not norm.item() > 0:  # `not >` also catches NaN
        raise NumericalError(
            f"direction at layer {layer} has norm {norm.item()}; the direction table is broken"
        )
    return v / norm


def directions_for(sets: torch.Tensor, layer: float, k: int) -> torch.Tensor:
    """(k, hidden) orthonormal float32 directions at the output of layer ``layer``, from the
    (n_layers + 1, K, hidden) sets: each row interpolated as :func:`direction_for` does (row 0 is
    exactly its result), then the rows Gram–Schmidt'ed in order. A row with nothing left after that
    (a zero row of the sets) stays zero, which ablates nothing."""
    first = direction_for(sets[:, 0], layer)
    row = layer + 1
    lo = math.floor(row)
    frac = float(row - lo)
    rest = sets[lo, 1:k] if frac == 0 else torch.lerp(sets[lo, 1:k], sets[lo + 1, 1:k], frac)
    return torch.cat([first[None], orthonormal_after(first[None], rest)])


def orthonormal_after(done: torch.Tensor, rest: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Rows of ``rest`` made orthonormal to ``done``'s rows and to each other, in order (Gram–Schmidt,
    twice per row for float32); a row of norm below ``tol`` after that becomes zero."""
    rows = list(done.unbind(0))
    out = []
    for v in rest.unbind(0):
        norm0 = torch.linalg.vector_norm(v)
        for _ in range(2):
            for u in rows:
                v = v - torch.dot(u, v) * u
        norm = torch.linalg.vector_norm(v)
        keep = norm > tol * torch.clamp_min(norm0, 1e-30)
        v = torch.where(keep, v / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(v))
        out.append(v)
        rows.append(v)
    return torch.stack(out) if out else rest.new_zeros(0, done.shape[1])


def _row_norms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms n (out,) and a divisor equal to n where n > 0 and 1 for all-zero rows."""
    n = torch.linalg.vector_norm(w, dim=1)
    return n, torch.where(n > 0, n, torch.ones_like(n))


def delta_factors(
    w: torch.Tensor,
    r: torch.Tensor,
    weight: float | torch.Tensor,
    row_norm: RowNorm = RowNorm.NONE,
    rank: int = 3,
    seed: int = 0,
    oversampling: int = FULL_OVERSAMPLING,
    niter: int = FULL_NITER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B (out, k), A (k, in)), float32 on ``w``'s device, with ΔW = B A for the (out, in) view ``w``.

    ``r`` must be a float32 unit vector on ``w``'s device. k is 1 for NONE/PRE and min(rank, out, in) for FULL.
    Several directions: ``r`` (m, hidden) orthonormal rows and ``weight`` (m,) their λᵢ; k is m for
    NONE/PRE and min(rank + m − 1, out, in) for FULL (module docstring). m = 1 is the single direction.
    """
    if r.ndim == 2:
        if r.shape[0] == 1:
            weight = float(weight[0]) if isinstance(weight, torch.Tensor) else float(weight)
            r = r[0]
        else:
            return _multi_delta_factors(w, r, torch.as_tensor(weight, dtype=torch.float32, device=w.device),
                                        row_norm, rank, seed, oversampling, niter)
    w32 = w.float()  # the single cast; a no-op for float32 weights
    if row_norm == RowNorm.NONE:
        a = torch.matmul(r, w32)
        b = r * -weight
    elif row_norm == RowNorm.PRE:
        n, div = _row_norms(w32)
        a = torch.matmul(r / div, w32)  # rᵀŴ without forming Ŵ
        b = (n * r) * -weight
    elif row_norm == RowNorm.FULL:
        n, div = _row_norms(w32)
        w_hat = w32 / div[:, None]
        projected = w_hat.addr(r, torch.matmul(r, w_hat), alpha=-weight)
        _, pdiv = _row_norms(projected)
        w_new = projected * (n / pdiv)[:, None]
        return _low_rank(w_new - w32, rank, seed, oversampling, niter)
    else:
        raise ConfigError(f"unknown row_norm {row_norm!r}; use one of {[m.value for m in RowNorm]}")
    return b[:, None], a[None, :]


def _multi_delta_factors(w: torch.Tensor, r: torch.Tensor, lam: torch.Tensor, row_norm: RowNorm, rank: int,
                         seed: int, oversampling: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`delta_factors` for m > 1 orthonormal rows ``r`` (m, hidden) with weights ``lam`` (m,)."""
    w32 = w.float()
    if row_norm == RowNorm.NONE:
        return r.T * -lam, torch.matmul(r, w32)
    n, div = _row_norms(w32)
    if row_norm == RowNorm.PRE:
        return (n[:, None] * r.T) * -lam, torch.matmul(r / div, w32)
    if row_norm != RowNorm.FULL:
        raise ConfigError(f"unknown row_norm {row_norm!r}; use one of {[m.value for m in RowNorm]}")
    w_hat = w32 / div[:, None]
    projected = w_hat.addmm(r.T * lam, torch.matmul(r, w_hat), alpha=-1)  # Ŵ − Rᵀ diag(λ) R Ŵ
    _, pdiv = _row_norms(projected)
    return _low_rank(projected * (n / pdiv)[:, None] - w32, rank + r.shape[0] - 1, seed, oversampling, niter)


def _low_rank(delta: torch.Tensor, rank: int, seed: int, oversampling: int,
              niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FULL mode's factors of a dense ``delta``: ``svd_lowrank`` under a fixed seed, truncated to
    ``rank``, ``sqrt(S)`` on both factors."""
    k = min(rank, *delta.shape)
    q = min(k + oversampling, *delta.shape)
    with devices.fork_rng(delta.device):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * v[:, :k].T


def views(c: Component, weight: torch.Tensor) -> list[torch.Tensor]:
    """The (out, in) views of a component's stored tensor: one, or one per expert. Views share storage."""
    if c.layout == "linear":
        return [weight]
    if c.layout == "conv1d":
        return [weight.T]
    if c.layout == "experts":
        return [
            weight[e] if c.expert_axis_order == "out_in" else weight[e].T
            for e in range(weight.shape[0])
        ]
    raise UnsupportedArchitectureError(f"{c.name}: unknown layout {c.layout!r}")


def source_weight(c: Component) -> torch.Tensor:
    """The weight the projection is computed from; quantized layers are dequantised first."""
    if c.quantized:
        return hf_compat.dequantized_weight(c.module).detach()
    return c.weight.detach()


def load_saved_adapter(model: nn.Module, folder: str | Path, merge: bool = False) -> nn.Module:
    """``model`` with a folder written by :meth:`abliterate.editors.InPlaceEditor.save`: its LoRA part through PEFT
    (merged into the weights when ``merge``) when it has one, then its direct edits."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
        if merge:
            model = model.merge_and_unload()
    apply_saved_direct_edits(model, folder)
    return model


def apply_saved_direct_edits(model: nn.Module, folder: str | Path) -> int:
    """Add the direct edits saved by :meth:`abliterate.editors.InPlaceEditor.save` to ``model`` (W += B A per view).

    Used by the CPU merge: LoRA components come back through PEFT, the others through this.
    Returns the number of components edited (0 when the folder has no direct edits).
    """
    path = Path(folder) / DIRECT_EDITS_FILE
    if not path.exists():
        return 0
    tensors, meta = io.load_safetensors(path)
    base = unwrap(model)
    entries = meta.get("direct_edits") or []
    with torch.no_grad():
        for entry in entries:
            weight = base.get_submodule(entry["name"]).get_parameter(entry["param"])
            b = tensors[f"{entry['key']}.lora_B"].to(weight.device)
            a = tensors[f"{entry['key']}.lora_A"].to(weight.device)
            add_saved_edit(weight, entry, b, a)
    log.info("applied %d saved direct edits from %s", len(entries), path)
    return len(entries)


def add_saved_edit(weight: torch.Tensor, entry: Mapping[str, Any], b: torch.Tensor, a: torch.Tensor) -> None:
    """``W += B A`` on each (out, in) view of ``weight``, for one ``direct_edits`` entry of a saved edit
    (per expert for fused experts): the one place a saved direct edit is added, for the whole-model
    and the streaming merge alike."""
    component = Component(layer=entry["layer"], kind=entry["kind"], name=entry["name"], module=None,
                          param=entry["param"], layout=entry["layout"],
                          expert_axis_order=entry.get("expert_axis_order"))
    for e, view in enumerate(views(component, weight)):
        be, ae = (b[e], a[e]) if component.layout == "experts" else (b, a)
        view.add_(torch.matmul(be, ae).to(view.dtype))
