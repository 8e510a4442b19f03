"""Everything that relies on transformers or PEFT internals: KV-cache layers, the decoder's layer list,
forward arguments that differ between models and versions, how ``save_pretrained`` names, orders and
casts tensors (which the streaming merge mirrors), PEFT's re-targeting of LoRA modules and its
dequantisation of bitsandbytes weights.

These are not public API and change without deprecation, so they live in this one module, checked
against the oldest supported release (:data:`OLDEST_TRANSFORMERS`, tested in .ci/run) and the newest.
transformers 5.x renamed the forward argument and output field ``past_key_values`` to ``cache``,
keeping the old name as a deprecated alias until 5.40: :data:`CACHE` is the installed one's name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .architecture import text_config
from .errors import UnsupportedVersionError

# 4.56 brought the cache layers below; in 4.56.0 and 4.56.1 a base model's get_decoder() was None
OLDEST_TRANSFORMERS = "4.56.2"
if Version(transformers.__version__) < Version(OLDEST_TRANSFORMERS):
    raise UnsupportedVersionError(
        f"abliterate needs transformers>={OLDEST_TRANSFORMERS}, but {transformers.__version__} is "
        f"installed: pip install 'transformers>={OLDEST_TRANSFORMERS}'"
    )

CACHE = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)
# before 5.0 a layer's lazy_initialization took the keys alone
_INIT_TAKES_VALUES = "value_states" in inspect.signature(DynamicLayer.lazy_initialization).parameters


def cache_arg(cache) -> dict:
    """The forward keyword argument that hands ``cache`` to the model."""
    return {CACHE: cache}


def output_cache(out):
    """The KV cache a forward pass returned."""
    return getattr(out, CACHE)


def input_device(model) -> torch.device:
    """Where input ids must go: the embedding's device (also right for models split over GPUs)."""
    return model.get_input_embeddings().weight.device


def forward_kwargs(model) -> dict:
    """Optional forward arguments this model accepts: only the last position's logits are needed."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def contiguous_output_inputs(model) -> bool:
    """Hand the output layer contiguous states; True where the hook was added (once per model).

    ``logits_to_keep`` gives the output layer a strided slice of the last states, and on a CPU a
    linear layer takes a strided (rows, 1, hidden) input through a batched product against its weight
    expanded per row: for a 151,936-token vocabulary five times the time of the same product on a
    contiguous copy (benchmarks/README.md, "The screened output layer"). The copy is rows × hidden.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or getattr(out, "_abliterate_contiguous", False):
        return False

    def contiguous(_module, args):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    out.register_forward_pre_hook(contiguous)
    out._abliterate_contiguous = True
    return True


def accepts_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def attention_implementation(model) -> str | None:
    return getattr(text_config(model.config), "_attn_implementation", None)


def set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make a cache layer hold ``keys``/``values`` (not copied: the layer replaces, never writes into them)."""
    layer.lazy_initialization(*((keys, values) if _INIT_TAKES_VALUES else (keys,)))
    layer.keys, layer.values = keys, values


def set_layers(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make the first ``len(kv)`` layers of ``cache`` hold these keys and values (see :func:`set_layer`)."""
    for layer, (keys, values) in zip(cache.layers, kv):
        set_layer(layer, keys, values)


def layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes each step's keys and values into spare room.

    ``DynamicLayer`` concatenates the whole cache with the new token at every step: a copy of all
    keys and values per layer per token. Here the tensors live in a buffer with room to grow
    (doubling), ``keys``/``values`` are views of its filled part, and a step writes one column.
    Anything that replaces ``keys`` (pruning rows, appending rows, repeating a shared prefix) is
    taken over at the next update.
    """

    def __init__(self):
        super().__init__()
        self._buffers = self._views = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys is None:  # not is_initialized, which 4.56 layers lack
            set_layer(self, key_states[..., :0, :], value_states[..., :0, :])
        n, k = self.get_seq_length(), key_states.shape[-2]
        adopted = self._views is not None and self.keys is self._views[0]
        if not adopted or n + k > self._buffers[0].shape[-2]:
            room = n + k + max(n + k, 32)
            self._buffers = tuple(
                new.new_empty((*new.shape[:-2], room, new.shape[-1])) for new in (key_states, value_states)
            )
            if n:
                self._buffers[0][..., :n, :] = self.keys
                self._buffers[1][..., :n, :] = self.values
        self._buffers[0][..., n : n + k, :] = key_states
        self._buffers[1][..., n : n + k, :] = value_states
        self._views = (self._buffers[0][..., : n + k, :], self._buffers[1][..., : n + k, :])
        self.keys, self.values = self._views
        return self.keys, self.values


class FixedLayer(DynamicLayer):
    """A cache layer of fixed length whose ``update`` writes one token at the shared ``slot``.

    ``keys`` and ``values`` are always the full buffers; which columns count is the mask's business.
    The slot is a one-element device tensor, so a replayed graph writes where the step before it
    left off.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
        super().__init__()
        set_layer(self, keys, values)
        self.slot = slot

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(-2, self.slot.to(self.keys.device), key_states)
        self.values.index_copy_(-2, self.slot.to(self.values.device), value_states)
        return self.keys, self.values


def new_cache(model):
    """An empty KV cache for generation: growing in place where every layer is a plain one.

    ``None`` (the model then builds its own cache) for sliding-window, linear-attention or other
    special layers, and where the cache classes differ from what this was written against.
    """
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - an older or newer transformers: its own cache is correct
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [GrowingLayer() for _ in layers]
    return cache


def fixed_cache(model, cache, width: int, total: int, slot: torch.Tensor):
    """A cache of :class:`FixedLayer` with room for ``total`` tokens, its first ``width`` those of
    ``cache`` (a prefill's, of plain layers)."""
    layers = []
    for layer in cache.layers:
        keys = layer.keys.new_zeros((*layer.keys.shape[:-2], total, layer.keys.shape[-1]))
        values = layer.values.new_zeros((*layer.values.shape[:-2], total, layer.values.shape[-1]))
        keys[..., :width, :] = layer.keys
        values[..., :width, :] = layer.values
        layers.append(FixedLayer(keys, values, slot))
    fixed = DynamicCache(config=model.config)
    fixed.layers = layers
    return fixed


def select_rows(cache, index: torch.Tensor) -> None:
    """Keep only ``index`` rows of a KV cache, in place.

    ``reorder_cache`` (index_select on the batch axis) is implemented by every cache layer type of
    transformers 5, linear-attention and sliding-window layers included, whereas
    ``batch_select_indices`` is missing on some; older tuple caches are not supported.
    """
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
    else:
        raise TypeError(f"cannot prune a KV cache of type {type(cache).__name__}")


def can_append_rows(cache) -> bool:
    """True when rows can join ``cache`` mid-generation: every layer is a plain growing KV layer.

    Sliding-window, static, quantized and linear-attention layers keep state that left padding
    cannot align, so models with them finish each batch before the next one starts.
    """
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def append_rows(cache, other, mask: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of ``other`` to ``cache`` in place; return the matching attention mask.

    Both caches are left-padded to the longer one's length, and so are their masks: the new rows
    see exactly their own tokens, at their own positions (positions are per row, not per column).
    """
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, new in zip(cache.layers, other.layers):
        # each layer's tensors stay on that layer's device (models split over GPUs)
        layer.keys = torch.cat([_left_pad(layer.keys, width, -2), _left_pad(new.keys, width, -2)])
        layer.values = torch.cat([_left_pad(layer.values, width, -2), _left_pad(new.values, width, -2)])
    return torch.cat([_left_pad(mask, width, 1), _left_pad(other_mask, width, 1)])


@contextlib.contextmanager
def decoder_slice(decoder, start: int, stop: int | None = None, final_norm: bool = True):
    """Let ``decoder`` run only its layers ``start:stop`` (and its final norm only if asked).

    The decoder's own forward still builds the causal mask and rotary embeddings, so a slice of
    layers computes exactly what those layers compute inside the whole model (each attention layer
    keeps its index into the KV cache).
    """
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield decoder
    finally:
        decoder.layers, decoder.norm = layers, norm


def peft_retargeted(config, model) -> set[str]:
    """LoRA target names PEFT would silently rewrite for this model type.

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
    convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    return set(config.target_modules) - set(probe.target_modules or [])


def dequantized_weight(module) -> torch.Tensor:
    """A bitsandbytes layer's weight as a float tensor (PEFT's helper, which knows each format)."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


class Unmirrored(Exception):
    """``save_pretrained`` would write this model in a way a tensor-by-tensor writer cannot mirror, or
    the installed transformers lacks the internals that tell (they came with 5.x's weight conversion)."""


def _saving_internals():
    try:
        from transformers.core_model_loading import (
            build_glob_alternation,
            dot_natural_key,
            revert_weight_conversion,
        )
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError as exc:
        raise Unmirrored(f"transformers {transformers.__version__} lacks the weight-conversion internals the "
                         f"streaming merge mirrors ({exc})") from exc
    return build_glob_alternation, dot_natural_key, revert_weight_conversion, remove_tied_weights_from_state_dict


def mirrors_saving() -> bool:
    """Whether this transformers has the internals :func:`saved_tensor_names` and :func:`loaded_dtypes` read."""
    try:
        _saving_internals()
    except Unmirrored:
        return False
    return True


def saved_tensor_names(model) -> dict[str, str]:
    """Model parameter name -> the name ``save_pretrained`` gives it when it reverts transformers'
    renamings, in the order it saves a model ``from_pretrained`` loaded (sorted by ``dot_natural_key``);
    tied weights left out. :class:`Unmirrored` when saving converts tensors (stacks experts, splits
    fused ones)."""
    _, dot_natural_key, revert_weight_conversion, remove_tied_weights_from_state_dict = _saving_internals()
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    by_id = {id(t): k for k, t in state.items()}
    try:
        reverted = revert_weight_conversion(model, dict(state))
    except Exception as exc:  # any failure means: not a plain renaming
        raise Unmirrored(f"transformers' weight conversion cannot be reverted on the meta device ({exc})") from exc
    if len(reverted) != len(state) or any(id(t) not in by_id for t in reverted.values()):
        raise Unmirrored(f"{type(model).__name__}'s checkpoint format is converted on load (tensors are "
                         "fused or split, e.g. MoE experts), not only renamed")
    names = {by_id[id(t)]: k for k, t in reverted.items()}
    return {k: names[k] for k in sorted(names, key=dot_natural_key)}


def loaded_dtypes(model, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype ``from_pretrained(dtype=dtype)`` gives each tensor (``_keep_in_fp32_modules`` included)."""
    build_glob_alternation = _saving_internals()[0]
    if not hasattr(model, "_get_dtype_plan"):
        raise Unmirrored(f"transformers {transformers.__version__} has no per-tensor dtype plan")
    plan = model._get_dtype_plan(dtype)
    out = {k: t.dtype for k, t in model.state_dict().items()}
    if plan:
        alt, by_group, _ = build_glob_alternation(list(plan))
        for key in out:
            match = alt.search(key)
            if match is not None:
                out[key] = plan[by_group[match.lastgroup]]
    return out
