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

Rules: no (hidden, hidden) projector is ever built (``torch.matmul(r, W)`` and rank-1 ``addr_``); the
projection math runs in float32, with the weight cast to float32 once (a no-op for float32 weights)
and the factors cast once to the weight's dtype for a direct edit; each edit runs on its weight's
own device, so models split by ``device_map`` work.

Two routes, one result. Components PEFT can wrap (``Component.lora``) get a LoRA adapter whose
factors are overwritten per trial (``lora_alpha == r`` so the scaling is 1, dropout 0, no bias);
others (fused 3-D experts, unusual modules), or all with ``force_direct=True``, are edited in place,
with a backup taken at their first edit so ``reset()`` restores them bit for bit.

Two paths, one result. By default the weights of each component kind (one same-shaped matrix per
layer) are stacked into one tensor and a trial edits all of them with batched products
(:mod:`abliterate.batched_ablation`: on a GPU the loop below was bound by kernel launches, not
bytes); components that do not stack (fused experts, quantized or tied weights) and
``batched=False`` take the per-component loop with :func:`delta_factors`, which the tests use as
the reference.

Adapter dtype: ``get_peft_model`` runs with ``autocast_adapter_dtype=True`` (PEFT's default), so for
float16/bfloat16 bases the LoRA factors stay float32 (PEFT casts the layer input to the adapter dtype
and the result back), and the factors are stored without a second rounding.

Quantized bitsandbytes layers (Linear4bit, Linear8bitLt) go through the LoRA route only; their ``rᵀW``
and row norms come from ``peft.utils.integrations.dequantize_module_weight``. That path needs CUDA and
is not covered by the CPU tests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import batched_ablation, devices, io
from .architecture import KINDS, Component, ModelLayout, unwrap
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


@dataclass(frozen=True)
class AblationParams:
    """One trial's parameters. ``direction_index`` None: each layer i uses its own direction
    (``directions[i + 1]``, the output of layer i); a float in [0, n_layers - 1] is a layer index
    whose output's direction all layers use (see :func:`direction_for`). ``kernels`` is keyed by component kind; a missing kind is not edited."""

    direction_index: float | None
    kernels: dict[str, Kernel]

    def __post_init__(self) -> None:
        unknown = set(self.kernels) - set(KINDS)
        if unknown:
            raise ConfigError(
                f"unknown component kinds {sorted(unknown)} in kernels; known: {list(KINDS)}"
            )

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
        flat: dict[str, float] = {}
        if self.direction_index is not None:
            flat["direction_index"] = float(self.direction_index)
        for kind in sorted(self.kernels):
            for name in _KERNEL_FIELDS:
                flat[f"{kind}.{name}"] = float(getattr(self.kernels[kind], name))
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> AblationParams:
        index = flat.get("direction_index")
        fields: dict[str, dict[str, float]] = {}
        for key, value in flat.items():
            if key == "direction_index":
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
        return cls(None if index is None else float(index), kernels)


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


def layer_direction(
    directions: torch.Tensor, layer: int, direction_index: float | None
) -> torch.Tensor:
    """The direction ablated at decoder layer ``layer``: its own output's, or the global one."""
    return direction_for(directions, layer if direction_index is None else direction_index)


def _row_norms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms n (out,) and a divisor equal to n where n > 0 and 1 for all-zero rows."""
    n = torch.linalg.vector_norm(w, dim=1)
    return n, torch.where(n > 0, n, torch.ones_like(n))


def delta_factors(
    w: torch.Tensor,
    r: torch.Tensor,
    weight: float,
    row_norm: RowNorm = RowNorm.NONE,
    rank: int = 3,
    seed: int = 0,
    oversampling: int = FULL_OVERSAMPLING,
    niter: int = FULL_NITER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B (out, k), A (k, in)), float32 on ``w``'s device, with ΔW = B A for the (out, in) view ``w``.

    ``r`` must be a float32 unit vector on ``w``'s device. k is 1 for NONE/PRE and min(rank, out, in) for FULL.
    """
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
        delta = w_new - w32
        k = min(rank, *delta.shape)
        q = min(k + oversampling, *delta.shape)
        with devices.fork_rng(delta.device):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        root = s[:k].sqrt()
        return u[:, :k] * root, root[:, None] * v[:, :k].T
    else:
        raise ConfigError(f"unknown row_norm {row_norm!r}; use one of {[m.value for m in RowNorm]}")
    return b[:, None], a[None, :]


def _views(c: Component, weight: torch.Tensor) -> list[torch.Tensor]:
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


def _source_weight(c: Component) -> torch.Tensor:
    """The weight the projection is computed from; quantized layers are dequantised first."""
    if c.quantized:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(c.module).detach()
    return c.weight.detach()


ROUTES = ("auto", "lora", "direct")


def direct_route(route: str, layout: ModelLayout, device: torch.device) -> bool:
    """Whether a study edits weights in place (True) or through LoRA adapters (False).

    ``auto`` edits in place on the CPU when no layer is quantized: there PEFT's extra LoRA matmuls
    made each trial of the demo study slower at identical scores (benchmarks/README.md, "Figures
    from the code"), while an in-place edit costs one rank-1 update per weight and a copy back on reset, and
    the backups hold one extra copy of the edited weights in RAM. On accelerators LoRA stays the
    default until that trade is measured there. Quantized layers always take LoRA.
    """
    if route not in ROUTES:
        raise ConfigError(f"ablation.route must be one of {ROUTES}, got {route!r}")
    quantized = any(c.quantized for c in layout.components)
    if route == "direct" and quantized:
        raise ConfigError("ablation.route is direct but the model is quantized: set ablation.route to lora or auto")
    direct = route == "direct" or (route == "auto" and not quantized and device.type == "cpu")
    log.info(
        "ablation route: %s (ablation.route=%s, %s, %s)",
        "direct weight edits" if direct else "LoRA adapters",
        route,
        device.type,
        "quantized" if quantized else "not quantized",
    )
    return direct


class Ablator:
    """Applies ``AblationParams`` to a model, trial after trial, without reloading it."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        directions: torch.Tensor,
        row_norm: RowNorm | str = RowNorm.NONE,
        full_rank: int = 3,
        seed: int = 0,
        force_direct: bool = False,
        backup_device: str | torch.device | None = "cpu",
        batched: bool = True,
    ) -> None:
        """``backup_device``: where direct-edit backups live ("cpu" saves accelerator memory; None keeps
        each backup on its weight's device, faster resets). ``batched``: stack the weights of each
        component kind and edit all its layers at once (:mod:`abliterate.batched_ablation`); False
        keeps the per-component loop, the reference the batched maths is tested against."""
        expected = (layout.n_layers + 1, layout.hidden_size)
        if directions.ndim != 2 or tuple(directions.shape) != expected:
            raise ConfigError(
                f"directions have shape {tuple(directions.shape)}, expected {expected} (n_layers + 1, hidden) "
                f"for {layout.model_class}; were they computed for another model?"
            )
        if not directions.is_floating_point():
            raise ConfigError(f"directions must be floating point, got {directions.dtype}")
        self.row_norm = RowNorm(row_norm)
        if full_rank < 1:
            raise ConfigError(f"full_rank must be >= 1, got {full_rank}")
        self.layout = layout
        # The projection math is defined in float32; a float16/float64 table is converted once here.
        self.directions = directions.detach().to(torch.float32)
        # one host sync here instead of one per edited layer and trial (`not >` also catches NaN)
        ok = (torch.linalg.vector_norm(self.directions[1:], dim=1) > 0).cpu().tolist()
        self._broken_layers = {layer for layer, good in enumerate(ok) if not good}
        self.full_rank = full_rank
        self.seed = seed
        self.backup_device = None if backup_device is None else torch.device(backup_device)
        self.base = unwrap(model)
        self.rank = full_rank if self.row_norm == RowNorm.FULL else 1
        self.lora_components = [c for c in layout.components if c.lora and not force_direct]
        self.direct_components = [c for c in layout.components if not (c.lora and not force_direct)]
        self._backups: dict[Component, torch.Tensor] = {}
        self._dirty: set[Component] = set()
        self._factors: dict[Component, tuple[torch.Tensor, torch.Tensor]] = {}
        self._params: AblationParams | None = None
        self._peft = None
        self._adapter = ADAPTER
        self._lora_layers: dict[Component, nn.Module] = {}
        if self.lora_components:
            self._wrap(model)
        quantized = [c.name for c in self.direct_components if c.quantized]
        if quantized:
            raise UnsupportedArchitectureError(
                f"quantized layers cannot be edited in place: {quantized[:3]}; use the LoRA route (force_direct=False)"
            )
        # every LoRA B factor, looked up once: PEFT's module lookups cost more than zeroing them
        self._lora_bs = [self._lora_weights(c)[0] for c in self._lora_layers]
        self._groups: list[batched_ablation.WeightGroup] = []
        self._grouped: set[Component] = set()
        self._table: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if batched:
            self._stack()

    def _stack(self) -> None:
        self._groups = batched_ablation.stack_groups(self.layout.components, set(self._lora_layers))
        for group in self._groups:
            self._grouped.update(group.components)
            if self.row_norm != RowNorm.NONE:
                group.norms = batched_ablation.row_norms(group)
            if group.lora:
                out, inp = group.weights.shape[1:]
                k = min(self.rank, out, inp)
                for c in group.components:
                    lora_b, lora_a = self._lora_weights(c)
                    group.lora_b.append(lora_b[:, :k])
                    group.lora_a.append(lora_a[:k])
        log.info(
            "batched edits: %d of %d components in %d stacked groups (row_norm=%s)",
            len(self._grouped), len(self.layout.components), len(self._groups), self.row_norm.value,
        )

    # -- LoRA route -------------------------------------------------------------------------------

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,  # scaling = alpha / r = 1: the factors are the edit itself
            lora_dropout=0.0,
            bias="none",
            target_modules=[c.name for c in self.lora_components],
            fan_in_fan_out=any(c.layout == "conv1d" for c in self.lora_components),
            init_lora_weights=True,  # B = 0: the adapter starts as the identity
        )

    def _peft_would_retarget(self, config) -> set[str]:
        """Target names PEFT would silently rewrite for this model type.

        On transformers v5, PEFT maps v4 MoE projection names (e.g. any ``*.down_proj`` of a Qwen-MoE
        model, including dense layers and shared experts) to ``target_parameters`` of every fused expert
        tensor. Probing a copy of the config tells which of our exact targets would be lost that way.
        """
        try:
            from peft.utils.transformers_weight_conversion import (
                convert_peft_config_for_transformers,
                get_model_conversion_mapping,
            )
        except ImportError:  # older PEFT: no conversion, nothing rewritten
            return set()
        probe = copy.deepcopy(config)
        convert_peft_config_for_transformers(
            probe, model=self.base, conversions=get_model_conversion_mapping(self.base)
        )
        return set(config.target_modules) - set(probe.target_modules or [])

    def _wrap(self, model: nn.Module) -> None:
        from peft import PeftModel, get_peft_model
        from peft.tuners.lora import LoraLayer

        config = self._lora_config()
        retargeted = self._peft_would_retarget(config)
        if retargeted:
            log.info(
                "%d modules go the direct route because PEFT would re-target them: %s",
                len(retargeted),
                sorted(retargeted)[:4],
            )
            self.direct_components += [c for c in self.lora_components if c.name in retargeted]
            self.lora_components = [c for c in self.lora_components if c.name not in retargeted]
            if not self.lora_components:
                return
            config = self._lora_config()
            if self._peft_would_retarget(config):
                raise UnsupportedArchitectureError(
                    f"{self.layout.model_class}: PEFT re-targets the LoRA modules"
                )
        if isinstance(model, PeftModel):
            self._adapter = "abliterate"
            log.warning(
                "model already is a PeftModel: adding adapter %r and making it the only active one",
                self._adapter,
            )
            model.add_adapter(self._adapter, config)
            model.set_adapter(self._adapter)
            self._peft = model
        else:
            # get_peft_model edits the model in place, so the caller's `model(...)` and `generate` see the adapter too.
            self._peft = get_peft_model(self.base, config, adapter_name=self._adapter)
        for c in self.lora_components:
            layer = self.base.get_submodule(c.name)
            if not isinstance(layer, LoraLayer) or self._adapter not in layer.lora_A:
                raise UnsupportedArchitectureError(
                    f"PEFT did not wrap {c.name} ({type(layer).__name__}) with LoRA"
                )
            scaling = layer.scaling[self._adapter]
            if scaling != 1:
                raise NumericalError(f"{c.name}: LoRA scaling is {scaling}, expected 1")
            self._lora_layers[c] = layer

    def _lora_weights(self, c: Component) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._lora_layers[c]
        return layer.lora_B[self._adapter].weight, layer.lora_A[self._adapter].weight

    def _set_lora(self, c: Component, b: torch.Tensor, a: torch.Tensor) -> None:
        lora_b, lora_a = self._lora_weights(c)
        k = b.shape[1]
        lora_b[:, :k].copy_(b)  # copy_ moves to the adapter's device and dtype in one step
        lora_a[:k].copy_(a)
        # FULL on a matrix thinner than full_rank: the unused factors stay inert
        if k < lora_b.shape[1]:
            lora_b[:, k:].zero_()

    # -- direct route -----------------------------------------------------------------------------
    def _restore(self, c: Component) -> None:
        c.weight.detach().copy_(self._backups[c])
        self._dirty.discard(c)

    def _edit_direct(self, c: Component, b: torch.Tensor, a: torch.Tensor) -> None:
        weight = c.weight.detach()
        if c not in self._backups:
            self._backups[c] = weight.to(self.backup_device or weight.device, copy=True)
        self._dirty.add(c)
        dtype = weight.dtype
        views = _views(c, weight)
        if c.layout != "experts":
            b, a = b[None], a[None]
        b, a = b.to(dtype), a.to(dtype)  # the single cast of the factors to the weight's dtype
        for e, view in enumerate(views):
            if b.shape[-1] == 1:
                view.addr_(b[e, :, 0], a[e, 0])
            else:
                view.addmm_(b[e], a[e])

    # -- both routes ------------------------------------------------------------------------------
    def _factors_for(
        self, c: Component, r: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A): (out, k), (k, in); for fused experts (E, out, k), (E, k, in)."""
        pairs = [
            delta_factors(view, r, weight, self.row_norm, self.full_rank, self.seed)
            for view in _views(c, _source_weight(c))
        ]
        if c.layout != "experts":
            return pairs[0]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _trial_directions(self, device: torch.device, direction_index: float | None,
                          edited_layers, cache: dict) -> torch.Tensor:
        """(n_layers, hidden) float32 unit directions of this trial, one per decoder layer, on ``device``;
        ``cache`` holds them for the rest of the trial.

        Per-layer directions are the same every trial, so they are normalised once per device, with no
        host sync per layer; a layer without a direction (zero or NaN, as the directions rule writes
        where the means coincide) is an error only when the trial edits it."""
        if direction_index is None:
            broken = sorted(self._broken_layers.intersection(edited_layers))
            if broken:
                raise NumericalError(
                    f"no direction for layer(s) {broken} (zero or NaN norm in the direction table), "
                    "and the trial edits them with per-layer directions"
                )
        if device not in cache:
            if device not in self._table:
                table = self.directions.to(device)
                norms = torch.linalg.vector_norm(table[1:], dim=1, keepdim=True)
                good = norms > 0  # False for NaN too
                # a broken layer's row is zero, not NaN: no trial edits it, and a zero weight times
                # NaN would still be NaN
                unit = torch.where(good, table[1:] / torch.where(good, norms, torch.ones_like(norms)), 0.0)
                self._table[device] = (table, unit)
            table, per_layer = self._table[device]
            cache[device] = (
                per_layer if direction_index is None
                else direction_for(table, direction_index).expand(self.layout.n_layers, -1)
            )
        return cache[device]

    def _group_factors(self, group, directions: torch.Tensor, lam: torch.Tensor, lo: int,
                       hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched (B, A) for rows lo..hi-1 of a group from their unit directions and weights."""
        return batched_ablation.batched_factors(
            group.weights[lo:hi], directions, lam, self.row_norm.value,
            norms=None if group.norms is None else group.norms[lo:hi], rank=self.full_rank, seed=self.seed,
            oversampling=FULL_OVERSAMPLING, niter=FULL_NITER,
            split=batched_ablation.split_products_supported(group.stored.device.type, group.stored.dtype),
        )

    def _apply_group(self, group, weights: list[float], direction_index: float | None, directions: dict) -> int:
        """One group's edit from its per-layer weights; returns the number of components edited."""
        group.check_views()
        active = [i for i, w in enumerate(weights) if w != 0.0]
        if not active:
            if group.lora:
                torch._foreach_zero_(group.lora_b)
            return 0
        lo, hi = active[0], active[-1] + 1  # a kernel's support is contiguous in layers
        device = group.stored.device
        table = self._trial_directions(device, direction_index, [group.components[i].layer for i in active],
                                       directions)
        b, a = self._group_factors(group, table[group.layer_index(lo, hi)], devices.host_to(weights[lo:hi], device),
                                   lo, hi)
        bs, as_ = b.unbind(0), a.unbind(0)  # all views in one call: per-row indexing cost more than the maths
        if group.lora:
            torch._foreach_copy_(group.lora_b[lo:hi], bs)
            torch._foreach_copy_(group.lora_a[lo:hi], as_)
            outside = group.lora_b[:lo] + group.lora_b[hi:]
            if outside:
                torch._foreach_zero_(outside)
        else:
            group.edit(lo, b, a, self.backup_device)
            if group.components[0] not in self._backups:  # the stacked backup was just taken
                self._backups.update(zip(group.components, group.backup.unbind(0)))
        for i in active:
            self._factors[group.components[i]] = (bs[i - lo], as_[i - lo])
        return len(active)

    def apply(self, params: AblationParams) -> None:
        """Set the model to base weights + the edit described by ``params`` (previous edits are replaced)."""
        start = time.perf_counter()
        directions: dict[torch.device, torch.Tensor] = {}
        edited = lora = 0
        with torch.no_grad():
            for c in list(self._dirty):
                self._restore(c)
            for group in self._groups:
                group.restore()
            self._factors.clear()
            for group in self._groups:
                kernel = params.kernels.get(group.components[0].kind)
                weights = [kernel.weight_at(c.layer) if kernel is not None else 0.0 for c in group.components]
                n = self._apply_group(group, weights, params.direction_index, directions)
                edited += n
                lora += n if group.lora else 0
            for c in self.layout.components:
                if c in self._grouped:
                    continue
                kernel = params.kernels.get(c.kind)
                weight = kernel.weight_at(c.layer) if kernel is not None else 0.0
                if weight == 0.0:
                    if c in self._lora_layers:
                        self._lora_weights(c)[0].zero_()
                    continue
                table = self._trial_directions(c.weight.device, params.direction_index, [c.layer], directions)
                b, a = self._factors_for(c, table[c.layer], weight)
                if c in self._lora_layers:
                    self._set_lora(c, b, a)
                    lora += 1
                else:
                    self._edit_direct(c, b, a)
                self._factors[c] = (b, a)
                edited += 1
        self._params = params
        log.info(
            "ablation applied to %d of %d components (%d LoRA, %d direct, row_norm=%s) in %.3f s",
            edited,
            len(self.layout.components),
            lora,
            edited - lora,
            self.row_norm.value,
            time.perf_counter() - start,
        )

    def reset(self) -> None:
        """Back to the base model: LoRA B factors zeroed, direct edits restored bit for bit from backups."""
        with torch.no_grad():
            if self._lora_bs:
                torch._foreach_zero_(self._lora_bs)
            for c in list(self._dirty):
                self._restore(c)
            for group in self._groups:
                group.restore()
        self._factors.clear()
        self._params = None

    @property
    def first_edited_layer(self) -> int:
        """The lowest layer whose weights the current edit changes (``n_layers`` when none is edited).

        Layers below it compute what the unedited model computes (:mod:`abliterate.leading_layers`).
        """
        return min((c.layer for c in self._factors), default=self.layout.n_layers)

    def effective_weight(self, component: Component) -> torch.Tensor:
        """The float32 (out, in) weight the model now computes with ((E, out, in) for fused experts)."""
        with torch.no_grad():
            views = [v.float() for v in _views(component, _source_weight(component))]
            w = torch.stack(views) if component.layout == "experts" else views[0].clone()
            if component in self._lora_layers:
                layer = self._lora_layers[component]
                lora_b, lora_a = self._lora_weights(component)
                w = (
                    w
                    + (lora_b.float() @ lora_a.float()).to(w.device) * layer.scaling[self._adapter]
                )
        return w

    # -- access and export ------------------------------------------------------------------------
    @property
    def peft_model(self):
        """The PeftModel holding the adapter, or None when every component is edited directly."""
        return self._peft

    @property
    def model(self) -> nn.Module:
        """What to call for logits and ``generate``: the PeftModel, else the (edited) model itself."""
        return self._peft if self._peft is not None else self.base

    @property
    def params(self) -> AblationParams | None:
        return self._params

    def save_adapter(self, path: str | Path) -> None:
        """Write the current edit as a folder: a standard PEFT adapter (when any LoRA component exists)
        plus ``direct_edits.safetensors`` with the (B, A) factors of directly edited components
        (``<key>.lora_B``, ``<key>.lora_A``; W′ = W + B A on the (out, in) view, per expert for fused
        experts) and the metadata needed to apply them again."""
        with io.atomic_dir(path) as tmp:
            if self._peft is not None:
                self._peft.save_pretrained(str(tmp), selected_adapters=[self._adapter])
                sub = tmp / self._adapter
                if self._adapter != "default" and sub.is_dir():  # PEFT nests non-default adapters
                    for item in sub.iterdir():
                        shutil.move(str(item), tmp / item.name)
                    sub.rmdir()
            tensors: dict[str, torch.Tensor] = {}
            entries = []
            for c, (b, a) in self._factors.items():
                if c in self._lora_layers:
                    continue
                tensors[f"{c.key}.lora_B"] = b
                tensors[f"{c.key}.lora_A"] = a
                entries.append(
                    {
                        "key": c.key,
                        "name": c.name,
                        "param": c.param,
                        "layer": c.layer,
                        "kind": c.kind,
                        "layout": c.layout,
                        "expert_axis_order": c.expert_axis_order,
                    }
                )
            metadata = {
                "model_class": self.layout.model_class,
                "params": self._params.to_flat() if self._params is not None else None,
                "row_norm": self.row_norm.value,
                "full_rank": self.full_rank,
                "seed": self.seed,
                "convention": "W' = W + B @ A on the (out, in) view; fused experts: per expert index",
                "direct_edits": entries,
                "lora_targets": [c.name for c in self.lora_components],
            }
            io.save_safetensors(tensors, tmp / DIRECT_EDITS_FILE, metadata=metadata)
        log.info("adapter saved to %s (%d direct edits)", path, len(entries))


def load_saved_adapter(model: nn.Module, folder: str | Path, merge: bool = False) -> nn.Module:
    """``model`` with a folder written by :meth:`Ablator.save_adapter`: its LoRA part through PEFT
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
    """Add the direct edits saved by :meth:`Ablator.save_adapter` to ``model`` (W += B A per view).

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
            component = Component(
                layer=entry["layer"], kind=entry["kind"], name=entry["name"],
                module=base.get_submodule(entry["name"]), param=entry["param"], layout=entry["layout"],
                expert_axis_order=entry.get("expert_axis_order"),
            )
            weight = component.module.get_parameter(component.param)
            b = tensors[f"{entry['key']}.lora_B"].to(weight.device)
            a = tensors[f"{entry['key']}.lora_A"].to(weight.device)
            views = _views(component, weight)
            for e, view in enumerate(views):
                be, ae = (b[e], a[e]) if component.layout == "experts" else (b, a)
                view.add_(torch.matmul(be, ae).to(view.dtype))
    log.info("applied %d saved direct edits from %s", len(entries), path)
    return len(entries)
