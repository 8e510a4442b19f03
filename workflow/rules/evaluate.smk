# 8. Evaluate the merged model as users will load it (from disk; with merge.adapter_only, the base model
#    with the adapter) on eval and heldout prompts, and write results/<run>/summary.json, the output
#    contract documented in the README.


rule evaluate:
    input:
        unpack(evaluated_model),
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
        baseline_metrics=f"results/{RUN}/baseline/metrics.json",
        baseline_logprobs=f"results/{RUN}/baseline/logprobs.safetensors",
        baseline_responses=f"results/{RUN}/baseline/responses.parquet",
        selected=f"results/{RUN}/selected.json",
        trials=f"results/{RUN}/trials.csv",
    output:
        summary=report(
            f"results/{RUN}/summary.json",
            caption="../report/summary.rst",
            category="Summary",
            labels={"result": "summary", "run": RUN},
        ),
        responses=f"results/{RUN}/merged_responses.parquet",
    params:
        settings=settings("evaluate"),
        storage=wc.storage_url(config),
        study_name=rs.study_name(config),
        ledger=STUDY_LEDGER,
        config_hash=config_hash("evaluate"),
    log:
        f"results/logs/{RUN}/evaluate.log",
    benchmark:
        f"results/benchmarks/{RUN}/evaluate.tsv"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=60,
    conda:
        "../../envs/abliterate-gpu.yaml"
    script:
        "../scripts/evaluate.py"
