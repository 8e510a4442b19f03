# 7. Merge on the CPU: reload the base model unquantized, apply the adapter, save a full model
#    folder. No GPU: a 4/8-bit study's adapter is merged into full-precision weights here.


rule merge:
    input:
        model_input,
        adapter=f"results/{RUN}/adapter",
        selected=f"results/{RUN}/selected.json",
    output:
        model=directory(f"results/{RUN}/model"),
    params:
        settings=settings("merge"),
        config_hash=config_hash("merge"),
    log:
        f"results/logs/{RUN}/merge.log",
    benchmark:
        f"results/benchmarks/{RUN}/merge.tsv"
    threads: 4
    resources:
        mem_mb=MERGE_MEM_MB,
        runtime=60,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/merge.py"
