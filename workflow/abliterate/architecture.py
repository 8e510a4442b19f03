"""Find the matrices that write into the residual stream of a decoder-only transformer.

``discover(model)`` locates the decoder layers of the text tower (the vision or audio towers of a
multimodal model are left alone) and, per layer, the attention output projection (``attn_out``) and
the MLP down projection(s) (``mlp_down``: one dense matrix, one per expert module, or a fused 3-D
expert tensor). Every component's output dimension is the residual (hidden) dimension, which is what
directional ablation projects out.

Names are dotted module paths relative to the *unwrapped* transformers model, so they are valid
PEFT ``target_modules`` and stay valid after PEFT wraps the model.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)

KINDS = ("attn_out", "mlp_down")
LAYOUTS = ("linear", "conv1d", "experts")

# Last name segment of the container that holds a layer's attention (or token mixer) and its MLP.
_ATTN_CONTAINER = re.compile(r"^(self_attn|attn|attention|self_attention|mixer|linear_attn|temporal_block)$")
_MLP_CONTAINER = re.compile(r"^(mlp|feed_forward|ffn|ff|block_sparse_moe|moe|mlp_block|feedforward)$")
# Output projections, in order of preference (the first found in a container wins).
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o", "proj", "output_proj")
# Down projections: every match inside the MLP container is taken (dense MLP, each expert, shared experts).
_MLP_DOWN_NAMES = {"down_proj", "c_proj", "fc2", "w2", "wo", "dense_4h_to_h", "output_linear", "fc_out"}
_QUANTIZED_CLASSES = {"Linear4bit", "Linear8bitLt"}
_QUANTIZED_PARAMS = {"Params4bit", "Int8Params"}
# Where a multimodal model keeps its text tower.
_TEXT_TOWER_NAMES = ("language_model", "text_model")


@dataclass(eq=False)
class Component:
    """One matrix (or fused stack of expert matrices) that writes into the residual stream.

    ``layout``: "linear" stores (out, in); "conv1d" (transformers ``Conv1D``) stores (in, out);
    "experts" stores a 3-D tensor, (E, out, in) when ``expert_axis_order == "out_in"`` and (E, in, out)
    when it is "in_out". ``module`` is the real layer owning ``param`` (the base layer when a PEFT
    wrapper sits at ``name``). ``lora`` is True when PEFT LoRA can wrap ``module``.
    """

    layer: int
    kind: str
    name: str
    module: nn.Module
    param: str = "weight"
    layout: str = "linear"
    lora: bool = False
    expert_axis_order: str | None = None
    quantized: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def out_features(self) -> int:
        """Size of the output (residual) dimension."""
        if self.quantized:
            return int(self.module.out_features)
        w = self.weight
        if self.layout == "linear":
            return w.shape[0]
        if self.layout == "conv1d":
            return w.shape[1]
        return w.shape[1] if self.expert_axis_order == "out_in" else w.shape[2]

    @property
    def key(self) -> str:
        """Unique id: the module path, plus the parameter name when it is not ``weight``."""
        return self.name if self.param == "weight" else f"{self.name}.{self.param}"


@dataclass
class ModelLayout:
    components: list[Component]
    n_layers: int
    hidden_size: int
    model_class: str
    layers_path: str = ""

    def table(self) -> str:
        """One line, e.g. ``LlamaForCausalLM: 30 layers × {attn_out: 30 linear, mlp_down: 30 linear}``."""
        counts = Counter((c.kind, c.layout) for c in self.components)
        parts = []
        for kind in KINDS:
            per_layout = [f"{counts[(kind, lay)]} {lay}" for lay in LAYOUTS if counts[(kind, lay)]]
            if per_layout:
                parts.append(f"{kind}: {' + '.join(per_layout)}")
        return f"{self.model_class}: {self.n_layers} layers × {{{', '.join(parts)}}}"


def text_config(config):
    """The text model's part of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT wrappers (PeftModel -> LoraModel -> model)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # PEFT is optional for discovery
        return model
    while True:
        if isinstance(model, PeftModel):
            model = model.base_model
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


def _base_layer(module: nn.Module) -> nn.Module:
    """The real layer under a PEFT tuner layer (LoRA etc.), else the module itself."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return module
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__ in _QUANTIZED_CLASSES or type(weight).__name__ in _QUANTIZED_PARAMS


def _text_scope(model: nn.Module) -> tuple[str, nn.Module]:
    """The text tower of a multimodal model (the outermost ``language_model``/``text_model``), else the model."""
    towers = [(n, m) for n, m in model.named_modules() if n and n.rsplit(".", 1)[-1] in _TEXT_TOWER_NAMES]
    return min(towers, key=lambda nm: nm[0].count(".")) if towers else ("", model)


def _hidden_size(model: nn.Module, scope: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None:
        text = text_config(config)
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(text, attr, None)
            if isinstance(value, int):
                return value
    get_emb = getattr(scope, "get_input_embeddings", None) or getattr(model, "get_input_embeddings", None)
    if get_emb is not None:
        emb = get_emb()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.shape[-1]
    return None


def _has_attention(block: nn.Module) -> bool:
    return any(n and _ATTN_CONTAINER.match(n.rsplit(".", 1)[-1]) for n, _ in block.named_modules())


def _find_layers(scope: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of homogeneous blocks that contain an attention (or mixer) submodule."""
    blocks = [(n, m) for n, m in _module_lists(scope) if all(_has_attention(block) for block in m)]
    return _longest(blocks)


def _module_lists(scope: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in scope.named_modules() if isinstance(m, nn.ModuleList) and len(m)]


def _longest(lists: list[tuple[str, nn.ModuleList]]) -> tuple[str, nn.ModuleList] | None:
    return max(lists, key=lambda nm: len(nm[1])) if lists else None


def _child_names(block: nn.Module) -> list[str]:
    return [n for n, _ in block.named_modules() if n]


def _dense_component(layer: int, kind: str, name: str, module: nn.Module, hidden: int) -> Component | None:
    """A Component for a 2-D weight whose output dimension is ``hidden``, else None."""
    base = _base_layer(module)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if _is_quantized(base):
        if getattr(base, "out_features", None) != hidden:
            return None
        return Component(layer, kind, name, base, "weight", "linear", lora=True, quantized=True)
    if weight.ndim == 3:
        order = _expert_axis_order(base, weight, hidden)
        if order is None:
            return None
        return Component(layer, kind, name, base, "weight", "experts", lora=False, expert_axis_order=order)
    if weight.ndim != 2:
        return None
    if _is_conv1d(base):
        ok = weight.shape[1] == hidden
        return Component(layer, kind, name, base, "weight", "conv1d", lora=True) if ok else None
    if weight.shape[0] != hidden:
        return None
    return Component(layer, kind, name, base, "weight", "linear", lora=isinstance(base, nn.Linear))


def _expert_axis_order(module: nn.Module, weight: torch.Tensor, hidden: int) -> str | None:
    """``out_in`` for (E, out, in), ``in_out`` for (E, in, out); shapes decide, ``is_transposed`` breaks ties."""
    out_in, in_out = weight.shape[1] == hidden, weight.shape[2] == hidden
    flag = getattr(module, "is_transposed", None)
    if out_in and in_out:
        if flag is None:
            log.warning("square expert tensor in %s: assuming (E, out, in)", type(module).__name__)
        return "in_out" if flag else "out_in"
    return "out_in" if out_in else "in_out" if in_out else None


def _attn_out(layer: int, prefix: str, block: nn.Module, hidden: int) -> Component | None:
    for cname, container in block.named_modules():
        if not cname or not _ATTN_CONTAINER.match(cname.rsplit(".", 1)[-1]):
            continue
        for wanted in _ATTN_OUT_NAMES:
            for sub, module in container.named_modules():
                if sub and sub.rsplit(".", 1)[-1] == wanted and "base_layer" not in sub.split("."):
                    comp = _dense_component(layer, "attn_out", f"{prefix}.{cname}.{sub}", module, hidden)
                    if comp is not None:
                        return comp
    return None


def _mlp_down(layer: int, prefix: str, block: nn.Module, hidden: int) -> list[Component]:
    found: list[Component] = []
    for cname, container in block.named_modules():
        if not cname or not _MLP_CONTAINER.match(cname.rsplit(".", 1)[-1]):
            continue
        for sub, module in container.named_modules():
            if "base_layer" in sub.split("."):
                continue
            full = f"{prefix}.{cname}.{sub}" if sub else f"{prefix}.{cname}"
            if sub and sub.rsplit(".", 1)[-1] in _MLP_DOWN_NAMES:
                comp = _dense_component(layer, "mlp_down", full, module, hidden)
                if comp is not None:
                    found.append(comp)
                    continue
            # Fused experts keep their down projections as 3-D parameters of an experts module.
            for pname, param in module.named_parameters(recurse=False):
                if param.ndim == 3 and pname in _MLP_DOWN_NAMES:
                    order = _expert_axis_order(module, param, hidden)
                    if order is not None:
                        found.append(Component(layer, "mlp_down", full, module, pname, "experts",
                                               False, order))
        if found:
            break  # an outer container (e.g. "mlp") already covered nested ones (e.g. "mlp.moe")
    return found


def discover(model: nn.Module) -> ModelLayout:
    """Find the decoder layers of the text tower and the residual-writing components of each layer."""
    model = unwrap(model)
    model_class = type(model).__name__
    scope_name, scope = _text_scope(model)
    hidden = _hidden_size(model, scope)
    found = _find_layers(scope)
    if found is None:
        longest = _longest(_module_lists(scope))
        detail = (
            f"longest ModuleList '{longest[0]}' ({len(longest[1])} × {type(longest[1][0]).__name__}) has "
            f"modules {_child_names(longest[1][0])} in its first element"
            if longest
            else "it has no nn.ModuleList"
        )
        raise UnsupportedArchitectureError(
            f"{model_class}: no decoder layers found (a ModuleList of blocks with an attention submodule); {detail}"
        )
    if hidden is None:
        raise UnsupportedArchitectureError(
            f"{model_class}: cannot tell the hidden size (no config.hidden_size nor input embeddings); "
            f"modules in the first layer: {_child_names(found[1][0])}"
        )
    list_name, layers = found
    prefix_root = ".".join(p for p in (scope_name, list_name) if p)
    components: list[Component] = []
    for i, block in enumerate(layers):
        prefix = f"{prefix_root}.{i}"
        attn = _attn_out(i, prefix, block, hidden)
        mlp = _mlp_down(i, prefix, block, hidden)
        if attn is None and not mlp:
            raise UnsupportedArchitectureError(
                f"{model_class}: layer {i} ('{prefix}', {type(block).__name__}) has no recognised attention "
                f"output or MLP down projection writing to hidden size {hidden}; modules in the first layer: "
                f"{_child_names(layers[0])}"
            )
        components += ([attn] if attn is not None else []) + mlp
    layout = ModelLayout(components, len(layers), hidden, model_class, prefix_root)
    log.info("%s", layout.table())
    return layout
