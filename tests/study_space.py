"""The search space the workflow builds from the schema's defaults (config study.space), for tests
that call the study worker directly."""

from __future__ import annotations

from pathlib import Path

import yaml
from abliterate.steps.study import search_space

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def default_space(kinds=("attn_out", "mlp_down")) -> dict:
    props = yaml.safe_load(SCHEMA.read_text())["properties"]["study"]["properties"]["space"]["properties"]
    return search_space({k: v["default"] for k, v in props.items()}, list(kinds))


SPACE = default_space()
