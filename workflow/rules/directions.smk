# 4. Residual streams of train prompts at the first generated position, and per-layer refusal
#    directions: normalised mean(harmful) - mean(harmless), saved as safetensors with provenance.


rule directions:
    input:
        model_input,
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
    output:
        directions=f"results/{RUN}/directions.safetensors",
        plot=report(
            f"results/{RUN}/plots/directions.png",
            caption="../report/directions.rst",
            category="Directions",
            labels={"result": "refusal directions per layer", "run": RUN},
        ),
    params:
        settings=settings("directions"),
        config_hash=config_hash("directions"),
    log:
        f"results/logs/{RUN}/directions.log",
    benchmark:
        f"results/benchmarks/{RUN}/directions.tsv"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=60,
    conda:
        "../../envs/abliterate-gpu.yaml"
    script:
        "../scripts/directions.py"
