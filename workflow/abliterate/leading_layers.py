"""Prefills that skip the layers a trial leaves unedited.

A trial's ablation kernel is zero below some layer, so those layers compute, for the same prompts,
exactly what the unedited model computed. The KL prompts and the first generation batch are the
same in every trial: their prefill is recorded once on the unedited model (each layer's input and
the KV cache), and a trial runs only the layers from its first edited one, starting from the
recorded input of that layer. A study's first edited layer is seldom the first layer, so part of
that prefill work is skipped (how much on the demo: benchmarks/README.md, "Figures from the code").

Recordings are looked up by the batch's token ids, so a batch that was not recorded (a refill of
continuous batching, a changed prompt) is simply prefilled in full. Layer inputs are kept at every
``stride``-th layer so that all recordings fit in :data:`BUDGET_BYTES`; a trial then starts from the
nearest kept layer below its first edited one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from . import generation, hf_compat

log = logging.getLogger(__name__)

# Memory for all recordings (layer inputs and KV caches). On the demo (135M parameters, 50 KL
# prompts, a first generation batch of 32) they take about 0.2 GB.
BUDGET_BYTES = 1 << 30
# Relative difference allowed between a replayed and a full prefill of the unedited model.
TOLERANCE = 1e-4


@dataclass
class _Recording:
    plan: generation.PrefillPlan
    stride: int
    # k -> input of layer k * stride: (1, n_shared, hidden) and (rows, width, hidden)
    prefix_inputs: list[torch.Tensor | None]
    inputs: list[torch.Tensor]
    # per layer, the unedited keys and values: of the prefix (one row), of the whole batch (kept
    # only for generation, which decodes on from this cache)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    full_kv: list[tuple[torch.Tensor, torch.Tensor]] | None


def _key(enc: dict) -> tuple:
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LeadingLayers:
    """Recorded prefills of the unedited model, replayed from a trial's first edited layer.

    Call :meth:`record` while the model is unedited; afterwards ``prefill_from(first)`` is a drop-in
    for :func:`generation.prefill` that is exact as long as no layer below ``first`` was edited.
    """

    def __init__(self, model, budget_bytes: int | None = None):
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.n_layers = len(getattr(self.decoder, "layers", ()) or ())
        self.budget = budget_bytes if budget_bytes is not None else _default_budget(model)
        self.used = 0
        self.enabled = self._supported()
        self._recordings: dict[tuple, _Recording] = {}
        self._checked: set[bool] = set()  # keep_cache values whose replay was checked

    def _supported(self) -> bool:
        if self.decoder is None or not isinstance(getattr(self.decoder, "layers", None), torch.nn.ModuleList):
            log.info("prefills run every layer: %s has no decoder `layers` list", type(self.model).__name__)
            return False
        if hf_compat.new_cache(self.model) is None:
            # sliding-window or linear-attention caches keep state that cannot be assembled from parts
            log.info("prefills run every layer: this model's KV cache has special layers")
            return False
        return True

    def __len__(self) -> int:
        return len(self._recordings)

    # -- recording --------------------------------------------------------------------------------
    @torch.inference_mode()
    def record(self, enc: dict, keep_cache: bool) -> bool:
        """Record the unedited model's prefill of ``enc``; ``keep_cache`` for batches that are decoded on.

        Returns False (and records nothing) when reuse is off or the budget is spent.
        """
        key = _key(enc)
        if not self.enabled or key in self._recordings:
            return self.enabled
        plan = generation.plan_prefill(self.model, enc)
        captured: list[list[torch.Tensor]] = [[] for _ in range(self.n_layers + 1)]

        def hook(index):
            def capture(_module, args, kwargs):
                captured[index].append(args[0] if args else kwargs["hidden_states"])

            return capture

        modules = [*self.decoder.layers, self.decoder.norm]
        handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
        try:
            out, _, _ = generation.run_prefill(self.model, plan, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        cache = hf_compat.output_cache(out)
        n = plan.n_shared
        full_kv = hf_compat.layer_kv(cache)
        prefix_kv = [(k[:1, :, :n].clone(), v[:1, :, :n].clone()) for k, v in full_kv]
        kv_bytes = _nbytes(t for pair in prefix_kv for t in pair)
        if keep_cache:
            full_kv = [(k.clone(), v.clone()) for k, v in full_kv]
            kv_bytes += _nbytes(t for pair in full_kv for t in pair)
        per_layer = _nbytes(captured[-1])
        room = self.budget - self.used - kv_bytes
        if room < per_layer * 2:  # not even the inputs of one middle layer besides the norm's
            log.info("prefill of %d prompts not recorded: the %.2f GB budget is spent",
                     plan.ids.shape[0], self.budget / 1e9)
            return False
        stride = max(1, math.ceil(per_layer * (self.n_layers + 1) / room))
        kept = range(0, self.n_layers + 1, stride)
        recording = _Recording(
            plan=plan,
            stride=stride,
            prefix_inputs=[captured[i][0] if n else None for i in kept],
            inputs=[captured[i][-1] for i in kept],
            prefix_kv=prefix_kv,
            full_kv=full_kv if keep_cache else None,
        )
        if keep_cache not in self._checked:
            if not self._self_check(recording, out.logits[:, -1]):
                self.enabled = False
                self._recordings.clear()
                return False
            self._checked.add(keep_cache)
        self._recordings[key] = recording
        self.used += kv_bytes + per_layer * len(kept)
        log.debug("recorded a prefill of %d rows (inputs of every %d. layer, %.1f MB in all so far)",
                  plan.ids.shape[0], stride, self.used / 1e6)
        return True

    def _self_check(self, recording: _Recording, logits: torch.Tensor) -> bool:
        """The replay from a middle layer must give the full prefill's logits (unedited model).

        Checked on the first recording with and without a KV cache: how the decoder runs a slice of
        its layers does not depend on the prompts.
        """
        start = (self.n_layers // 2 // recording.stride) * recording.stride
        if start == 0:
            return True
        replayed = self._replay(recording, start, use_cache=recording.full_kv is not None)[0].logits[:, -1]
        error = float((replayed - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
        if not error <= TOLERANCE:
            log.info("prefills run every layer: a replay from layer %d differs by %.2g", start, error)
            return False
        return True

    # -- replay -----------------------------------------------------------------------------------
    def _replay(self, rec: _Recording, first: int, use_cache: bool, logits_to_keep: int = 1):
        k = min(first, self.n_layers) // rec.stride
        start = k * rec.stride
        if start == 0:
            return generation.run_prefill(self.model, rec.plan, use_cache, logits_to_keep=logits_to_keep)
        plan = rec.plan
        rows = plan.ids.shape[0]

        def fill(cache):
            # Layers below ``start`` are not run: give them the prefix they would have computed (the
            # cache's length, and with it the causal mask, is read from them).
            hf_compat.set_layers(cache, [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                         for k, v in rec.prefix_kv[:start]])

        prefix = rec.prefix_inputs[k]
        with hf_compat.decoder_slice(self.decoder, start):
            out, mask, positions = generation.run_prefill(
                self.model, plan, use_cache, embeds=(prefix, rec.inputs[k]), fill_cache=fill,
                logits_to_keep=logits_to_keep,
            )
        if use_cache:
            if rec.full_kv is None:
                raise RuntimeError("this prefill was recorded without its KV cache")
            hf_compat.set_layers(hf_compat.output_cache(out), rec.full_kv[:start])
        return out, mask, positions

    def prefill_from(self, first: int):
        """A :func:`generation.prefill` for a model edited from layer ``first`` up (none below)."""

        def prefill(model, enc: dict, use_cache: bool = True, logits_to_keep: int = 1):
            rec = self._recordings.get(_key(enc)) if self.enabled and model is self.model else None
            if rec is None or (use_cache and rec.full_kv is None):
                return generation.prefill(model, enc, use_cache, logits_to_keep)
            return self._replay(rec, first, use_cache, logits_to_keep)

        return prefill


def _default_budget(model) -> int:
    """:data:`BUDGET_BYTES`, or a tenth of the free memory of a GPU that holds the model if less."""
    device = hf_compat.input_device(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(BUDGET_BYTES, free // 10)
    return BUDGET_BYTES
