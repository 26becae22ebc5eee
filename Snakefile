# abc-pipeline: ABC Atlas MERFISH -> AnnData -> OME-Zarr rasters -> equivariant networks -> predictions.
# Run the embedded demo with `snakemake --cores all`; see README.md and config/README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/atlas.smk"
include: "workflow/rules/raster.smk"
include: "workflow/rules/learn.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/transfer.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
