"""Could an int8 product screen the output layer on CPUs without bfloat16 products?

``greedy_head`` screens a decode step's output layer in bfloat16 where the CPU has bfloat16 dot
products, and computes again in float32 only the tokens that rounding could make the largest. On a
CPU without them (AVX-512 VNNI only) the int8 product of fbgemm is the cheap one. This measures, on
the real model's own final states, how many tokens a rigorous int8 bound would leave to compute
again: weights quantised per row (symmetric, int8), activations per tensor as
``quantized.linear_dynamic`` does, or per row (the tighter case a custom kernel could reach), and

    |x·w − x̂·ŵ| ≤ ‖x‖ ‖w − ŵ‖ + (s_x / 2) ‖ŵ‖₁,

padded by greedy_head's margin. A screen pays only if a row keeps a few candidates. Token counts
do not depend on the machine; no timing is taken.

    python benchmarks/int8_screen.py --model benchmarks/work/models/qwen2.5-coder-0.5b/hf-float32 \\
        --prompts ../shared/data/prompts --out benchmarks/results/int8-screen-qwen2.5-coder-0.5b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))

from abliterate import greedy_head, io  # noqa: E402


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="folder with harmful_val.json, harmless_val.json")
    ap.add_argument("--n", type=int, default=16, help="prompts of each kind")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [row["instruction"] for kind in ("harmful", "harmless")
               for row in json.loads((args.prompts / f"{kind}_val.json").read_text())[: args.n]]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=args.tokens, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True)
    # the final (normed) states of each step's last position: what the output layer multiplies
    x = torch.cat([step[-1][:, -1] for step in out.hidden_states], 0)
    weight = model.get_output_embeddings().weight
    scale = weight.abs().amax(1) / 127
    quantized = torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0,
                                           torch.qint8)
    dequantized = quantized.dequantize()
    screened = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(quantized, None), True)
    exact = F.linear(x, weight)
    weight_term = x.norm(dim=1, keepdim=True) * (weight - dequantized).norm(dim=1)
    l1 = dequantized.abs().sum(1)
    per_tensor = (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / 127
    per_row = (x.amax(1, keepdim=True).clamp(min=0) - x.amin(1, keepdim=True).clamp(max=0)) / 127
    bounds = {"per_tensor": greedy_head.MARGIN * (weight_term + per_tensor / 2 * l1),
              "per_row": greedy_head.MARGIN * (weight_term + per_row / 2 * l1)}
    err = (screened - exact).abs()
    low = F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()  # greedy_head's screen, for scale
    result = {
        "model": str(args.model), "rows": x.shape[0], "vocabulary": weight.shape[0],
        "final_state_abs_max": round(x.abs().max().item(), 2),
        "final_state_norm_median": round(x.norm(dim=1).median().item(), 2),
        "int8_error_over_per_tensor_bound_max": round((err / bounds["per_tensor"]).max().item(), 4),
        "candidates_per_row": {name: {"mean": round(c.float().mean().item(), 1), "min": int(c.min()),
                                      "max": int(c.max())}
                               for name, c in ((k, greedy_head.candidates(screened, b).sum(1))
                                               for k, b in bounds.items())},
        "bfloat16_screen_candidates_per_row_mean": round(greedy_head.candidates(
            low, greedy_head.rounding_bound(x, weight.norm(dim=1), low)).sum(1).float().mean().item(), 1),
    }
    io.write_json(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
