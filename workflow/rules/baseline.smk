# 3. Baseline: the unmodified model's refusals on harmful prompts (eval and heldout) and its
#    first-token log-probabilities on harmless prompts, the reference every KL is measured against.


rule baseline:
    input:
        model_input,
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
    output:
        responses=f"results/{RUN}/baseline/responses.parquet",
        logprobs=f"results/{RUN}/baseline/logprobs.safetensors",
        metrics=f"results/{RUN}/baseline/metrics.json",
    params:
        settings=settings("baseline"),
        config_hash=config_hash("baseline"),
    log:
        f"results/logs/{RUN}/baseline.log",
    benchmark:
        f"results/benchmarks/{RUN}/baseline.tsv"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=60,
    conda:
        "../../envs/abliterate-gpu.yaml"
    script:
        "../scripts/baseline.py"
