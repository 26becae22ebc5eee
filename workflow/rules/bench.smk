# Model comparison: `snakemake --cores all bench` trains config['bench']['models'] parameter-matched on every
# task, with all and with a fraction of the training sections, and writes one table per task and fraction.


rule bench_models:
    input:
        raster=task_raster,
        cells=f"results/{DATASET}/cells.zarr",
    output:
        table=report(
            f"results/{DATASET}/bench/{{task}}/train_{{percent}}pct/bench_models.tsv",
            caption="../report/bench.rst",
            category="Model comparison",
            subcategory="{task}, {percent}% of training sections",
        ),
        markdown=f"results/{DATASET}/bench/{{task}}/train_{{percent}}pct/bench_models.md",
        orientation=report(
            f"results/{DATASET}/bench/{{task}}/train_{{percent}}pct/orientation.png",
            caption="../report/bench.rst",
            category="Model comparison",
            subcategory="{task}, {percent}% of training sections",
        ),
        curve=report(
            f"results/{DATASET}/bench/{{task}}/train_{{percent}}pct/equivariance_curve.png",
            caption="../report/bench.rst",
            category="Model comparison",
            subcategory="{task}, {percent}% of training sections",
        ),
    log:
        f"logs/bench_{DATASET}_{{task}}_{{percent}}pct.log",
    benchmark:
        f"logs/benchmarks/bench_{DATASET}_{{task}}_{{percent}}pct.tsv"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=1440,
        gpu=config["training"]["gpus"],
    params:
        outdir=lambda wildcards, output: Path(output.table).parent,
        args=bench_args,
    shell:
        "abc-pipeline bench-models --raster {input.raster} --cells {input.cells} --task {wildcards.task} "
        "--out {params.outdir} {params.args} --no-progress > {log} 2>&1"


rule bench:
    input:
        bench_tables(),
