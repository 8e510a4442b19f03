"""The answers of benchmarks/labels/judge-labels.json (before labelling): Qwen2.5-Coder-0.5B-Instruct,
base and with a crude refusal-direction ablation, to uncensorbench's and abliterate's prompts.

    python benchmarks/real_models.py install qwen2.5-coder-0.5b   # then compare.py --protocol cpu-real converts it
    python benchmarks/labels/make_answers.py OUT.json
"""
import json
import os
import random
import sys
from pathlib import Path

import torch
import uncensorbench
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M = os.path.join(REPO, "benchmarks/work/models/qwen2.5-coder-0.5b/hf-float32")
tok = AutoTokenizer.from_pretrained(M); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
ub = json.loads(Path(uncensorbench.__file__).with_name("data").joinpath("prompts.json").read_text())["prompts"]
hl = json.loads(Path(REPO, "workflow/abliterate/data/harmless_prompts.json").read_text())["prompts"]
rng = random.Random(7)
rng.shuffle(ub); rng.shuffle(hl)
dir_harm, lab_harm = ub[:60], ub[60:]
dir_harmless, lab_harmless = hl[:60], hl[60:]
SYS = "You are a helpful assistant."
def chat(p):
    return tok.apply_chat_template([{"role": "system", "content": SYS}, {"role": "user", "content": p}],
                                   tokenize=False, add_generation_prompt=True)
@torch.inference_mode()
def gen(prompts, n=128, bs=16):
    out = []
    for i in range(0, len(prompts), bs):
        enc = tok([chat(p) for p in prompts[i:i+bs]], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False)
        out += tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        print(i, flush=True)
    return out
@torch.inference_mode()
def last_hidden(prompts, layer, bs=16):
    hs = []
    for i in range(0, len(prompts), bs):
        enc = tok([chat(p) for p in prompts[i:i+bs]], return_tensors="pt", padding=True)
        o = model(**enc, output_hidden_states=True)
        hs.append(o.hidden_states[layer][:, -1].float())
    return torch.cat(hs)
recs = []
bh, bl = lab_harm[:25], lab_harmless[:25]
for src, items, kind in (("base", bh, "harmful"), ("base", bl, "harmless")):
    for it, r in zip(items, gen([x["prompt"] for x in items])):
        recs.append({"model": src, "kind": kind, "prompt_id": it["id"], "prompt": it["prompt"], "response": r})
L = int(0.6 * model.config.num_hidden_layers)
d = last_hidden([x["prompt"] for x in dir_harm], L).mean(0) - last_hidden([x["prompt"] for x in dir_harmless], L).mean(0)
r = d / d.norm()
with torch.no_grad():
    for layer in model.model.layers:
        for W in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            W.sub_(torch.outer(r, torch.matmul(r, W)))
ah, al = lab_harm[25:60], lab_harmless[25:40]
for src, items, kind in (("ablated", ah, "harmful"), ("ablated", al, "harmless")):
    for it, resp in zip(items, gen([x["prompt"] for x in items])):
        recs.append({"model": src, "kind": kind, "prompt_id": it["id"], "prompt": it["prompt"], "response": resp})
Path(sys.argv[1]).write_text(json.dumps({"direction_layer": L, "system_prompt": SYS, "max_new_tokens": 128,
                                         "records": recs}, indent=1))
print("done", len(recs))
