# Rasterize cells.zarr into OME-Zarr grids, one job per named grid in config['rasters'].


def raster_args(wildcards):
    """CLI options of one configured grid (see config/README.md, key `rasters`)."""
    spec = RASTERS[wildcards.grid]
    args = [f"--space {spec['space']}"]
    if spec.get("voxel_size"):
        args.append("--voxel-size " + " ".join(str(v) for v in spec["voxel_size"]))
    if spec.get("pca"):
        args.append(f"--pca {spec['pca']}")
    if spec.get("genes"):
        args.append("--genes " + " ".join(spec["genes"]))
    if "labels" in spec:
        args.append("--labels " + " ".join(spec["labels"]))
    args.append(f"--levels {spec.get('levels', 2)}")
    dask_cfg = config["dask"]
    if dask_cfg.get("address"):
        args.append(f"--address {dask_cfg['address']}")
    else:
        args.append(f"--scheduler {dask_cfg['scheduler']}")
    return " ".join(args)


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
    threads: workflow.cores
    resources:
        mem_mb=6000,
        runtime=240,
    shell:
        "abc-pipeline rasterize --cells {input} --out {output} {params.args} --workers {threads} "
        "--overwrite --no-progress > {log} 2>&1"
