"""Rule `merge`: the selected ablation merged into a full model folder on the CPU."""

from __future__ import annotations

import json
import logging

from .. import dtypes, io, loading, merging, session, workflow_config
from ..rule_settings import typed

log = logging.getLogger(__name__)

CARD = """---
library_name: transformers
tags: [abliterated, abliterate]
---
# {name} (abliterated)

This model is `{model}` with its refusal direction ablated by
[abliterate](https://pypi.org/project/abliterate/): rank-1 edits `W <- W - w * r (r^T W)` of every
attention output and MLP down projection, with weights chosen by an Optuna study.

## Selected trial
{reason}

| metric (eval prompts the study optimised on: they flatter the model) | value |
|---|---|
| refusals | {refusals}/{n} |
| first-token KL vs. the original | {kl:.4f} |

Parameters:
```json
{params}
```

## Provenance
- base model: `{model}` (dtype {dtype}, study quantization {quantization})
- config hash: `{config_hash}`
- merged on the CPU in {merge_dtype}; see `abliterate.json` for every figure.

This card was written when the model was merged, before the evaluate rule measured it on held-out
prompts: it knows no held-out figures. The workflow's `results/{name}/release/model/` is this folder
with a card that reports them (and the licence of the source model).
"""


def run(config: dict, adapter: str, selected_path: str, out_model: str, config_hash: str) -> dict:
    config = typed("merge", config)
    selected = io.read_json(selected_path)
    source = session.model_source(config)
    dtype = merging.merge_dtype(loading.load_config(source))
    save_dtype = None if config.merge.dtype == "auto" else dtypes.parse(config.merge.dtype)
    card = CARD.format(
        name=config.run, model=selected.get("model", source.path), reason=selected["reason"],
        refusals=selected["eval"]["refusals"], n=selected["eval"]["n"], kl=selected["eval"]["kl"],
        params=json.dumps(selected["params"], indent=2), dtype=selected.get("dtype"),
        quantization=selected.get("quantization"), config_hash=config_hash,
        merge_dtype=str(dtype).removeprefix("torch.") + (f", saved in {str(save_dtype).removeprefix('torch.')}"
                                                           if save_dtype not in (None, dtype) else ""),
    )
    meta = {"selected": selected, "config_hash": config_hash}
    if selected.get("quantization") not in (None, "none"):
        log.warning("the study ran %s-quantized, but the merge writes the unquantized model on the CPU (tensor by "
                    "tensor where it can; RAM estimate below); merge.adapter_only: true skips it",
                    selected["quantization"])
    return merging.merge(source, adapter, out_model, config.merge.max_ram_gib, meta, card,
                         workflow_config.chat_template(config.model.chat_template), save_dtype)
