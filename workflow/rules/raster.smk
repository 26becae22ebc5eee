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
    threads: 8
    # Measured (docs/benchmarks.md): peak RSS 1.65 GB with 2 threads at 2 M cells on the 0.2 x 0.05 x 0.05 mm grid,
    # flat in the cell count; each further thread holds ~0.33 GB (1.5 chunks of X), so ~3.6 GB with 8: 1.6x margin.
    resources:
        mem_mb=6000,
        runtime=240,
    params:
        args=raster_args,
    shell:
        "abc-pipeline rasterize --cells {input} --out {output} {params.args} --workers {threads} "
        "--overwrite --no-progress > {log} 2>&1"
