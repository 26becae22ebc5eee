# Transfer: `snakemake --cores all transfer` annotates each dataset of config['transfer'] (your own AnnData or
# MERSCOPE folder) with this config's trained models (the primary model of every task).


rule transfer_dataset:
    input:
        checkpoints=expand(f"results/{DATASET}/models/{{task}}/{config['primary_model']}/checkpoint.pt", task=TASKS),
        data=lambda wildcards: TRANSFERS[wildcards.name]["path"],
    output:
        f"results/{DATASET}/transfer/{{name}}.h5ad",
    log:
        f"logs/transfer_{DATASET}_{{name}}.log",
    benchmark:
        f"logs/benchmarks/transfer_{DATASET}_{{name}}.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=config["training"]["gpus"],
    params:
        args=transfer_args,
        device=config["training"]["device"],
    shell:
        "abc-pipeline transfer --checkpoint {input.checkpoints} --input {input.data} --out {output} {params.args} "
        "--device {params.device} --no-progress > {log} 2>&1"


rule transfer:
    input:
        [f"results/{DATASET}/transfer/{name}.h5ad" for name in TRANSFERS],
