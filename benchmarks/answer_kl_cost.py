"""Per-trial cost of the answer KL against the first-token KL: seconds of Evaluator.kl (the KL part of a
trial) on the first N packaged harmless prompts. Usage: answer_kl_cost.py MODEL_DIR PROMPTS KL_TOKENS BATCH
[KL_TOP_K, default 256] (run from the repository root with PYTHONPATH=workflow; see benchmarks/README.md, "Answer KL")."""
import json
import sys
import time

import torch
from abliterate import prompting
from abliterate.answer_kl import base_answers
from abliterate.evaluation import Evaluator
from abliterate.kl import first_token_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
path, n, n_tokens, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
top_k = int(sys.argv[5]) if len(sys.argv) > 5 else 256
with open("workflow/abliterate/data/harmless_prompts.json", encoding="utf-8") as fh:
    prompts = [row["prompt"] for row in json.load(fh)["prompts"]][:n]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
texts = prompting.chat_texts(tok, prompts)
base_lp = first_token_logprobs(model, tok, texts, batch)
t = time.perf_counter(); answers = base_answers(model, tok, texts, n_tokens, batch, top_k, cuda_graphs=False, first=base_lp)
print(f"base answers (baseline, once): {time.perf_counter() - t:.2f} s, mean length {answers.lengths.double().mean():.1f}")
for kind in ("first_token", "answer"):
    ev = Evaluator(model, tok, [], texts, base_lp, 8, batch, base_answers=answers, objective_kl=kind)
    ev.kl()  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter(); v = ev.kl(); times.append(time.perf_counter() - t)
    print(f"{kind}: KL {v:.3g}, {min(times):.3f} s per trial (best of 3)")
