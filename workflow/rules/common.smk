# Shared helpers: config validation and output paths. Logic lives in abc_pipeline; rules stay thin.
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

DATASET = config["dataset"]
RELEASE = str(config["release"])
CACHE = config["cache_dir"]
SYNTHETIC = config["source"]["kind"] == "synthetic"
SYNTH_ROOT = "resources/synthetic_release"
RASTERS = {spec["name"]: spec for spec in config["rasters"]}


def base_url():
    """Bucket root the download rule reads from: the public bucket, a mirror, or the demo's synthetic tree."""
    if SYNTHETIC:
        return Path(SYNTH_ROOT).resolve().as_uri()
    return config["source"]["base_url"]


def final_outputs():
    return [f"results/{DATASET}/cells.zarr"] + [
        f"results/{DATASET}/raster/{grid}.ome.zarr" for grid in RASTERS
    ]
