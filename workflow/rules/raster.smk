# Rasterize cells.zarr into OME-Zarr grids, one job per named grid in config['rasters'].


rule rasterize:
    input:
        f"results/{DATASET}/cells.zarr",
    output:
        directory(f"results/{DATASET}/raster/{{grid}}.ome.zarr"),
    log:
        f"logs/rasterize_{DATASET}_{{grid}}.log",
    benchmark:
        f"logs/benchmarks/rasterize_{DATASET}_{{grid}}.tsv"
    params:
        args=raster_args,
    threads: 8
    resources:
        mem_mb=6000,
        runtime=240,
    shell:
        "abc-pipeline rasterize --cells {input} --out {output} {params.args} --workers {threads} "
        "--overwrite --no-progress > {log} 2>&1"
