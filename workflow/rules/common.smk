# Configuration checks and helpers shared by the rules. No rules here.

import os

import yaml
from snakemake.utils import validate

from abliterate import rule_settings as rs
from abliterate import workflow_config as wc

# `--config key='{nested: 1}'` arrives as strings; turn them into what the schema expects first.
wc.coerce_cli_strings(config, yaml.safe_load(open(workflow.source_path("../schemas/config.schema.yaml"))))
validate(config, "../schemas/config.schema.yaml")
wc.check(config)

# Jobs share CPUs (study workers, CI): OpenMP threads that spin while waiting slowed shared-CPU
# forward passes about 3x in our measurements, so they sleep instead unless the user says otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RUN = config["run"]
SETS = ["harmful", "harmless"]
WORKERS = list(range(config["study"]["workers"]))
STUDY_DB = wc.study_db_path(config)
STUDY_LEDGER = wc.ledger_path(config)
PROMPTS_DIR = rs.prompts_dir(config)
PROMPTS_KEY = os.path.basename(PROMPTS_DIR)
DEMO_DIR = "results/models/demo"
MERGE_MEM_MB = int(config["merge"]["max_ram_gib"] * 1024)


def model_input(wildcards):
    """The folder a job loads when this workflow makes it (the demo model, a converted GGUF model),
    so its rule runs first."""
    if wc.uses_demo_model(config):
        return [DEMO_DIR]
    converted = wc.converted_model_dir(config)
    return [converted] if converted else []


def gguf_input(wildcards):
    return [wc.gguf_path(config)]


def gguf_source(wildcards):
    """The GGUF file gguf_export copies, if the model came from one."""
    source = None if wc.uses_demo_model(config) else wc.gguf_path(config)
    return [source] if source else []


def gguf_outputs():
    """rule all's GGUF file, when merge.gguf asks for one."""
    return [f"results/{RUN}/gguf/{RUN}.gguf"] if config["merge"]["gguf"] else []


def evaluated_model(wildcards):
    """The merged model folder; with merge.adapter_only the adapter on the base model (no merge job)."""
    if config["merge"]["adapter_only"]:
        return {"adapter": f"results/{RUN}/adapter", "base": model_input(wildcards)}
    return {"model": f"results/{RUN}/model"}


def released_folders(wildcards):
    """The exported folders the release rule copies with their cards, by their name under release/
    (abliterate.steps.release.FOLDER_KINDS; the GGUF output as its file)."""
    folders = {"adapter": f"results/{RUN}/adapter"}
    if not config["merge"]["adapter_only"]:
        folders["model"] = f"results/{RUN}/model"
    if config["merge"]["gguf"]:
        folders["gguf"] = f"results/{RUN}/gguf/{RUN}.gguf"  # the file: its folder is released
    return folders


def settings(rule):
    """What the rule's step reads (abliterate.rule_settings): a change reruns the rule."""
    return rs.settings(config, rule)


def config_hash(rule):
    """The fingerprint its outputs carry as metadata."""
    return rs.fingerprint(config, rule)
