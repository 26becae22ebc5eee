# Learning rules: train (task x model) -> predict -> annotate (write-back to AnnData).


rule train:
    input:
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        checkpoint=f"results/{DATASET}/models/{{task}}/{{model}}/checkpoint.pt",
        history=f"results/{DATASET}/models/{{task}}/{{model}}/history.tsv",
        metrics=f"results/{DATASET}/models/{{task}}/{{model}}/metrics.json",
    log:
        f"logs/train_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/train_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=config["training"]["gpus"],
    params:
        outdir=lambda wildcards, output: Path(output.checkpoint).parent,
        args=train_args,
    shell:
        "abc-pipeline train --raster {input.raster} --cells {input.cells} --task {wildcards.task} "
        "--model {wildcards.model} --out {params.outdir} {params.args} --restart-if-changed --no-progress > {log} 2>&1"


rule predict:
    input:
        checkpoint=rules.train.output.checkpoint,
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        directory(f"results/{DATASET}/models/{{task}}/{{model}}/predictions.zarr"),
    log:
        f"logs/predict_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/predict_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=config["training"]["gpus"],
    params:
        device=config["training"]["device"],
    shell:
        "abc-pipeline predict --checkpoint {input.checkpoint} --raster {input.raster} --cells {input.cells} "
        "--out {output} --device {params.device} --no-progress > {log} 2>&1"


rule annotate:
    input:
        cells=f"results/{DATASET}/cells.zarr",
        predictions=prediction_stores(),
    output:
        f"results/{DATASET}/cells_annotated.h5ad",
    log:
        f"logs/annotate_{DATASET}.log",
    benchmark:
        f"logs/benchmarks/annotate_{DATASET}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "abc-pipeline annotate --cells {input.cells} --predictions {input.predictions} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        checkpoint=rules.train.output.checkpoint,
        predictions=rules.predict.output[0],
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        report(
            directory(f"results/{DATASET}/models/{{task}}/{{model}}/evaluation"),
            patterns=["{figure}.png"],
            caption="../report/evaluation.rst",
            category="Evaluation",
            subcategory="{task} / {model}",
        ),
    log:
        f"logs/evaluate_{DATASET}_{{task}}_{{model}}.log",
    benchmark:
        f"logs/benchmarks/evaluate_{DATASET}_{{task}}_{{model}}.tsv"
    threads: model_threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=config["training"]["gpus"],
    params:
        device=config["training"]["device"],
        args=evaluate_args(),
    shell:
        "abc-pipeline evaluate --checkpoint {input.checkpoint} --raster {input.raster} "
        "--predictions {input.predictions} --cells {input.cells} --out {output} --device {params.device} "
        "{params.args} > {log} 2>&1"
