"""The Hugging Face model card (README.md) of an exported folder: what was done, what it measured.

Every figure comes from ``selected.json`` and ``summary.json`` as the export and evaluate rules wrote
them; nothing is recomputed. Keys other rules may add or drop (figures of new metrics, the
confirmation record) are shown when present and left out when absent, so a card never fails on an
older or newer summary. The source model's licence is read, never guessed (:func:`source_licence`).

Torch-free: the release rule that writes the cards loads no model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .model_source import Resolved

log = logging.getLogger(__name__)

LIBRARY = "abliterate"
# What users load from each kind of folder, and the Hub's library for it.
KINDS = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
COMPONENTS = {"attn_out": "attention output projections", "mlp_down": "MLP down projections"}
# Figures every summary has; any other number under a split is a metric some rule added.
_SPLIT_COUNTS = ("refusals", "n", "kl")


@dataclass(frozen=True)
class Licence:
    """The source model's licence identifier (None: not found) and where it was read."""

    id: str | None
    source: str


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the two JSON files: the run's own settings and the source model."""

    run: str
    model: str  # how summary.json names the source (a hub id, a folder, a GGUF file)
    base_model: str | None  # a hub id, the only kind of name the Hub's base_model accepts
    licence: Licence
    seed: int
    policy: str
    refusal_target: float
    confirm: bool
    trial: int | None  # export.trial: the user's pick, no policy


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a model card; {} when there is none or it does not parse."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_licence(data: dict) -> str | None:
    value = data.get("license")
    if isinstance(value, list):  # the Hub allows a list; one licence is what we can state
        value = value[0] if len(value) == 1 else None
    if value == "other" and data.get("license_name"):
        return str(data["license_name"])
    return str(value) if value else None


def gguf_licence(path: str | Path) -> str | None:
    """``general.license`` from a GGUF file's metadata (None when the file sets none)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace").strip() or None


def _hub_card(repo_id: str, revision: str | None) -> str | None:
    """The path of a hub model's README.md: from the local cache, else downloaded unless offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .model_source import _offline

    cached = try_to_load_from_cache(repo_id, "README.md", revision=revision or "main")
    if isinstance(cached, str):
        return cached
    if _offline():
        return None
    try:
        return hf_hub_download(repo_id, "README.md", revision=revision)
    # no card, no network, a gated repo, whichever HTTP client raised it: the licence stays unknown, said so
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read the model card of %s for its licence: %s", repo_id, exc)
        return None


def source_licence(res: Resolved) -> Licence:
    """The source model's licence: ``general.license`` of a GGUF file, else the ``license`` of its
    model card's metadata (a hub model's card, a local folder's README.md)."""
    if res.gguf_path:
        found = gguf_licence(res.gguf_path)
        if found:
            return Licence(found, f"general.license of {Path(res.gguf_path).name}")
        return Licence(None, f"{Path(res.gguf_path).name} sets no general.license")
    card = _hub_card(res.location, res.revision) if res.kind == "hub" else Path(res.location) / "README.md"
    if card is None or not Path(card).is_file():
        return Licence(None, f"{res.description} has no model card (README.md) to read it from")
    found = _card_licence(front_matter(Path(card).read_text(encoding="utf-8", errors="replace")))
    if found:
        return Licence(found, f"the model card of {res.description}")
    return Licence(None, f"the model card of {res.description} states none")


def metadata(kind: str, facts: CardFacts) -> dict:
    """The card's YAML block. ``license: other`` with ``license_name: unknown`` when none was found:
    the Hub needs a value, and a guessed licence would be worse than an admitted gap."""
    meta: dict = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    if facts.licence.id:
        meta["license"] = facts.licence.id
    else:
        meta.update(license="other", license_name="unknown")
    meta["library_name"] = KINDS[kind]
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["abliterated", "uncensored", LIBRARY, *(["gguf"] if kind == "gguf" else [])]
    return meta


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"  # a tiny KL keeps its digits


def _rate(counts: dict | None) -> str:
    if not counts or "refusals" not in counts:
        return "—"
    refusals, n = counts["refusals"], counts.get("n")
    return f"{refusals}/{n} ({refusals / n:.0%})" if n else str(refusals)


def _kl(counts: dict | None) -> str:
    return _number(counts["kl"]) if counts and "kl" in counts else "—"


def _figures(summary: dict) -> list[str]:
    base, merged = summary.get("baseline", {}), summary.get("merged", {})
    rows = [
        ("held-out harmful (never seen by the study)", "refusals", _rate(base.get("heldout")),
         _rate(merged.get("heldout"))),
        ("held-out harmless", "refusals", _rate(base.get("harmless_heldout")), _rate(merged.get("harmless_heldout"))),
        ("held-out harmless", "first-token KL vs. the original", "—", _kl(merged.get("heldout"))),
        ("eval harmful (the study optimised on these)", "refusals", _rate(base.get("eval")), _rate(merged.get("eval"))),
        ("eval harmless (the study optimised on these)", "first-token KL vs. the original", "—",
         _kl(merged.get("eval"))),
    ]
    # metrics other rules add under a split (a judge's verdicts, answer KL, late refusals): shown as found
    for split in ("heldout", "harmless_heldout", "eval"):
        after = merged.get(split) or {}
        before = base.get(split) or {}
        for key in sorted((set(after) | set(before)) - set(_SPLIT_COUNTS)):
            cells = [_number(side[key]) if isinstance(side.get(key), int | float | str) else "—"
                     for side in (before, after)]
            rows.append((split.replace("_", " "), key, *cells))
    lines = ["| prompts | metric | original | abliterated |", "|---|---|---|---|"]
    lines += [f"| {p} | {m} | {a} | {b} |" for p, m, a, b in rows if (a, b) != ("—", "—")]
    return lines


def _components(params: dict) -> str:
    names = [COMPONENTS.get(k, k) for k in sorted({key.partition(".")[0] for key in params if "." in key})]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names) or "no components"


def _direction(params: dict) -> str:
    index = params.get("direction_index")
    if index is None:
        return "each layer's own refusal direction"
    return f"one refusal direction for every layer, taken at layer {_number(index)} (interpolated)"


_LOADING = {
    "adapter": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("{base}")
```
`direct_edits.safetensors`, when present, holds edits of modules LoRA cannot wrap (fused MoE experts);
PEFT does not read it: merge this folder with abliterate's merge rule to apply them.""",
    "merged": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```""",
    "gguf": """With llama.cpp: `llama-cli -m path/to/this/folder/<file>.gguf -cnv`
(or `llama-server -m ...`); the chat template travels in the file's metadata.""",
}


_FOLDER = {"adapter": "This folder is a PEFT adapter holding the edit (LoRA factors).",
           "merged": "This folder is the full model with the edit merged into its weights.",
           "gguf": "This folder is the merged model converted to GGUF."}
_EVALUATED = {"merged": "the merged model reloaded from disk",
              "adapter": "the base model with the adapter loaded through PEFT"}


def render(kind: str, selected: dict, summary: dict | None, facts: CardFacts) -> str:
    """README.md of a folder of ``kind`` (``adapter``, ``merged`` or ``gguf``). ``summary`` None: the
    model was not evaluated yet, and the card says so instead of showing held-out figures."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; expected one of {sorted(KINDS)}")
    params = selected.get("params", {})
    out = ["---", yaml.safe_dump(metadata(kind, facts), sort_keys=False).rstrip("\n"), "---",
           f"# {facts.run} (abliterated)", "",
           (f"`{facts.model}` with its refusal behaviour removed by directional ablation "
            f"([{LIBRARY}](https://pypi.org/project/abliterate/)): rank-1 edits `W <- W - w * r (r^T W)` that "
            f"stop the {_components(params)} from writing along the refusal direction `r`, with per-layer "
            "weights `w` chosen by a multi-objective Optuna study (fewer refusals against a lower KL "
            "divergence from the original)."), "", _FOLDER[kind], "", "## Results", "",
           *_results(kind, selected, summary, facts), "## What was done", "",
           f"- Trial {selected.get('number', '?')}, chosen by: {selected.get('reason', 'not recorded')}",
           f"- Components edited: {_components(params)}, in the layers the trial's weights reach.",
           f"- Direction: {_direction(params)}.", "- Parameters:", "", "```json", json.dumps(params, indent=2),
           "```", "", "## How the trial was chosen", "", *_selection(selected, summary, facts), "",
           "## Reproducibility", "", *_provenance(selected, summary, facts), "", "## How to load", "",
           _LOADING[kind].replace("{base}", facts.base_model or facts.model), "", "## Licence", "",
           *_licence(facts)]
    return "\n".join(out) + "\n"


def _results(kind: str, selected: dict, summary: dict | None, facts: CardFacts) -> list[str]:
    if summary is None:
        return [(f"Not evaluated yet: this card was written before the evaluate rule measured the model on "
                 "held-out prompts. The only figures known are the chosen trial's on the eval prompts the "
                 f"study optimised on, which flatter it: {_rate(selected.get('eval'))} refusals, first-token "
                 f"KL {_kl(selected.get('eval'))}. The held-out figures are in the run's `summary.json` and in "
                 f"the cards of `results/{facts.run}/release/` once the workflow has finished."), ""]
    how = _EVALUATED.get(summary.get("evaluated"), "the abliterated model")
    out = [(f"Measured by the workflow's evaluate rule on {how}, greedy decoding. Held-out prompts were seen "
            "neither by the study nor by the choice of the trial; the eval prompts are the ones the study "
            "optimised on, so their figures flatter the model. KL is the first-token KL divergence "
            "KL(original ‖ abliterated) on harmless prompts."), "", *_figures(summary), ""]
    if kind == "gguf":
        out += ["These figures are the merged model's before the GGUF conversion; a quantized GGUF file can differ.",
                ""]
    return out


def _provenance(selected: dict, summary: dict | None, facts: CardFacts) -> list[str]:
    out = [f"- seed: {facts.seed}"]
    if summary and summary.get("config_hash"):
        out.append(f"- config hash (evaluate): `{summary['config_hash']}`")
    if selected.get("dtype") or selected.get("quantization"):
        out.append(f"- study dtype {selected.get('dtype', '?')}, quantization {selected.get('quantization', '?')}")
    versions = (summary or {}).get("versions") or {}
    if versions:
        out.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    return out


def _licence(facts: CardFacts) -> list[str]:
    if facts.licence.id:
        out = [f"`{facts.licence.id}`, the source model's licence as read from {facts.licence.source}."]
    else:
        out = [(f"Unknown: {facts.licence.source}. The metadata says `license: other` (`license_name: "
                "unknown`); check the source model's terms before publishing this folder.")]
    if not facts.base_model:
        out += ["", (f"The source `{facts.model}` is not a Hub id, so the metadata names no `base_model`; add it "
                     "by hand if you know which Hub model this is.")]
    return out


def _selection(selected: dict, summary: dict | None, facts: CardFacts) -> list[str]:
    lines = []
    if facts.trial is not None:
        lines.append(f"- Named by the user (export.trial: {facts.trial}); no policy, no confirmation.")
    else:
        lines.append(f"- Policy `{facts.policy}` with a refusal target of {facts.refusal_target:.0%} of the eval "
                     "prompts, on the Pareto front of refusals against KL.")
        confirmation = selected.get("confirmation")
        if confirmation:
            reason = confirmation.get("reason", "")
            lines.append(f"- Confirmed on the {confirmation.get('split', 'train')} prompts (never scored by the "
                         f"study), front trials measured again: {len(confirmation.get('candidates', []))}"
                         + ("" if reason == selected.get("reason") else f"; {reason}") + ".")
        elif facts.confirm:
            lines.append("- Confirmation was on, but no trial was measured again (none reached the target on "
                         "the eval prompts, or the train split was empty).")
        else:
            lines.append("- Not confirmed on other prompts (export.confirm: false).")
    study = (summary or {}).get("study") or {}
    if "n_complete" in study:
        extra = [f"{study[k]} {label}" for k, label in (("n_dominated", "stopped once dominated"),
                                                         ("n_failed", "failed")) if study.get(k)]
        lines.append(f"- Study size: {study['n_complete']} complete trials" + (f" ({', '.join(extra)})" if extra
                                                                                else "") + ".")
    return lines
