# abliterate: remove refusal behaviour from a language model by directional ablation, with the
# ablation strength tuned by an Optuna study. The rules below run top to bottom in pipeline order:
#   prompts -> demo_model (offline demo only) | gguf_model (GGUF models only) -> baseline -> directions -> study -> export -> merge (-> gguf_export) -> evaluate -> release
# Run:  snakemake --cores all --resources gpu=1      (or --profile profiles/slurm on a cluster)


import os

from snakemake.utils import min_version

min_version("9.0")


# For `--software-deployment-method conda`: envs/*.post-deploy.sh install abliterate from this
# checkout into each environment Snakemake creates (a path inside the env file would be resolved from
# Snakemake's copy of it under .snakemake/conda/). The scripts inherit this process's environment.
os.environ.update(ABLITERATE_SOURCE=workflow.basedir)  # set here, not read: nothing for envvars to assert


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/gguf_model.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/directions.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/gguf_export.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/release.smk"


rule all:
    input:
        summary=f"results/{RUN}/summary.json",
        release=f"results/{RUN}/release",
        directions_plot=f"results/{RUN}/plots/directions.png",
        pareto_plot=f"results/{RUN}/plots/pareto.png",
        gguf=gguf_outputs(),
    default_target: True
