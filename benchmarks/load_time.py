"""Where a rule's model load goes on a GPU: CUDA start-up, reading the weights, the probe forward.

    python benchmarks/load_time.py MODEL_DIR [--out FILE]

Each rule of the workflow loads the model in a new process. This measures, in one process and in this
order: CUDA's start-up (the first allocation), transformers' ``from_pretrained`` onto the CPU followed
by ``.to(cuda)`` (what abliterate did before), ``from_pretrained`` with ``device_map`` straight onto
the GPU (what it does now), and :func:`abliterate.loading.load_model` as the rules call it (its log
line splits weights and probe forward), then an editor's construction and one trial on that model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "workflow"))

from abliterate import devices, loading
from abliterate.ablation import AblationParams
from abliterate.architecture import discover
from abliterate.editors import LoraEditor


def timed(fn):
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM

    figures = {}
    _, figures["cuda_start_s"] = timed(lambda: torch.zeros(1, device="cuda"))
    ways = (("cpu_then_to_cuda_s", {}, True), ("device_map_cuda_s", {"device_map": {"": 0}}, False))
    for rep in range(2):  # alternated, so neither way alone profits from warm caches
        for label, kwargs, move in ways:
            def load(kwargs=kwargs, move=move):
                model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, **kwargs)
                return model.to("cuda") if move else model
            model, figures[f"{label}_{rep}"] = timed(load)
            del model
            devices.free_memory()
    loaded, figures["load_model_s"] = timed(lambda: loading.load_model(
        loading.ModelSource(path=args.model), torch.device("cuda"), cascade=["bfloat16"]))
    layout = discover(loaded.model)
    directions = torch.randn(layout.n_layers + 1, layout.hidden_size, device="cuda")
    ablator, figures["ablator_init_s"] = timed(lambda: LoraEditor(loaded.model, layout, directions))
    _, figures["first_trial_apply_s"] = timed(lambda: ablator.apply(AblationParams.constant(1.0)))
    _, figures["second_trial_apply_s"] = timed(lambda: ablator.apply(AblationParams.constant(0.5)))
    figures = {k: round(v, 3) for k, v in figures.items()}
    figures["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
