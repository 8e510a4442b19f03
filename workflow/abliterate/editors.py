"""The trial engine's editor: applies a trial's :class:`~abliterate.ablation.AblationParams` to a loaded
model and takes it back, trial after trial, without reloading the model.

Two implementations behind one :class:`Editor` seam, chosen once by :func:`make_editor`:

* :class:`InPlaceEditor` edits the weights themselves; each weight is backed up at its first edit, so
  :meth:`~InPlaceEditor.reset` restores it bit for bit. The default on the CPU, where PEFT's extra
  LoRA matmuls cost more than an in-place rank-1 update (benchmarks/README.md, "Figures from the code").
* :class:`LoraEditor` writes the factors of each edit into a PEFT LoRA adapter (``lora_alpha == r``,
  so the scaling is 1; dropout 0, no bias) and zeroes them on reset; modules LoRA cannot wrap (fused
  experts, modules PEFT would re-target) are still edited in place. The default on accelerators and
  the only route for quantized layers; the export always saves through it, since its adapter folder
  is what users and the merge load.

Both edit the weights of one component kind together when they stack (one same-shaped matrix per
layer, :mod:`abliterate.batched_ablation`); the per-component loop over
:func:`~abliterate.ablation.delta_factors` remains for what does not stack (fused experts, quantized
or tied weights) and, with ``batched=False``, as the reference the tests compare the batches with.

Adapter dtype: ``get_peft_model`` runs with ``autocast_adapter_dtype=True`` (PEFT's default), so for
float16/bfloat16 bases the LoRA factors stay float32 (PEFT casts the layer input to the adapter dtype
and the result back), and the factors are stored without a second rounding. Quantized bitsandbytes
layers' ``rᵀW`` and row norms come from PEFT's dequantisation (:func:`abliterate.hf_compat.dequantized_weight`); that
path needs CUDA and is not covered by the CPU tests.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import batched_ablation, devices, hf_compat, io
from .ablation import (
    ADAPTER,
    DIRECT_EDITS_FILE,
    FULL_NITER,
    FULL_OVERSAMPLING,
    AblationParams,
    RowNorm,
    delta_factors,
    direction_for,
    directions_for,
    source_weight,
    views,
)
from .architecture import Component, ModelLayout, unwrap
from .errors import ConfigError, NumericalError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

ROUTES = ("auto", "lora", "direct")


class Editor(Protocol):
    """What a trial needs of an edit: apply it, take it back, know where it starts, save it."""

    layout: ModelLayout

    @property
    def model(self) -> nn.Module:
        """What to call for logits and generation: the edited model."""

    @property
    def first_edited_layer(self) -> int:
        """The lowest layer the current edit changes (``n_layers`` when none)."""

    def apply(self, params: AblationParams) -> None: ...

    def reset(self) -> None: ...

    def save(self, path: str | Path) -> None: ...


def direct_route(route: str, layout: ModelLayout, device: torch.device) -> bool:
    """Whether ``ablation.route`` resolves to in-place edits (True) or LoRA adapters (False).

    ``auto`` edits in place on the CPU when no layer is quantized (see the module docstring; the backups
    hold one extra copy of the edited weights in RAM); on accelerators LoRA stays the default until
    that trade is measured there. Quantized layers always take LoRA.
    """
    if route not in ROUTES:
        raise ConfigError(f"ablation.route must be one of {ROUTES}, got {route!r}")
    quantized = any(c.quantized for c in layout.components)
    if route == "direct" and quantized:
        raise ConfigError("ablation.route is direct but the model is quantized: set ablation.route to lora or auto")
    direct = route == "direct" or (route == "auto" and not quantized and device.type == "cpu")
    log.info("ablation route: %s (ablation.route=%s, %s, %s)", "direct weight edits" if direct else "LoRA adapters",
             route, device.type, "quantized" if quantized else "not quantized")
    return direct


def make_editor(model: nn.Module, layout: ModelLayout, directions: torch.Tensor, route: str = "auto",
                **options) -> Editor:
    """The editor ``route`` (``ablation.route``) resolves to for this model; ``options`` go to its
    constructor. The only place that chooses: nothing downstream asks which editor it has."""
    device = next(model.parameters()).device
    editor = InPlaceEditor if direct_route(route, layout, device) else LoraEditor
    return editor(model, layout, directions, **options)


class InPlaceEditor:
    """Edits every component's weights in place; reset restores them from backups bit for bit."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        directions: torch.Tensor,
        row_norm: RowNorm | str = RowNorm.NONE,
        full_rank: int = 3,
        seed: int = 0,
        backup_device: str | torch.device | None = "cpu",
        batched: bool = True,
        direction_sets: torch.Tensor | None = None,
        n_directions: int = 1,
    ) -> None:
        """``directions``: the directions rule's (n_layers + 1, hidden) table. ``backup_device``: where
        backups live ("cpu" saves accelerator memory; None keeps each on its weight's device, faster
        resets). ``batched``: stack the weights of each component kind and edit all its layers at
        once; False keeps the per-component loop, the reference the batched maths is tested against.
        ``n_directions``: the most directions a trial may ablate (the LoRA rank covers it), taken
        from ``direction_sets``, the rule's (n_layers + 1, K ≥ n_directions, hidden) sets."""
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
        self.n_directions = int(n_directions)
        self.sets = None
        if self.n_directions > 1:
            if direction_sets is None or direction_sets.ndim != 3 or direction_sets.shape[1] < self.n_directions \
                    or (direction_sets.shape[0], direction_sets.shape[2]) != expected:
                got = None if direction_sets is None else tuple(direction_sets.shape)
                raise ConfigError(f"{self.n_directions} directions per layer need direction sets of shape "
                                  f"({expected[0]}, >= {self.n_directions}, {expected[1]}), got {got}; rerun the "
                                  "directions rule with directions.n_directions >= study.space.n_directions")
            self.sets = direction_sets[:, :self.n_directions].detach().to(torch.float32)
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
        # FULL: the k directions' rank plus the row rescaling's (abliterate.ablation's docstring)
        self.rank = (full_rank + self.n_directions - 1 if self.row_norm == RowNorm.FULL else self.n_directions)
        self.direct_components = list(layout.components)
        self._lora_layers: dict[Component, nn.Module] = {}
        self._attach(model)
        quantized = [c.name for c in self.direct_components if c.quantized]
        if quantized:
            raise UnsupportedArchitectureError(
                f"quantized layers cannot be edited in place: {quantized[:3]}; set ablation.route to lora or auto"
            )
        self._backups: dict[Component, torch.Tensor] = {}
        self._dirty: set[Component] = set()
        self._factors: dict[Component, tuple[torch.Tensor, torch.Tensor]] = {}
        self._params: AblationParams | None = None
        self._groups: list[batched_ablation.WeightGroup] = []
        self._grouped: set[Component] = set()
        self._table: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._set_table: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if batched:
            self._stack()

    def _attach(self, model: nn.Module) -> None:
        """Hook for editors that wrap the model before its weights are stacked."""

    def _stack(self) -> None:
        self._groups = batched_ablation.stack_groups(self.layout.components, set(self._lora_layers))
        for group in self._groups:
            self._grouped.update(group.components)
            if self.row_norm != RowNorm.NONE:
                group.norms = batched_ablation.row_norms(group)
        log.info(
            "batched edits: %d of %d components in %d stacked groups (row_norm=%s)",
            len(self._grouped), len(self.layout.components), len(self._groups), self.row_norm.value,
        )

    # -- writing one edit -------------------------------------------------------------------------
    def _restore(self, c: Component) -> None:
        c.weight.detach().copy_(self._backups[c])
        self._dirty.discard(c)

    def _write(self, c: Component, b: torch.Tensor, a: torch.Tensor) -> None:
        """``W += B A`` on each (out, in) view of ``c``'s weight, backed up at its first edit."""
        weight = c.weight.detach()
        if c not in self._backups:
            self._backups[c] = weight.to(self.backup_device or weight.device, copy=True)
        self._dirty.add(c)
        if c.layout != "experts":
            b, a = b[None], a[None]
        b, a = b.to(weight.dtype), a.to(weight.dtype)  # the single cast of the factors to the weight's dtype
        for e, view in enumerate(views(c, weight)):
            if b.shape[-1] == 1:
                view.addr_(b[e, :, 0], a[e, 0])
            else:
                view.addmm_(b[e], a[e])

    def _clear(self, c: Component) -> None:
        """Leave ``c`` unedited this trial (in-place edits were already restored)."""

    def _write_group(self, group, lo: int, hi: int, b: torch.Tensor, a: torch.Tensor) -> None:
        """Rows lo..hi-1 of a stacked group get the factors (L, out, k), (L, k, in); the others none."""
        group.edit(lo, b, a, self.backup_device)
        if group.components[0] not in self._backups:  # the stacked backup was just taken
            self._backups.update(zip(group.components, group.backup.unbind(0)))

    def _clear_group(self, group) -> None:
        """Leave a whole group unedited this trial (its in-place edits were already restored)."""

    # -- the trial's factors ----------------------------------------------------------------------
    def _factors_for(self, c: Component, r: torch.Tensor, weight) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A): (out, k), (k, in); for fused experts (E, out, k), (E, k, in). Several directions:
        ``r`` (m, hidden) and ``weight`` their m weights."""
        if r.ndim == 2:
            weight = devices.host_to(weight, r.device)
        pairs = [
            delta_factors(view, r, weight, self.row_norm, self.full_rank, self.seed)
            for view in views(c, source_weight(c))
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

    def _trial_sets(self, device: torch.device, params: AblationParams, edited_layers, cache: dict) -> torch.Tensor:
        """(n_layers, k, hidden) float32 orthonormal directions of a trial with k = ``params.n_directions`` > 1,
        on ``device`` (as :meth:`_trial_directions`; the rows after the first are stored unit or zero)."""
        self._trial_directions(device, params.direction_index, edited_layers, cache)  # row 0's checks
        key = ("sets", device)
        if key not in cache:
            if device not in self._set_table:
                sets = self.sets.to(device)
                per_layer = sets[1:].clone()
                per_layer[:, 0] = self._table[device][1]
                self._set_table[device] = (sets, per_layer)
            sets, per_layer = self._set_table[device]
            k = params.n_directions
            cache[key] = (
                per_layer[:, :k] if params.direction_index is None
                else directions_for(sets, params.direction_index, k).expand(self.layout.n_layers, -1, -1)
            )
        return cache[key]

    def _apply_group(self, group, weights: list[float], params: AblationParams, directions: dict) -> int:
        """One group's edit from its per-layer weights; returns the number of components edited."""
        group.check_views()
        active = [i for i, w in enumerate(weights) if w != 0.0]
        if not active:
            self._clear_group(group)
            return 0
        lo, hi = active[0], active[-1] + 1  # a kernel's support is contiguous in layers
        device = group.stored.device
        layers = [group.components[i].layer for i in active]
        if params.n_directions == 1:
            table = self._trial_directions(device, params.direction_index, layers, directions)
            lam = devices.host_to(weights[lo:hi], device)
        else:
            table = self._trial_sets(device, params, layers, directions)
            lam = devices.host_to([params.direction_weights(w) for w in weights[lo:hi]], device)
        b, a = batched_ablation.batched_factors(
            group.weights[lo:hi], table[group.layer_index(lo, hi)], lam,
            self.row_norm.value, norms=None if group.norms is None else group.norms[lo:hi], rank=self.full_rank,
            seed=self.seed, oversampling=FULL_OVERSAMPLING, niter=FULL_NITER,
            split=batched_ablation.split_products_supported(device.type, group.stored.dtype),
        )
        self._write_group(group, lo, hi, b, a)
        bs, as_ = b.unbind(0), a.unbind(0)
        for i in active:
            self._factors[group.components[i]] = (bs[i - lo], as_[i - lo])
        return len(active)

    def apply(self, params: AblationParams) -> None:
        """Set the model to base weights + the edit described by ``params`` (previous edits are replaced)."""
        start = time.perf_counter()
        if params.n_directions > max(self.n_directions, 1):
            raise ConfigError(f"the trial ablates {params.n_directions} directions per layer, the editor was built for "
                              f"at most {self.n_directions} (study.space.n_directions)")
        directions: dict[torch.device, torch.Tensor] = {}
        edited = 0
        with torch.no_grad():
            self._undo()
            for group in self._groups:
                kernel = params.kernels.get(group.components[0].kind)
                weights = [kernel.weight_at(c.layer) if kernel is not None else 0.0 for c in group.components]
                edited += self._apply_group(group, weights, params, directions)
            for c in self.layout.components:
                if c in self._grouped:
                    continue
                kernel = params.kernels.get(c.kind)
                weight = kernel.weight_at(c.layer) if kernel is not None else 0.0
                if weight == 0.0:
                    self._clear(c)
                    continue
                if params.n_directions == 1:
                    table = self._trial_directions(c.weight.device, params.direction_index, [c.layer], directions)
                    b, a = self._factors_for(c, table[c.layer], weight)
                else:
                    table = self._trial_sets(c.weight.device, params, [c.layer], directions)
                    b, a = self._factors_for(c, table[c.layer], params.direction_weights(weight))
                self._write(c, b, a)
                self._factors[c] = (b, a)
                edited += 1
        self._params = params
        lora = sum(c in self._lora_layers for c in self._factors)
        log.info("ablation applied to %d of %d components (%d LoRA, %d direct, row_norm=%s) in %.3f s", edited,
                 len(self.layout.components), lora, edited - lora, self.row_norm.value, time.perf_counter() - start)

    def _undo(self) -> None:
        for c in list(self._dirty):
            self._restore(c)
        for group in self._groups:
            group.restore()
        self._factors.clear()

    def reset(self) -> None:
        """Back to the base model, bit for bit."""
        with torch.no_grad():
            self._undo()
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
            found = [v.float() for v in views(component, source_weight(component))]
            return torch.stack(found) if component.layout == "experts" else found[0].clone()

    @property
    def model(self) -> nn.Module:
        return self.base

    # -- saving -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the current edit as a folder: ``direct_edits.safetensors`` with the (B, A) factors of
        the components edited in place (``<key>.lora_B``, ``<key>.lora_A``; W′ = W + B A on the
        (out, in) view, per expert for fused experts) and the metadata needed to apply them again
        (:func:`abliterate.ablation.apply_saved_direct_edits`), beside any adapter of the editor's own."""
        with io.atomic_dir(path) as tmp:
            self._save_adapter(tmp)
            tensors: dict[str, torch.Tensor] = {}
            entries = []
            for c, (b, a) in self._factors.items():
                if c in self._lora_layers:
                    continue
                tensors[f"{c.key}.lora_B"] = b
                tensors[f"{c.key}.lora_A"] = a
                entries.append({"key": c.key, "name": c.name, "param": c.param, "layer": c.layer, "kind": c.kind,
                                "layout": c.layout, "expert_axis_order": c.expert_axis_order})
            metadata = {
                "model_class": self.layout.model_class,
                "params": self._params.to_flat() if self._params is not None else None,
                "row_norm": self.row_norm.value,
                "full_rank": self.full_rank,
                "n_directions": self.n_directions,
                "seed": self.seed,
                "convention": "W' = W + B @ A on the (out, in) view; fused experts: per expert index",
                "direct_edits": entries,
                "lora_targets": [c.name for c in self._lora_layers],
            }
            io.save_safetensors(tensors, tmp / DIRECT_EDITS_FILE, metadata=metadata)
        log.info("edit saved to %s (%d direct edits)", path, len(entries))

    def _save_adapter(self, folder: Path) -> None:
        """Hook for editors that keep part of the edit in an adapter."""


class LoraEditor(InPlaceEditor):
    """Writes each edit into a PEFT LoRA adapter's factors; modules LoRA cannot wrap are edited in place."""

    _peft = None
    _adapter = ADAPTER

    def _attach(self, model: nn.Module) -> None:
        self.lora_components = [c for c in self.layout.components if c.lora]
        self.direct_components = [c for c in self.layout.components if not c.lora]
        if self.lora_components:
            self._wrap(model)
        # every LoRA B factor, looked up once: PEFT's module lookups cost more than zeroing them
        self._lora_bs = [self._lora_weights(c)[0] for c in self._lora_layers]

    def _stack(self) -> None:
        super()._stack()
        for group in self._groups:
            if group.lora:
                out, inp = group.weights.shape[1:]
                k = min(self.rank, out, inp)
                for c in group.components:
                    lora_b, lora_a = self._lora_weights(c)
                    group.lora_b.append(lora_b[:, :k])
                    group.lora_a.append(lora_a[:k])

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

    def _wrap(self, model: nn.Module) -> None:
        from peft import PeftModel, get_peft_model
        from peft.tuners.lora import LoraLayer

        config = self._lora_config()
        retargeted = hf_compat.peft_retargeted(config, self.base)
        if retargeted:
            log.info("%d modules go the direct route because PEFT would re-target them: %s", len(retargeted),
                     sorted(retargeted)[:4])
            self.direct_components += [c for c in self.lora_components if c.name in retargeted]
            self.lora_components = [c for c in self.lora_components if c.name not in retargeted]
            if not self.lora_components:
                return
            config = self._lora_config()
            if hf_compat.peft_retargeted(config, self.base):
                raise UnsupportedArchitectureError(f"{self.layout.model_class}: PEFT re-targets the LoRA modules")
        if isinstance(model, PeftModel):
            self._adapter = "abliterate"
            log.warning("model already is a PeftModel: adding adapter %r and making it the only active one",
                        self._adapter)
            model.add_adapter(self._adapter, config)
            model.set_adapter(self._adapter)
            self._peft = model
        else:
            # get_peft_model edits the model in place, so the caller's `model(...)` and `generate` see the adapter too.
            self._peft = get_peft_model(self.base, config, adapter_name=self._adapter)
        for c in self.lora_components:
            layer = self.base.get_submodule(c.name)
            if not isinstance(layer, LoraLayer) or self._adapter not in layer.lora_A:
                raise UnsupportedArchitectureError(f"PEFT did not wrap {c.name} ({type(layer).__name__}) with LoRA")
            scaling = layer.scaling[self._adapter]
            if scaling != 1:
                raise NumericalError(f"{c.name}: LoRA scaling is {scaling}, expected 1")
            self._lora_layers[c] = layer

    def _lora_weights(self, c: Component) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._lora_layers[c]
        return layer.lora_B[self._adapter].weight, layer.lora_A[self._adapter].weight

    def _write(self, c: Component, b: torch.Tensor, a: torch.Tensor) -> None:
        if c not in self._lora_layers:
            return super()._write(c, b, a)
        lora_b, lora_a = self._lora_weights(c)
        k = b.shape[1]
        lora_b[:, :k].copy_(b)  # copy_ moves to the adapter's device and dtype in one step
        lora_a[:k].copy_(a)
        # FULL on a matrix thinner than full_rank: the unused factors stay inert
        if k < lora_b.shape[1]:
            lora_b[:, k:].zero_()

    def _clear(self, c: Component) -> None:
        if c in self._lora_layers:
            self._lora_weights(c)[0].zero_()

    def _write_group(self, group, lo: int, hi: int, b: torch.Tensor, a: torch.Tensor) -> None:
        if not group.lora:
            return super()._write_group(group, lo, hi, b, a)
        # all views in one call: per-row indexing cost more than the maths
        k = b.shape[-1]
        lora_b, lora_a = group.lora_b[lo:hi], group.lora_a[lo:hi]
        outside = group.lora_b[:lo] + group.lora_b[hi:]
        if k < lora_b[0].shape[1]:  # fewer directions than the adapter's rank: the other columns stay inert
            outside += [x[:, k:] for x in lora_b]
            lora_b, lora_a = [x[:, :k] for x in lora_b], [x[:k] for x in lora_a]
        torch._foreach_copy_(lora_b, b.unbind(0))
        torch._foreach_copy_(lora_a, a.unbind(0))
        if outside:
            torch._foreach_zero_(outside)

    def _clear_group(self, group) -> None:
        if group.lora:
            torch._foreach_zero_(group.lora_b)

    def reset(self) -> None:
        """Back to the base model: LoRA B factors zeroed, in-place edits restored bit for bit."""
        with torch.no_grad():
            if self._lora_bs:
                torch._foreach_zero_(self._lora_bs)
        super().reset()

    def effective_weight(self, component: Component) -> torch.Tensor:
        w = super().effective_weight(component)
        if component not in self._lora_layers:
            return w
        with torch.no_grad():
            lora_b, lora_a = self._lora_weights(component)
            scaling = self._lora_layers[component].scaling[self._adapter]
            return w + (lora_b.float() @ lora_a.float()).to(w.device) * scaling

    @property
    def peft_model(self):
        """The PeftModel holding the adapter, or None when no component could be wrapped."""
        return self._peft

    @property
    def model(self) -> nn.Module:
        return self._peft if self._peft is not None else self.base

    def _save_adapter(self, folder: Path) -> None:
        """A standard PEFT adapter of the wrapped components, loadable with ``PeftModel.from_pretrained``."""
        if self._peft is None:
            return
        self._peft.save_pretrained(str(folder), selected_adapters=[self._adapter])
        sub = folder / self._adapter
        if self._adapter != "default" and sub.is_dir():  # PEFT nests non-default adapters
            for item in sub.iterdir():
                shutil.move(str(item), folder / item.name)
            sub.rmdir()
