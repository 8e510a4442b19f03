# 5. The Optuna study (refusals, KL), persisted in SQLite. study.workers jobs share one study; each
#    declares gpu=1. The database is deliberately not an output: Snakemake deletes the outputs of a
#    failed job, which would lose finished trials. A rerun resumes it (killed trials are re-asked).


rule study:
    input:
        model_input,
        harmful=f"{PROMPTS_DIR}/harmful.parquet",
        harmless=f"{PROMPTS_DIR}/harmless.parquet",
        directions=f"results/{RUN}/directions.safetensors",
        baseline=f"results/{RUN}/baseline/logprobs.safetensors",
    output:
        done=f"results/{RUN}/study/worker-{{worker}}.json",
    params:
        settings=settings("study"),
        storage=wc.storage_url(config),
        study_name=rs.study_name(config),
        ledger=STUDY_LEDGER,
        n_trials=lookup(dpath="study/n_trials", within=config),
        config_hash=config_hash("study"),
    log:
        f"results/logs/{RUN}/study-{{worker}}.log",
    benchmark:
        f"results/benchmarks/{RUN}/study-{{worker}}.tsv"
    wildcard_constraints:
        worker=r"\d+",
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../../envs/abliterate-gpu.yaml"
    script:
        "../scripts/study.py"


rule trials:
    input:
        workers=expand(f"results/{RUN}/study/worker-{{worker}}.json", worker=WORKERS),
    output:
        table=report(
            f"results/{RUN}/trials.csv",
            caption="../report/trials.rst",
            category="Study",
            labels={"result": "trials table", "run": RUN},
        ),
    params:
        storage=wc.storage_url(config),
        study_name=rs.study_name(config),
        ledger=STUDY_LEDGER,
        # a new n_trials reruns this rule and so the study, even after a failed study job deleted
        # its worker file (Snakemake then skips a missing intermediate whose consumer is up to date)
        n_trials=lookup(dpath="study/n_trials", within=config),
    log:
        f"results/logs/{RUN}/trials.log",
    benchmark:
        f"results/benchmarks/{RUN}/trials.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/abliterate-cpu.yaml"
    script:
        "../scripts/trials.py"
