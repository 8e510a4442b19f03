"""The schema's defaults and the shipped config.yaml tell users the same thing."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Keys where the shipped file differs on purpose: it is the offline demo's configuration.
DEMO_ONLY = {"run", "model.path"}


def _differences(schema: dict, config: dict, prefix: str = ""):
    for key, node in schema.get("properties", {}).items():
        if key not in config:
            continue
        name, value = f"{prefix}{key}", config[key]
        if isinstance(value, dict) and "properties" in node:
            yield from _differences(node, value, f"{name}.")
        elif "default" in node and node["default"] != value and name not in DEMO_ONLY:
            yield name, node["default"], value


def test_schema_defaults_match_config_yaml():
    # A config that leaves a key out gets the schema's default; the one config.yaml explains must be it
    # (ablation.row_norm was none in the schema and full in config.yaml until 2026-11-27).
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert list(_differences(schema, config)) == []
