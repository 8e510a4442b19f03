# 2. The offline demo model (only when model.path is results/models/demo): SmolLM2-135M-Instruct,
#    fine-tuned on the demo split to refuse harmful requests, so the pipeline has something to remove.


rule demo_model:
    input:
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
    output:
        model=directory(DEMO_DIR),
    params:
        settings=settings("demo_model"),
        config_hash=config_hash("demo_model"),
    log:
        "results/logs/demo_model.log",
    benchmark:
        "results/benchmarks/demo_model.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/demo_model.py"
