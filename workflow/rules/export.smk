# 6. Export: pick a trial by the documented policy (export.policy), write its parameters, the Pareto
#    table and plot, and its ablation as a standard PEFT adapter folder.


rule export:
    input:
        model_input,
        trials=f"results/{RUN}/trials.csv",
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
        directions=f"results/{RUN}/directions.safetensors",
    output:
        selected=f"results/{RUN}/selected.json",
        pareto=f"results/{RUN}/pareto.csv",
        adapter=directory(f"results/{RUN}/adapter"),
        plot=report(
            f"results/{RUN}/plots/pareto.png",
            caption="../report/pareto.rst",
            category="Study",
            labels={"result": "Pareto front", "run": RUN},
        ),
    params:
        settings=settings("export"),
        config_hash=config_hash("export"),
    log:
        f"results/logs/{RUN}/export.log",
    benchmark:
        f"results/benchmarks/{RUN}/export.tsv"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=30,
    conda:
        "../../envs/abliterate-gpu.yaml"
    script:
        "../scripts/export.py"
