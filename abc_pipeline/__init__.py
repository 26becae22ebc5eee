"""abc_pipeline: Allen Brain Cell Atlas MERFISH -> AnnData -> OME-Zarr rasters -> equivariant networks.

Subpackages
-----------
atlas   release manifests, resumable downloads, synthetic releases, AnnData assembly
raster  Dask rasterization of cells into multichannel OME-Zarr grids
nn      moment-kernel equivariant layers, baselines and the model zoo
learn   training, dense prediction and write-back to AnnData
"""

__version__ = "0.1.0"
