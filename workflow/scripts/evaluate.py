from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snakemake.script import snakemake

from abliterate import logs
from abliterate.steps import evaluate

logs.to_file(snakemake.log[0])
evaluate.run(
    config=snakemake.params.settings,
    model_dir=snakemake.input.get("model"),
    adapter_dir=snakemake.input.get("adapter"),
    harmful=snakemake.input.harmful,
    harmless=snakemake.input.harmless,
    baseline_metrics=snakemake.input.baseline_metrics,
    baseline_logprobs=snakemake.input.baseline_logprobs,
    baseline_responses=snakemake.input.baseline_responses,
    selected_path=snakemake.input.selected,
    storage=snakemake.params.storage,
    study_name=snakemake.params.study_name,
    ledger=snakemake.params.ledger,
    out_summary=snakemake.output.summary,
    out_responses=snakemake.output.responses,
    config_hash=snakemake.params.config_hash,
)
