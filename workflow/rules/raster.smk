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
    # Measured (docs/benchmarks.md, full-size run, 4.1 M cells, 2 threads): peak RSS 3.06 GB (section_50um) and
    # 3.86 GB (reconstructed_3d, 0.2 x 0.05 x 0.05 mm) in 91-99 s; each further thread holds ~0.33 GB (1.5 chunks
    # of X), so ~5.9 GB with 8: 1.5x margin.
    resources:
        mem_mb=9000,
        runtime=240,
    params:
        args=raster_args,
    shell:
        "abc-pipeline rasterize --cells {input} --out {output} {params.args} --workers {threads} "
        "--overwrite --no-progress > {log} 2>&1"
